"""`vla-pipeline`: sample episodes, ingest a folder through Dagster, list episodes, and look up
and run a registered policy."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .data.catalog import episode_rows
from .data.ingest import episode_files, grouped_reasons
from .data.pending import DEFAULT_MAX_PENDING_SECONDS
from .data.store import StoreError, WindowStore
from .evaluation.gate import CHAMPION, DEFAULT_MODEL_NAME
from .settings import SettingsError, settings


def _episodes_dir(value: str | None) -> Path:
    return Path(value) if value else settings().episodes_dir


def _store_path() -> Path:
    return Path(settings().store)


def _dagster_home() -> None:
    """Use ./.dagster (the repo's sqlite instance) when DAGSTER_HOME is not set."""
    if os.environ.get("DAGSTER_HOME"):
        return
    local = Path.cwd() / ".dagster"
    if not (local / "dagster.yaml").is_file():
        raise SystemExit(
            "DAGSTER_HOME is not set and ./.dagster/dagster.yaml does not exist: "
            "run from the repository root or export DAGSTER_HOME=/path/to/dagster_home"
        )
    os.environ["DAGSTER_HOME"] = str(local)


def cmd_sample_episodes(args) -> int:
    from .sim.operator import write_sample_episodes

    paths = write_sample_episodes(args.out_dir, args.n, seed=args.seed, progress=print)
    print(f"{len(paths)} sample episodes in {args.out_dir}")
    return 0


def cmd_ingest(args) -> int:
    folder = _episodes_dir(args.folder)
    if args.from_lerobot:
        from .data.lerobot import LeRobotError, import_lerobot

        try:
            converted = import_lerobot(args.from_lerobot, folder, [key.strip() for key in args.action_keys.split(",")],
                                       args.camera, args.action_scale, progress=print)
        except LeRobotError as error:
            print(f"error: --from-lerobot: {error}", file=sys.stderr)
            return 2
        for warning in converted.warnings:
            print(f"warning: {warning}")
        print(f"{len(converted.files)} episodes ({converted.frames} frames) of {args.from_lerobot} written to {folder} "
              f"as collector files (camera {converted.camera}, action {','.join(converted.action_keys)}) in "
              f"{converted.seconds:.1f} s; ingesting them")
    try:
        episode_files(folder)  # a missing folder is said before anything starts
        _dagster_home()
        from .definitions import ingest_folder

        report = ingest_folder(folder, say=print)
    except (FileNotFoundError, StoreError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if report.runs:
        rejected = len(report.rejected_reasons)
        reasons = grouped_reasons(report.rejected_reasons)
        print(f"done: {report.stored} stored, {rejected} rejected{f' ({reasons})' if rejected else ''}, "
              f"{report.runs} run(s) recorded in {os.environ['DAGSTER_HOME']}"
              + ("; `vla-pipeline episodes` lists them" if rejected else ""))
    if report.failed_runs:
        print(f"error: run(s) {', '.join(report.failed_runs)} failed; open the Dagster UI for details", file=sys.stderr)
        return 1
    return 0


def cmd_export_dataset(args) -> int:
    from .data.lerobot import LeRobotError, export_lerobot

    store = WindowStore(_store_path())
    try:
        report = export_lerobot(store, args.out_dir, args.episodes, args.size, progress=print)
    except (LeRobotError, StoreError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if report.mode == "unchanged":
        print(f"{args.out_dir}: already holds these {report.total_episodes} episodes; nothing written")
        return 0
    done = {"new": "written", "append": f"appended to the {report.kept} already there",
            "rewrite": f"written anew ({report.reason})"}[report.mode]
    print(f"{len(report.written)} episodes ({report.frames} frames) {done} in {report.seconds:.1f} s: "
          f"{args.out_dir} is a LeRobotDataset v3.0 of {report.total_episodes} episodes, {report.total_frames} "
          f"frames, fps {report.fps}")
    return 0


def cmd_episodes(args) -> int:
    store = WindowStore(_store_path())
    if args.folder and not Path(args.folder).is_dir():
        print(f"error: {args.folder}: no such folder (the drop folder to look for pending files)", file=sys.stderr)
        return 2
    try:
        rows = episode_rows(store, _episodes_dir(args.folder), DEFAULT_MAX_PENDING_SECONDS)
    except StoreError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return 0
    if not rows:
        print(f"no episodes in {store.path}")
        return 0
    for row in rows:
        detail = (
            f"{row['frames']:>3} frames  {row['side'] or '?':<5}  {row['scenario'] or '-'}"
            if row["status"] == "stored"
            else row["reason"]
        )
        print(f"{row['status']:<8}  {row['episode_id']:<56}  {detail}")
    counts = {status: sum(r["status"] == status for r in rows) for status in ("stored", "rejected", "pending")}
    print(", ".join(f"{count} {status}" for status, count in counts.items()))
    return 0


def cmd_predict(args) -> int:
    from .data.episodes import EpisodeRejected, ValidationRules, inspect_episode
    from .data.h5chunks import frame_blocks
    from .evaluation.metrics import DIRECTIONS, direction_classes

    try:
        if not args.episode.is_file():
            raise EpisodeRejected(args.episode, "no such file")
        header = inspect_episode(args.episode, ValidationRules(min_frames=1), digest="-")
    except EpisodeRejected as error:
        print(f"error: {args.episode}: {error.reason}", file=sys.stderr)
        return 2
    from transformers.utils import logging as transformers_logging

    from .evaluation.registry import ModelLookupError, load_policy

    transformers_logging.disable_progress_bar()  # stdout is JSON lines; keep stderr for errors
    try:
        policy = load_policy(args.model_uri)
    except ModelLookupError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    instruction = args.instruction or header.instruction
    import h5py

    policy.reset()
    with h5py.File(header.path, "r") as h5:
        for start, block in frame_blocks(h5[header.image_dataset], header.path):
            for offset, frame in enumerate(block):
                chunk = policy.step(frame, instruction, colour_order=header.colour_order)
                frame_index = start + offset
                print(json.dumps({
                    "episode_id": header.episode_id,
                    "frame": frame_index,
                    "instruction": instruction,
                    "actions": [[round(float(v), 6) for v in step] for step in chunk],
                    "direction": DIRECTIONS[int(direction_classes(chunk[0], policy.config.action_scale))],
                    "recorded": [round(float(v), 4) for v in header.actions[frame_index, :2]],
                    # episode_start: the recorded zero action is no key press, so evaluation skips it
                    "event": header.event_types[frame_index],
                }), flush=True)
    return 0


def cmd_model(args) -> int:
    from .evaluation.registry import ModelLookupError, policy_directory, resolve_version, version_summary

    try:
        if not args.model_uri.startswith("models:/"):
            return _show_policy_folder(*policy_directory(args.model_uri))
        version = resolve_version(args.model_uri)
    except ModelLookupError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    summary = version_summary(version)
    print(f"{args.model_uri} → {summary['name']} version {summary['version']} (training run {summary['run_id']}, "
          f"data snapshot {summary['data_snapshot']}, {summary['train_episodes']} train / "
          f"{summary['val_episodes']} val episodes, commit {summary['git_commit'][:12]})")
    print(f"gate: @{summary['promotion']}: {summary['promotion_reason']}")
    on = f" on {summary['predictions']:.0f} predictions" if summary["predictions"] is not None else ""
    for metric, label in (("direction_accuracy", "direction accuracy"), ("mse", "MSE")):
        row = [f"model {summary[metric]['model']}"] + [f"{name} {value}" for name, value in summary[metric]["baselines"].items()]
        print(f"{label} (first step, validation{on}): " + " | ".join(row))
    if summary["margin"] is not None:
        print(f"margin over the best constant baseline (first step): {summary['margin']:+.4f}")
    flip, strafing = summary["flip"], summary["strafing_predictions"]
    print("instruction flip (left ↔ right swapped, first step): " + (
        f"{flip} of {strafing:.0f} strafing predictions" if flip is not None and strafing is not None
        else flip or "not measured"))
    sight = summary["sight_reliance"]

    def rate(value: float | None, spec: str = ".3f") -> str:
        return "not recorded" if value is None else format(value, spec)

    if sight["real"] is not None and sight["first_frame"] is not None:
        other = (f"skipped ({sight['other_episodes_skipped']})" if sight["other_episodes_skipped"]
                 else rate(sight["other_episodes"]))
        print(f"sight reliance (first step, validation): real frames {rate(sight['real'])} | each episode's first "
              f"frame {rate(sight['first_frame'])} | other episodes' frames {other} | drop {rate(sight['drop'], '+.3f')}")
    else:
        print("sight reliance: not recorded (a version registered before it was measured)")
    closed = summary["closed_loop"]
    if closed and "skipped" in closed:
        print(f"closed loop: skipped: {closed['skipped']}")
    elif closed:
        baselines = " | ".join(f"{name} {value:.2f}" for name, value in closed["baselines"].items())
        print(f"closed loop in {closed['env']} ({rate(closed['rollouts'], '.0f')} rollouts): "
              f"success {rate(closed['success_rate'], '.2f')}, SPL {rate(closed['spl'], '.2f')}, "
              f"collisions {rate(closed['collision_rate'], '.2f')} | same scenes: {baselines or 'not recorded'}")
        print(f"closed loop, sight ablations: frozen camera {rate(closed['frozen_success'], '.2f')}, "
              f"blank camera {rate(closed['blank_success'], '.2f')}; the best blind driver "
              f"{rate(closed['best_blind'], '.2f')}")
    robust = summary["robustness"]
    if robust["worst"] is None and robust["offline_unperturbed"] is None:
        print("robustness: not recorded (a version registered before it was measured)")
    else:
        print(f"robustness: worst closed-loop condition {robust['worst'] or 'not recorded'}, mean over the conditions "
              f"{rate(robust['mean_success'], '.2f')} | offline accuracy {rate(robust['offline_unperturbed'])}, "
              f"largest drop under an image perturbation {rate(robust['offline_worst_drop'], '+.3f')}")
    return 0


def _show_policy_folder(directory: Path, meta: dict) -> int:
    """`vla-pipeline model` on a folder: what it holds (a folder has no gate decision or metrics)."""
    from .policy.policy_config import read_policy_config

    config = read_policy_config(directory)
    bundle = meta.get("bundle")
    kind = (f"deploy bundle ({bundle['dtype']}, exported {bundle['exported_at']} from {bundle['exported_from']})"
            if bundle else "policy directory (a lora_adapter output, not a registered version)")
    print(f"{directory}: {kind}")
    print(f"policy: {config.preset} preset, window {config.window}, chunk {config.chunk}, {config.action_head} head, "
          f"backbone {bundle['trained_backbone'] if bundle else config.backbone}")
    print("gate and metrics: only registered versions have them (vla-pipeline model --model-uri models:/<name>@<alias>)")
    return 0


def cmd_export(args) -> int:
    from .evaluation.registry import ModelLookupError, policy_directory
    from .policy.bundle import export_bundle

    try:
        directory, _ = policy_directory(args.model_uri)
    except ModelLookupError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.out_dir.exists() and any(args.out_dir.iterdir()) and not (args.out_dir / "bundle.json").is_file():
        print(f"error: {args.out_dir} exists and is not a bundle: choose an empty or new folder", file=sys.stderr)
        return 2
    out = export_bundle(directory, args.out_dir, args.dtype, source=args.model_uri)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"{args.model_uri} → {out} ({args.dtype}, {size / 2**20:.1f} MiB): on the robot, "
          f"`from vla_pipeline.policy.serving import load_bundle; policy = load_bundle('{out}')`")
    return 0


def _world_of_version(model_uri: str) -> str | None:
    """The simulated world a registered version was driven in at registration (its closed_loop tag)."""
    from .evaluation.closed_loop import WORLDS
    from .evaluation.registry import ModelLookupError, resolve_version

    if not model_uri.startswith("models:/"):
        return None
    try:
        world = resolve_version(model_uri).tags.get("closed_loop")
    except ModelLookupError:
        return None  # said once, by load_policy below
    return world if world in WORLDS else None


def cmd_rollout(args) -> int:
    from .evaluation.closed_loop import WORLDS, closed_loop, driver_rows
    from .sim.env import scenario_from_token
    from .sim.operator import SAMPLE_WORLD
    from .sim.perturb import parse_conditions

    if (args.model_uri is None) == (args.server is None):
        print("error: give a MODEL_URI to load the policy here, or --server ws://HOST:PORT to drive through a policy "
              "server", file=sys.stderr)
        return 2
    remote = None
    if args.server is not None:
        from .serve.client import PolicyClient, ServerError

        try:  # the server names the model it serves: its world is the version's
            remote = PolicyClient(args.server, settings().serve_api_key_value, retries=2)
        except (ServerError, ConnectionError) as error:
            print(f"error: --server: {error}", file=sys.stderr)
            return 2
        remote.close()  # each rollout opens a session of its own (fork); this one only read the metadata
        args.model_uri = remote.metadata.get("model_uri") or args.server
    if args.env is None:
        args.env = _world_of_version(args.model_uri) or SAMPLE_WORLD
    problem = None
    if args.env not in WORLDS:
        problem = f"--env {args.env!r}: no such simulated world (known: {', '.join(WORLDS)})"
    elif args.episodes < 1 or args.envs < 1:
        problem = "--episodes and --envs must be at least 1"
    elif args.perturb is not None and args.scenario is not None:
        problem = "--perturb drives the plan's scenes: it takes no --scenario"
    try:
        if not problem and args.scenario is not None:
            scenario_from_token(args.scenario)
        if not problem and args.perturb is not None:
            args.perturb = parse_conditions(args.perturb)
    except ValueError as error:
        problem = f"--{'perturb' if args.perturb is not None else 'scenario'}: {error}"
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    from transformers.utils import logging as transformers_logging

    from .evaluation.registry import ModelLookupError, load_policy
    from .sim.rollout import RolloutsFailed

    transformers_logging.disable_progress_bar()
    try:
        policy = remote or load_policy(args.model_uri)
    except ModelLookupError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    say = (lambda line: print(line, file=sys.stderr)) if args.json else print
    if remote is not None:
        say(f"driving through the policy server at {remote.uri} ({remote.metadata.get('model_uri')}): "
            "each rollout is a session of its own")

    def shown(driver: str, result) -> None:
        if args.json:
            print(json.dumps({"driver": driver, **result.to_dict()}), flush=True)
        elif driver == "policy":
            print(f"  rollout {result.index + 1}/{args.episodes}  {result.scenario:<34} {result.outcome:<14} "
                  f"{result.presses:>2} presses  {result.reason or ''}", flush=True)

    if args.perturb is not None:
        return _rollout_perturbed(args, policy, say, shown)
    try:
        report = closed_loop(policy, args.episodes, args.seed, args.envs, camera=args.camera, env_id=args.env,
                             video_dir=args.video, videos="all", baselines=not args.no_baselines,
                             ablations=not args.no_baselines, log=say,
                             on_result=shown, scenario=args.scenario)
    except RolloutsFailed as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    summary = report.summary
    if args.json:
        print(json.dumps({"summary": summary, "conditions": report.conditions()}))
        return 0
    columns = ("success", "spl", "collision", "wrong_side", "lost", "stopped_away", "timeout", "invalid_action",
               "controller_error")
    print(f"{'driver':<22} " + " ".join(f"{column.replace('_', ' '):>{max(len(column), 7)}}" for column in columns))
    for name, rates in driver_rows(summary):
        values = [rates["spl"] if column == "spl" else rates[f"{column}_rate"] for column in columns]
        print(f"{name:<22} " + " ".join(f"{value:>{max(len(column), 7)}.2f}" for column, value in zip(columns, values)))
    conditions = report.conditions()
    print(f"{conditions['episodes']} rollouts in {conditions['env']} (plan seed {conditions['seed']}, camera "
          f"{conditions['camera']['name']}, {conditions['envs']} environments)")
    if args.video:
        print(f"videos of every rollout in {args.video}")
    return 0


def _rollout_perturbed(args, policy, say, shown) -> int:
    """`rollout --perturb`: the policy as trained and under each condition, one row per condition."""
    from .evaluation.robustness import GOAL_SUCCESS, robustness_rollouts
    from .sim.rollout import RolloutsFailed

    try:
        report = robustness_rollouts(policy, args.perturb, args.episodes, args.seed, args.envs, args.camera, args.env,
                                     log=say, on_result=shown)
    except RolloutsFailed as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    record = report.record()
    summary = {"robustness": record["robustness"], "worst": record["worst"], "mean_success": record["mean_success"],
               "goal_success": GOAL_SUCCESS}
    if args.json:
        print(json.dumps({"summary": summary, "conditions": {key: record[key] for key in
                                                              ("env", "episodes", "seed", "camera", "envs")}}))
        return 0
    print(f"{'condition':<17} {'success':>7} {'spl':>5} {'collision':>9} {'wrong side':>10} {'lost':>5} "
          f"{'stopped away':>12}")
    for name, rates in record["robustness"].items():
        print(f"{name:<17} {rates['success_rate']:>7.2f} {rates['spl']:>5.2f} {rates['collision_rate']:>9.2f} "
              f"{rates['wrong_side_rate']:>10.2f} {rates['lost_rate']:>5.2f} {rates['stopped_away_rate']:>12.2f}")
    worst = record["worst"]
    print(f"worst: {worst['condition']} {worst['success_rate']:.2f}; mean over the perturbed conditions "
          f"{record['mean_success']:.2f} (goal: every condition at least {GOAL_SUCCESS:.2f}); {report.episodes} "
          f"rollouts per condition in {report.env} (plan seed {report.seed}, camera {report.camera})")
    return 0


def cmd_serve(args) -> int:
    import logging

    from .serve.server import PolicyServer, ServeConfig, ServeError, read_api_key

    try:
        config = ServeConfig(host=args.host, port=args.port, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                             max_message_mb=args.max_message_mb, rate_every_s=args.rate_every_s,
                             drain_timeout_s=args.drain_timeout_s)
        api_key = read_api_key(settings().serve_api_key_value, args.api_key_file)
        PolicyServer.check_host(config, api_key)
    except (ValueError, ServeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%Y-%m-%d %H:%M:%S",
                        stream=sys.stderr)
    logging.getLogger("websockets").setLevel(logging.WARNING)
    from transformers.utils import logging as transformers_logging

    from .evaluation.registry import ModelLookupError, load_policy

    transformers_logging.disable_progress_bar()
    try:
        policy = load_policy(args.model_uri)
    except ModelLookupError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    server = PolicyServer(policy, config, api_key, model_uri=args.model_uri, version=policy.metadata.get("version"))
    try:
        server.run()
    except OSError as error:  # the port is taken, the address is not this machine's …
        print(f"error: cannot listen on {args.host}:{args.port}: {error.strerror or error}", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vla-pipeline", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    sample = commands.add_parser("sample-episodes", help="write synthetic episodes in the collector's layout")
    sample.add_argument("out_dir", type=Path, help="folder to write the .h5 files into (created if missing)")
    sample.add_argument("-n", type=int, default=12, help="number of episodes (default 12)")
    sample.add_argument("--seed", type=int, default=0, help="random seed: the same seed writes the same episodes (default 0)")
    sample.set_defaults(run=cmd_sample_episodes)

    ingest = commands.add_parser("ingest", help="validate and store new or changed episodes, through Dagster")
    ingest.add_argument("folder", nargs="?", help="episode folder (default $VLA_EPISODES_DIR or data/episodes)")
    ingest.add_argument("--from-lerobot", metavar="DIR_OR_REPO_ID", help="first write each episode of this "
                        "LeRobotDataset v3 into the folder as a collector file (docs/data.md)")
    ingest.add_argument("--action-keys", default="x.vel,y.vel", help="with --from-lerobot: the action's two axes "
                        "of the planar base velocity, forward then left (default x.vel,y.vel)")
    ingest.add_argument("--camera", help="with --from-lerobot: the camera's feature key (default: the only one)")
    ingest.add_argument("--action-scale", type=float, default=1.0, help="with --from-lerobot: factor from the "
                        "dataset's units to the robot's command units (default 1)")
    ingest.set_defaults(run=cmd_ingest)

    export_dataset = commands.add_parser("export-dataset", help="write the window store's episodes as a dataset "
                                         "of another format (LeRobotDataset v3.0)")
    export_dataset.add_argument("out_dir", type=Path, help="the dataset folder: new, or one this command wrote "
                                "(new episodes are appended)")
    export_dataset.add_argument("--format", choices=["lerobot"], default="lerobot", help="lerobot: LeRobotDataset "
                                "v3.0 (the only one)")
    export_dataset.add_argument("--episodes", nargs="+", metavar="EPISODE_ID", help="these stored episodes "
                                "(default: all)")
    export_dataset.add_argument("--size", type=int, help="frames resized to SIZE×SIZE (default: as stored, 224)")
    export_dataset.set_defaults(run=cmd_export_dataset)

    episodes = commands.add_parser("episodes", help="list stored, rejected and pending episodes")
    episodes.add_argument("--json", action="store_true", help="one JSON object per line")
    episodes.add_argument("--folder", help="episode folder to look for pending files (default $VLA_EPISODES_DIR or data/episodes)")
    episodes.set_defaults(run=cmd_episodes)

    champion = f"models:/{DEFAULT_MODEL_NAME}@{CHAMPION}"
    predict = commands.add_parser("predict", help="run a registered policy over an episode file, one JSON line per frame")
    predict.add_argument("episode", type=Path, help="episode .h5 file in the collector's layout")
    predict.add_argument("--model-uri", default=champion, help=f"models:/<name>@<alias>, models:/<name>/<version>, "
                         f"a policy directory or a deploy bundle (default {champion})")
    predict.add_argument("--instruction", help="instruction text (default: the episode's own)")
    predict.set_defaults(run=cmd_predict)

    model = commands.add_parser("model", help="show a registered policy: version, gate decision, metrics vs baselines")
    model.add_argument("--model-uri", default=champion, help=f"models:/<name>@<alias>, models:/<name>/<version>, "
                       f"a policy directory or a deploy bundle (default {champion})")
    model.set_defaults(run=cmd_model)
    export = commands.add_parser("export", help="write a self-contained deploy bundle (LoRA merged) of a policy")
    export.add_argument("model_uri", help="models:/<name>@<alias>, models:/<name>/<version>, a policy directory "
                        "or a bundle (re-exported at --dtype)")
    export.add_argument("out_dir", type=Path, help="the bundle folder to write (replaced if it is a bundle)")
    export.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default="fp16",
                        help="the weights' precision (default fp16, as on the Jetson); merging happens in fp32")
    export.set_defaults(run=cmd_export)

    rollout = commands.add_parser("rollout", help="drive a policy in the simulated world, beside the model-free "
                                  "drivers (the best blind one included) in the same scenes, then with its camera "
                                  "frozen and blanked: success rate, SPL, collisions")
    rollout.add_argument("model_uri", nargs="?", help="models:/<name>@<alias>, models:/<name>/<version>, a policy "
                         "directory or a deploy bundle (or --server)")
    rollout.add_argument("--server", metavar="ws://HOST:PORT", help="drive the policy a `vla-pipeline serve` serves, "
                         "through the network (API key: $VLA_SERVE_API_KEY), instead of loading one")
    rollout.add_argument("--episodes", type=int, default=48, help="rollouts, spread over side × distance × boxes "
                         "(default 48)")
    rollout.add_argument("--seed", type=int, default=0, help="the plan's seed: the same seed, the same scenes (default 0)")
    rollout.add_argument("--scenario", help="drive every rollout in this scenario, e.g. 1box_hori_left_core_far")
    rollout.add_argument("--envs", type=int, default=2, help="environments stepped at once (default 2)")
    rollout.add_argument("--env", help="the simulated world to drive in (default: the world a registered version "
                         "was driven in at registration, else the sample episodes' world, vla_pipeline/BoxNav-v1)")
    rollout.add_argument("--camera", choices=("720p", "small"), default="720p",
                         help="720p: the collector's 1280×720 frames (default); small: 320×180, faster")
    rollout.add_argument("--video", type=Path, help="folder to write an MP4 of every policy rollout into")
    rollout.add_argument("--perturb", metavar="CONDITIONS", help="the robustness suite: 'all' or a comma-separated list "
                         "of conditions (dim, bright, floor_and_walls, obstacle_colour, distractors, camera_lower, "
                         "camera_higher, camera_tilt, noise, blur, paraphrase); drives the policy as trained and under "
                         "each, one row per condition (no baselines)")
    rollout.add_argument("--no-baselines", action="store_true", help="drive the policy only: no baselines, no sight ablations")
    rollout.add_argument("--json", action="store_true", help="one JSON object per rollout, the baselines' too (each "
                         "naming its driver), then a summary object")
    rollout.set_defaults(run=cmd_rollout)

    serve = commands.add_parser("serve", help="serve a policy to robots over WebSocket (msgpack; openpi-client "
                                "compatible): each connection a session, frames of many robots batched")
    serve.add_argument("model_uri", help="models:/<name>@<alias>, models:/<name>/<version>, a policy directory "
                       "or a deploy bundle")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; any other needs an "
                       "API key)")
    serve.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0: any free one)")
    serve.add_argument("--api-key-file", type=Path, help="file whose first line is the API key (else "
                       "$VLA_SERVE_API_KEY); robots send 'Authorization: Api-Key <key>'")
    serve.add_argument("--max-batch", type=int, default=8, help="most robots' frames encoded in one batch (default 8)")
    serve.add_argument("--max-wait-ms", type=float, default=2.0, help="how long a frame waits for other robots' "
                       "frames to batch with, while others are connected (default 2)")
    serve.add_argument("--max-message-mb", type=float, default=16.0, help="largest request, MiB (default 16)")
    serve.add_argument("--rate-every-s", type=float, default=30.0, help="seconds between rate lines (default 30)")
    serve.add_argument("--drain-timeout-s", type=float, default=30.0, help="on SIGTERM, how long the requests in "
                       "flight may take before it exits (default 30)")
    serve.set_defaults(run=cmd_serve)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except SettingsError as error:  # a VLA_* variable with a value it cannot take
        print(f"error: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
        return 0
    except Exception as error:
        # mlflow takes seconds to import, so only commands that use it do: if it is not loaded,
        # the error cannot be one of its own.
        mlflow_errors = sys.modules.get("mlflow.exceptions")
        if mlflow_errors is None or not isinstance(error, mlflow_errors.MlflowException):
            raise
        from .tracking import tracking_uri

        print(f"error: MLflow registry at {tracking_uri()}: {' '.join(error.message.split())}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
