"""The closed-loop asset: the trained policy drives the simulated robot, beside three drivers
that need no model, in the same scenes (`vla_pipeline.evaluation.closed_loop`)."""

import json
from pathlib import Path
from typing import Literal

import dagster as dg
from pydantic import Field

from assets.ui import log_to_training_run, metadata_plot, metadata_table
from resources import ComputeResource, WindowStoreResource
from vla_pipeline.evaluation.report import Table
from vla_pipeline.training.split import Split

RATE_COLUMNS = ("success_rate", "spl", "collision_rate", "wrong_side_rate", "lost_rate", "stopped_away_rate",
                "timeout_rate", "invalid_action_rate", "controller_error_rate")


class ClosedLoopConfig(dg.Config):
    env: str = Field(default="auto", description=(
        '"auto": the simulated world the stored episodes were rendered in (the sample episodes name it); '
        'skipped for robot episodes. "vla_pipeline/BoxNav-v1" (the sample episodes\' world, where only the camera '
        'tells the geometry) or "vla_pipeline/BoxNav-v0" drives there whatever the data; "none" skips'))
    episodes: int = Field(default=48, ge=1, le=2000, description="rollouts, spread evenly over side × distance × boxes")
    seed: int = Field(default=0, description="the plan's seed: the same seed gives the same scenes")
    envs: int = Field(default=2, ge=1, le=32, description="environments stepped at once (worker processes)")
    camera: Literal["720p", "small"] = Field(default="720p", description=(
        '"720p": frames at the collector\'s 1280×720; "small": 320×180, faster, for quick looks'))


def _rates_table(summary: dict) -> Table:
    from vla_pipeline.evaluation.closed_loop import driver_rows

    return Table(["driver", *RATE_COLUMNS], [[name, *(f"{rates[key]:.3f}" for key in RATE_COLUMNS)]
                                           for name, rates in driver_rows(summary)])


def _cells_table(summary: dict) -> Table:
    cells = summary["policy"]["per_cell"]
    names = list(summary["baselines"])
    return Table(["cell", "rollouts", "policy success", "policy SPL", *(f"{n} success" for n in names)],
                 [[cell, str(rates["rollouts"]), f"{rates['success_rate']:.2f}", f"{rates['spl']:.2f}",
                   *(f"{summary['baselines'][n]['per_cell'].get(cell, {}).get('success_rate', float('nan')):.2f}"
                     for n in names)] for cell, rates in cells.items()])


def driving_world(config, split: Split, window_store: WindowStoreResource) -> tuple[str | None, str]:
    """(the world to drive in, or None; why) from a config's `env` (auto, none or a world id)."""
    from vla_pipeline.evaluation.closed_loop import WORLDS, world_of_episodes

    if config.env == "none":
        return None, "closed loop off in config (env: none)"
    if config.env != "auto":
        if config.env not in WORLDS:
            raise dg.Failure(f"closed_loop env {config.env!r}: unknown; expected auto, none or one of {', '.join(WORLDS)}")
        return config.env, f"env {config.env} set in config"
    store = window_store.open()
    return world_of_episodes([store.episode_attrs(i) for i in split.train + split.val])


@dg.asset(group_name="evaluation", kinds={"gymnasium", "mlflow"})
def closed_loop_metrics(
    context: dg.AssetExecutionContext,
    config: ClosedLoopConfig,
    lora_adapter: str,
    train_val_split: dict,
    window_store: WindowStoreResource,
    compute: ComputeResource,
) -> dg.Output:
    """The policy driven in the simulated world the data comes from: success rate, SPL and the
    rate of every other outcome, overall and per scenario cell, beside the scripted guide (the
    ceiling), the best blind driver found by search (the ceiling of every driver that ignores the
    camera), a naive side-aware script and always-forward (the floor); then the policy again with
    its camera frozen on the first frame and blanked (the sight ablations). Skipped, with the
    reason, where the episodes come from no simulated world (the robot's)."""
    split = Split.from_dict(train_val_split)
    world, why = driving_world(config, split, window_store)
    if world is None:
        context.log.info(f"closed loop skipped: {why}")
        return dg.Output({"env": None, "skipped": why}, metadata={"skipped": why})

    from vla_pipeline.evaluation.closed_loop import closed_loop
    from vla_pipeline.policy.model import load_policy_dir
    from vla_pipeline.policy.serving import StreamingPolicy
    from vla_pipeline.sim.report import paths_figure
    from vla_pipeline.sim.rollout import RolloutsFailed

    policy = StreamingPolicy(load_policy_dir(lora_adapter).to(compute.plan().device))
    # Each run writes into a folder of its own: nothing of an earlier run is uploaded with it.
    out_dir = Path(lora_adapter).parent / "closed_loop" / context.run_id
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        report = closed_loop(policy, config.episodes, config.seed, config.envs, camera=config.camera, env_id=world,
                             video_dir=out_dir, log=context.log.info)
    except RolloutsFailed as error:
        raise dg.Failure(f"closed loop in {world}: {error}", allow_retries=False) from error
    summary, numbers = report.summary, report.headline()
    figure = out_dir / "paths.png"
    figure.write_bytes(paths_figure(report.policy))
    videos = {kind: path.replace(out_dir / f"{kind}.mp4") for kind, path in report.videos.items()}
    (out_dir / "closed_loop.json").write_text(json.dumps(report.record(), indent=1))

    mlflow_link = log_to_training_run(context, lora_adapter, numbers, out_dir, f"closed_loop/{context.run_id}")
    return dg.Output(
        {**report.conditions(), "skipped": None, "summary": summary, "headline": numbers},
        metadata={
            "env": world,
            "why": why,
            "rollouts": report.episodes,
            "success_rate": numbers["closed_loop_success_rate"],
            "spl": numbers["closed_loop_spl"],
            **{key: numbers[f"closed_loop_{key}"] for key in RATE_COLUMNS if key not in ("success_rate", "spl")},
            **{f"{name}_camera_success": numbers[f"closed_loop_{name}_success"] for name in report.ablations},
            **({"best_blind_success": numbers["closed_loop_best_blind_success_rate"]}
               if "closed_loop_best_blind_success_rate" in numbers else {}),
            "camera": report.conditions()["camera"]["name"],
            "records": dg.MetadataValue.path(str(out_dir)),
            "policy_vs_baselines": metadata_table(_rates_table(summary)),
            "per_cell": metadata_table(_cells_table(summary)),
            "paths": metadata_plot(context, figure, "top-down paths, coloured by outcome"),
            **{f"video_{kind}": dg.MetadataValue.path(str(path)) for kind, path in videos.items()},
            **mlflow_link,
        },
    )
