"""The robustness asset: the trained policy judged under the changes a real room brings
(`vla_pipeline.evaluation.robustness`), in closed loop where the data has a simulated world and
offline on the validation episodes always."""

import json
from pathlib import Path
from typing import Literal

import dagster as dg
from pydantic import Field

from assets.closed_loop import driving_world
from assets.ui import log_to_training_run, metadata_plot, metadata_table
from resources import ComputeResource, WindowStoreResource
from vla_pipeline.evaluation.report import Table
from vla_pipeline.training.split import Split


class RobustnessConfig(dg.Config):
    env: str = Field(default="auto", description=(
        '"auto": the simulated world the stored episodes were rendered in; the closed-loop part is skipped for '
        'robot episodes (the offline part always runs). A world id drives there whatever the data; "none" skips'))
    conditions: str = Field(default="all", description=(
        '"all" or a comma-separated list of dim, bright, floor_and_walls, obstacle_colour, distractors, '
        'camera_lower, camera_higher, camera_tilt, noise, blur, paraphrase'))
    episodes: int = Field(default=12, ge=1, le=2000, description=(
        "closed-loop rollouts per condition: 12 drives each side × distance × boxes cell once; 24 or more for "
        "finer rates (vla-pipeline rollout --perturb all --episodes 24)"))
    seed: int = Field(default=0, description="the plan's seed: the same seed gives the same scenes")
    envs: int = Field(default=2, ge=1, le=32, description="environments stepped at once (worker processes)")
    camera: Literal["720p", "small"] = Field(default="720p", description=(
        '"720p": frames at the collector\'s 1280×720; "small": 320×180, faster, for quick looks'))


def closed_table(summary: dict) -> Table:
    return Table(["condition", "success", "SPL", "collision", "wrong side", "lost", "stopped away", "what changes"],
                 [[name, f"{r['success_rate']:.2f}", f"{r['spl']:.2f}", f"{r['collision_rate']:.2f}",
                   f"{r['wrong_side_rate']:.2f}", f"{r['lost_rate']:.2f}", f"{r['stopped_away_rate']:.2f}",
                   r["description"]]
                  for name, r in summary.items()])


def offline_table(offline: dict) -> Table:
    from vla_pipeline.evaluation.robustness import GOAL_ACCURACY_DROP

    rows = [["as recorded", f"{offline['unperturbed']:.3f}", "", "", "the validation frames and instructions"]]
    entries = dict(offline["perturbations"])
    if not offline["paraphrase"].get("skipped"):
        entries["paraphrase"] = offline["paraphrase"]
    for name, entry in entries.items():
        rows.append([name, f"{entry['accuracy']:.3f}", f"{entry['drop']:+.3f}",
                     "yes" if entry["drop"] <= GOAL_ACCURACY_DROP else "no", entry["description"]])
    if offline["paraphrase"].get("skipped"):
        rows.append(["paraphrase", "skipped", "", "", offline["paraphrase"]["skipped"]])
    return Table(["perturbation", "accuracy", "drop", f"within {GOAL_ACCURACY_DROP:.2f}", "what changes"], rows)


@dg.asset(group_name="evaluation", kinds={"gymnasium", "mlflow"})
def robustness(
    context: dg.AssetExecutionContext,
    config: RobustnessConfig,
    lora_adapter: str,
    train_val_split: dict,
    window_store: WindowStoreResource,
    compute: ComputeResource,
) -> dg.Output:
    """The policy under the changes a real room brings. Offline, for any data: the first-step
    direction accuracy on the validation episodes with each image perturbation (brightness ±40%, a
    colour cast, blur, a shift, a crop, a rotation) and a held-out wording of the instruction. In
    closed loop, where the data comes from a simulated world: success, SPL and collisions as trained
    and under each condition (light, floor and walls, obstacle colour, distractors, camera height
    and pitch, noise, blur, held-out wordings), in the same scenes, with a frame of each."""
    from vla_pipeline.evaluation.robustness import (
        bar_chart, frames_figure, offline_headline, offline_robustness, robustness_rollouts)
    from vla_pipeline.policy.model import load_policy_dir
    from vla_pipeline.policy.serving import StreamingPolicy
    from vla_pipeline.sim.perturb import parse_conditions
    from vla_pipeline.sim.rollout import RolloutsFailed

    try:
        conditions = parse_conditions(config.conditions)
    except ValueError as error:
        raise dg.Failure(f"robustness conditions: {error}", allow_retries=False) from None
    split = Split.from_dict(train_val_split)
    policy = load_policy_dir(lora_adapter).to(compute.plan().device)
    out_dir = Path(lora_adapter).parent / "robustness" / context.run_id
    out_dir.mkdir(parents=True, exist_ok=True)

    if split.val:
        offline = offline_robustness(policy, window_store.open().path, split.val, progress=context.log.info)
        numbers = offline_headline(offline)
    else:
        offline, numbers = None, {}
        context.log.info("offline robustness skipped: no validation episodes")
    world, why = driving_world(config, split, window_store)
    closed = None
    if world is None:
        context.log.info(f"closed-loop robustness skipped: {why}")
    else:
        try:
            report = robustness_rollouts(StreamingPolicy(policy), conditions, config.episodes, config.seed,
                                         config.envs, config.camera, world, log=context.log.info)
        except RolloutsFailed as error:
            raise dg.Failure(f"robustness in {world}: {error}", allow_retries=False) from error
        closed = report.record()
        numbers.update(report.headline())
        (out_dir / "conditions.png").write_bytes(frames_figure(report.frames, closed["robustness"]))
    if offline or closed:
        (out_dir / "robustness.png").write_bytes(bar_chart(closed and closed["robustness"], offline))
    (out_dir / "robustness.json").write_text(json.dumps({"offline": offline, "closed_loop": closed}, indent=1))

    mlflow_link = log_to_training_run(context, lora_adapter, numbers, out_dir, f"robustness/{context.run_id}")

    worst = closed["worst"] if closed else None
    value = {"env": world, "skipped": None if world else why, "offline": offline, "headline": numbers,
             "closed_loop": {key: item for key, item in closed.items() if key != "rollouts"} if closed else None}
    metadata = {
        "env": world or "none",
        "closed_loop": f"{closed['episodes']} rollouts per condition" if closed else f"skipped: {why}",
        **({"worst_condition": worst["condition"], "worst_success": worst["success_rate"],
            "mean_success": closed["mean_success"],
            "per_condition": metadata_table(closed_table(closed["robustness"])),
            "condition_frames": metadata_plot(context, out_dir / "conditions.png",
                                              "the first scene's start frame under each condition")} if closed else {}),
        **({"offline_unperturbed_accuracy": offline["unperturbed"],
            "offline_worst_perturbation": offline["worst"],
            "offline_worst_drop": offline["perturbations"][offline["worst"]]["drop"],
            "offline_per_perturbation": metadata_table(offline_table(offline))} if offline else
           {"offline": "skipped: no validation episodes"}),
        **({"chart": metadata_plot(context, out_dir / "robustness.png", "success and accuracy per condition")}
           if offline or closed else {}),
        "records": dg.MetadataValue.path(str(out_dir)),
        **mlflow_link,
    }
    return dg.Output(value, metadata=metadata)
