"""Does the CPU preset learn the task? Trained as the pipeline trains it, scored on fresh episodes.

    .venv/bin/python benchmarks/learning.py [--episodes 40] [--seed 0] [--other 12] [--other-seed 1234]
                                            [--policy key=value ...] [--train key=value ...] [--json PATH]
                                            [--closed-loop 48] [--closed-loop-seed 11] [--robustness 24]
                                            [--vision key=value ...] [--every-epoch 24 7 11 ...]
                                            [--score-every K] [--keep DIR]

Writes N sample episodes (seed --seed) and 12 of another seed, ingests both with the store's
default rules, splits the first set as `train_val_split` does (val_fraction 0.2) and trains
`PolicyConfig.cpu()` with `TrainConfig.cpu()` — what `VLA_MODEL=cpu` materializes —
through the real `train()`. After every epoch the policy is scored through the real
`evaluate()` on the validation episodes and on the other seed's episodes: first-step direction
accuracy (the learning curve), against the best constant baseline and the scripted replay of
the training episodes, and the instruction flip; the kept policy's table adds the stop press's
recall and precision (the share of the operator's stops it makes, and of its stops that are his:
a policy that stops early or never stops shows it here before it is driven). Then the kept
policy drives in the sample episodes' world over `plan(--closed-loop, --closed-loop-seed)`
beside the model-free drivers (the best blind one included) and with its camera frozen and
blanked, as `closed_loop_metrics` drives it (`--closed-loop 0` skips it). The kept policy's robustness follows: offline, the
accuracy under each image perturbation and a held-out wording on both episode sets; in closed loop,
success over plan(--robustness, --closed-loop-seed) as trained and under every condition of
`sim.perturb.CONDITIONS` (`--robustness 0` skips the closed-loop part). --policy/--train override
preset fields (e.g. `--policy action_head=regression side_loss_weight=0`, `--train brightness=0
contrast=0 saturation=0 hue=0 crop_scale=1 blur_prob=0 paraphrase_prob=0` for no augmentation
but the mirror) to measure what a choice buys; --vision overrides the small backbone's vision tower
(e.g. `--vision image_size=224`). `--every-epoch N SEED [SEED ...]` also drives the policy
after every epoch over plan(N, SEED) for each seed (the policy alone: no baselines, no ablations),
to see whether the epoch that drives best on one seed's scenes drives best on another's;
`--score-every K` scores (and drives) after every K-th epoch and the last only; `--keep DIR` copies the
kept policy to DIR, to drive it again (`vla-pipeline rollout DIR`). Always exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from vla_pipeline.data.ingest import ingest_episodes
from vla_pipeline.data.store import WindowStore
from vla_pipeline.evaluation.evaluate import evaluate
from vla_pipeline.evaluation.replay import ScriptedReplay
from vla_pipeline.evaluation.robustness import IMAGE_PERTURBATIONS, offline_robustness, robustness_rollouts
from vla_pipeline.policy.backbone import LOCAL_BACKBONES
from vla_pipeline.policy.serving import StreamingPolicy
from vla_pipeline.policy.policy_config import PolicyConfig
from vla_pipeline.sim.operator import SAMPLE_WORLD, write_sample_episodes
from vla_pipeline.sim.varied import ARRIVAL_DISTANCE
from vla_pipeline.training.split import split_from_store
from vla_pipeline.training.train import train
from vla_pipeline.training.train_config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "out"


def overrides(pairs: list[str]) -> dict:
    """key=value pairs; values parsed as JSON where they can be (numbers, true/false), else text."""
    parsed = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        try:
            parsed[key] = json.loads(value)
        except json.JSONDecodeError:
            parsed[key] = value
    return parsed


def stored(n: int, seed: int, workdir: Path) -> tuple[Path, list[str]]:
    """A store of n sample episodes of `seed` (episodes written once under benchmarks/out)."""
    folder = OUT / f"episodes-{SAMPLE_WORLD.rpartition('-')[2]}-n{n}-seed{seed}"
    if not folder.is_dir():
        partial = OUT / f".partial-{folder.name}"
        shutil.rmtree(partial, ignore_errors=True)
        write_sample_episodes(partial, n, seed)
        partial.rename(folder)
    store = workdir / f"store-n{n}-seed{seed}.zarr"
    ingest_episodes(sorted(folder.glob("*.h5")), store, workers=2)
    return store, WindowStore(store).episode_ids()


def scores(metrics: dict) -> dict:
    first = metrics["model"]["first"]["direction_accuracy"]
    constant = max(b["first"]["direction_accuracy"] for b in metrics["baselines"].values())
    return {"accuracy": first, "best_constant": constant, "margin": first - constant,
            "replay": metrics["scripted_replay"]["first"]["direction_accuracy"],
            "flip": metrics["instruction_sensitivity"].get("flip_fraction_first", 0.0),
            "predictions": metrics["predictions"],
            "sight_reliance": (metrics.get("sight_reliance") or {}).get("drop"),
            # the stop press: how many of the operator's stops it makes, and how many of its stops are his
            "stop_recall": metrics["model"]["first"]["recall"]["STOP"],
            "stop_precision": metrics["model"]["first"]["precision"]["STOP"]}


def _rate(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def drive(policy, episodes: int, seed: int) -> dict:
    """The policy in closed loop in the sample episodes' world, as closed_loop_metrics drives it."""
    from collections import Counter

    from vla_pipeline.evaluation.closed_loop import closed_loop

    report = closed_loop(StreamingPolicy(policy), episodes, seed, envs=2, env_id=SAMPLE_WORLD, log=lambda line: None)
    summary = report.summary
    outcomes = Counter(result.outcome for result in report.policy)
    rates = {"policy": summary["policy"]["success_rate"],
             **{name: found["success_rate"] for name, found in summary["baselines"].items()},
             **{f"{name} camera": found["success_rate"] for name, found in summary["ablations"].items()}}
    print(f"\nclosed loop in {SAMPLE_WORLD}, plan({episodes}, {seed}): success "
          + ", ".join(f"{name} {rate:.3f}" for name, rate in rates.items()))
    print("policy outcomes: " + ", ".join(f"{outcome} {count}" for outcome, count in outcomes.most_common()))
    # Why a stop was not an arrival (sim.varied.arrival): the distance, or the target off to one side.
    def why(reason: str) -> str:
        found = re.search(r"stopped ([0-9.]+) m from the target", reason)
        if not found:
            return "target off to one side"
        # against the arrival window's middle: the message rounds, so 0.598 m reads "0.60"
        return "too near" if float(found.group(1)) < sum(ARRIVAL_DISTANCE) / 2 else "too far"

    misses = Counter(why(result.reason or "") for result in report.policy if result.outcome == "stopped_away")
    if misses:
        print("stopped away: " + ", ".join(f"{why} {count}" for why, count in misses.most_common()))
    return {"success": rates, "outcomes": dict(outcomes), "stopped_away": dict(misses), "spl": summary["policy"]["spl"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=40, help="training sample episodes (default 40)")
    parser.add_argument("--seed", type=int, default=0, help="their seed (default 0)")
    parser.add_argument("--other", type=int, default=12, help="fresh episodes of another seed to score on (default 12)")
    parser.add_argument("--other-seed", type=int, default=1234, help="their seed (default 1234)")
    parser.add_argument("--policy", nargs="*", default=[], help="PolicyConfig.cpu() overrides, key=value")
    parser.add_argument("--train", nargs="*", default=[], help="TrainConfig.cpu() overrides, key=value")
    parser.add_argument("--vision", nargs="*", default=[], help="the CPU preset backbone's vision-tower overrides, "
                        "key=value (e.g. image_size=224: no area-averaging of the 224×224 frames to 112×112)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--closed-loop", type=int, default=48, help="closed-loop rollouts of the kept policy "
                        "(default 48; 0: none)")
    parser.add_argument("--closed-loop-seed", type=int, default=11, help="their plan's seed (default 11)")
    parser.add_argument("--robustness", type=int, default=24, help="closed-loop rollouts per robustness condition "
                        "(default 24; 0: none)")
    parser.add_argument("--score-every", type=int, default=1, metavar="K",
                        help="score (and drive, with --every-epoch) after every K-th epoch and the last only (default 1)")
    parser.add_argument("--keep", type=Path, metavar="DIR",
                        help="copy the kept policy here (for `vla-pipeline rollout DIR`); the folder must not exist")
    parser.add_argument("--every-epoch", nargs="+", type=int, default=[], metavar="N SEED",
                        help="after every epoch, drive the policy alone over plan(N, SEED) for each SEED")
    args = parser.parse_args()
    if len(args.every_epoch) == 1:
        parser.error("--every-epoch: give the rollout count, then at least one plan seed")
    if args.keep is not None and args.keep.exists():
        parser.error(f"--keep {args.keep}: already exists")
    count, *seeds = args.every_epoch or [0]
    torch.set_num_threads(2)
    if args.vision:  # another small backbone, built once in a folder of its own
        vision = overrides(args.vision)
        LOCAL_BACKBONES["small"]["vision"].update(vision)
        os.environ["VLA_SMALL_BACKBONE"] = str(Path(tempfile.gettempdir()) / (
            "vla_pipeline-kosmos2-small-" + "-".join(f"{key}{value}" for key, value in sorted(vision.items()))))

    workdir = Path(tempfile.mkdtemp(prefix="vla-learning-"))
    OUT.mkdir(parents=True, exist_ok=True)
    train_store, train_pool = stored(args.episodes, args.seed, workdir)
    other_store, other_ids = stored(args.other, args.other_seed, workdir)
    split = split_from_store(WindowStore(train_store), None, 0.2)
    policy_config = PolicyConfig.cpu(**overrides(args.policy))
    train_config = TrainConfig.cpu(**overrides(args.train))
    print(f"{len(split.train)} train / {len(split.val)} val episodes of seed {args.seed} "
          f"({args.episodes - len(train_pool)} rejected), {len(other_ids)} episodes of seed {args.other_seed}; "
          f"policy overrides {args.policy or 'none'}, train overrides {args.train or 'none'}", flush=True)
    mean = WindowStore(train_store).action_stats(split.train).mean.tolist()
    replay = ScriptedReplay.from_store(WindowStore(train_store), split.train)
    curve = []

    def score_epoch(record: dict, policy) -> None:
        if record["epoch"] % args.score_every and record["epoch"] != train_config.epochs:
            return
        row = {"epoch": record["epoch"], "seconds": time.perf_counter() - started,
               "val": scores(evaluate(policy, train_store, split.val, mean, replay=replay,
                                      sight_ablations=False).metrics),
               "other": scores(evaluate(policy, other_store, other_ids, mean, replay=replay,
                                        sight_ablations=False).metrics)}
        if args.every_epoch:
            from vla_pipeline.evaluation.closed_loop import closed_loop
            from vla_pipeline.sim.rollout import summarise

            was_training = policy.training
            row["driven"] = {seed: summarise(closed_loop(
                StreamingPolicy(policy), count, seed, envs=2, env_id=SAMPLE_WORLD, baselines=False,
                ablations=False, log=lambda line: None).policy)["success_rate"] for seed in seeds}
            policy.train(was_training)
        curve.append(row)
        print(f"epoch {row['epoch']:>2} ({row['seconds']:5.0f} s): val accuracy {row['val']['accuracy']:.3f}, "
              f"other-seed accuracy {row['other']['accuracy']:.3f}, flip {row['val']['flip']:.2f} / "
              f"{row['other']['flip']:.2f}" + "".join(f", plan({count}, {seed}) {rate:.3f}"
                                                     for seed, rate in row.get("driven", {}).items()), flush=True)

    started = time.perf_counter()
    result = train(policy_config, train_config, train_store, split.train, split.val, workdir / "run",
                   log=lambda line: None, on_epoch=score_epoch)
    scoring = len(curve)  # per-epoch scoring is included in the wall time below
    if args.every_epoch:  # the epoch each plan would choose, and how it drives the other plans' scenes
        for seed in seeds:
            chosen = max(curve, key=lambda row: row["driven"][seed])  # the earliest of the best
            print(f"chosen by plan({count}, {seed}): epoch {chosen['epoch']} "
                  + ", ".join(f"plan({count}, {other}) {chosen['driven'][other]:.3f}" for other in seeds))
    from vla_pipeline.policy.model import load_policy_dir

    final = load_policy_dir(workdir / "run" / "policy")
    if args.keep is not None:
        shutil.copytree(workdir / "run" / "policy", args.keep)
        print(f"kept policy copied to {args.keep}", flush=True)
    summary = {name: scores(evaluate(final, store, ids, mean, replay=replay).metrics)
               for name, store, ids in (("val", train_store, split.val), ("other", other_store, other_ids))}
    print(f"\nkept policy ({train_config.keep} epoch, as lora_adapter keeps it), {result.epochs} epochs in "
          f"{result.seconds:.0f} s of training ({scoring} per-epoch scorings included):")
    print(f"{'episodes':<22} {'predictions':>11} {'accuracy':>9} {'best constant':>14} {'margin':>7} "
          f"{'scripted replay':>16} {'flip':>5} {'sight reliance':>15} {'stop recall':>12} {'stop precision':>15}")
    for name, label in (("val", f"validation (seed {args.seed})"), ("other", f"other seed {args.other_seed}")):
        s = summary[name]
        print(f"{label:<22} {s['predictions']:>11} {s['accuracy']:>9.3f} {s['best_constant']:>14.3f} "
              f"{s['margin']:>+7.3f} {s['replay']:>16.3f} {s['flip']:>5.2f} {s['sight_reliance']:>+15.3f} "
              f"{_rate(s['stop_recall']):>12} {_rate(s['stop_precision']):>15}")
    offline = {name: offline_robustness(final, store, ids) for name, store, ids in
               (("val", train_store, split.val), ("other", other_store, other_ids))}
    print("\noffline robustness (first-step direction accuracy):")
    print(f"{'episodes':<22} {'as recorded':>11} " + " ".join(f"{name:>11}" for name in (*IMAGE_PERTURBATIONS, "paraphrase")))
    for name, found in offline.items():
        cells = [found["perturbations"][p]["accuracy"] for p in IMAGE_PERTURBATIONS]
        worded = found["paraphrase"].get("accuracy", float("nan"))
        print(f"{name:<22} {found['unperturbed']:>11.3f} " + " ".join(f"{value:>11.3f}" for value in (*cells, worded)))
    driven = drive(final, args.closed_loop, args.closed_loop_seed) if args.closed_loop else None
    robust = None
    if args.robustness:
        report = robustness_rollouts(StreamingPolicy(final), episodes=args.robustness, seed=args.closed_loop_seed,
                                     env_id=SAMPLE_WORLD, log=lambda line: print(line, flush=True))
        robust = {"summary": report.summary, "worst": report.worst(), "mean": report.mean()}
        print(f"robustness, plan({args.robustness}, {args.closed_loop_seed}): worst {robust['worst'][0]} "
              f"{robust['worst'][1]:.3f}, mean {robust['mean']:.3f}")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json), "keep": args.keep and str(args.keep)}, "curve": curve,
                                         "summary": summary, "train_seconds": result.seconds,
                                         "closed_loop": driven, "offline_robustness": offline,
                                         "robustness": robust}, indent=1))
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
