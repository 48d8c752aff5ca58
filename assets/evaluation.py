"""Evaluation assets: the trained policy scored against constant baselines on the validation
episodes, and its registration in the MLflow model registry behind a promotion gate."""

import hashlib
import json
from pathlib import Path

import dagster as dg
from pydantic import Field

from assets.ui import log_to_training_run, metadata_plot, metadata_table
from resources import ComputeResource, WindowStoreResource
from vla_pipeline.evaluation import gate
from vla_pipeline.evaluation.metrics import DEFAULT_DEAD_BAND
from vla_pipeline.evaluation.report import (
    CONFUSION_PLOT, PREDICTIONS_PLOT, confusion_table, group_table, markdown, per_class_table, per_dimension_table,
    sensitivity_table, sight_table, summary_table, write_report,
)
from vla_pipeline.policy.policy_config import ACTION_STATS_FILE
from vla_pipeline.training.split import Split
from vla_pipeline.settings import settings
from vla_pipeline.tracking import data_snapshot, experiment_id, git_commit, run_link, training_run_id


class EvaluationConfig(dg.Config):
    dead_band: float = Field(default=DEFAULT_DEAD_BAND, description="fraction of the action scale that counts as 0")


def _load(policy_dir, compute: ComputeResource):
    from vla_pipeline.policy.model import load_policy_dir

    policy = load_policy_dir(policy_dir)
    return policy.to(compute.plan().device)


def _train_mean(policy_dir) -> list[float]:
    stats = json.loads((Path(policy_dir) / ACTION_STATS_FILE).read_text())
    return stats["mean"]


def _evaluate(policy_dir, split: Split, window_store: WindowStoreResource, compute, dead_band, log,
              sight_ablations: bool = True):
    if not split.val:
        raise dg.Failure("the split has no validation episodes: ingest more episodes or raise val_fraction")
    from vla_pipeline.evaluation.evaluate import evaluate
    from vla_pipeline.evaluation.replay import ScriptedReplay

    policy = _load(policy_dir, compute)
    store = window_store.open()
    return evaluate(policy, store.path, split.val, _train_mean(policy_dir), dead_band, progress=log,
                    replay=ScriptedReplay.from_store(store, split.train), sight_ablations=sight_ablations)


@dg.asset(group_name="evaluation", kinds={"mlflow"})
def evaluation_metrics(
    context: dg.AssetExecutionContext,
    config: EvaluationConfig,
    lora_adapter: str,
    train_val_split: dict,
    window_store: WindowStoreResource,
    compute: ComputeResource,
) -> dg.Output:
    """Direction accuracy (9 classes with a dead band), MSE/MAE/RMSE per dimension, constant
    baselines on the same frames, left↔right instruction sensitivity, sight ablations (the
    accuracy from the episode's first frame alone and from another validation episode's frames:
    `sight_reliance` is the smaller drop), and per-side and per-scenario breakdowns on the
    validation episodes. Logged to the training's MLflow run."""
    from vla_pipeline.evaluation.evaluate import headline

    split = Split.from_dict(train_val_split)
    evaluation = _evaluate(lora_adapter, split, window_store, compute, config.dead_band, context.log.info)
    result = evaluation.metrics
    val_key = hashlib.sha256(json.dumps([sorted(split.val), config.dead_band]).encode()).hexdigest()[:10]
    report_dir = write_report(evaluation, Path(lora_adapter).parent / "evaluation" / val_key)
    numbers = headline(result)
    mlflow_link = log_to_training_run(context, lora_adapter, {f"eval_{key}": value for key, value in numbers.items()},
                                      report_dir, "evaluation")
    margin, sight = result["margin"]["first"], result["sight_reliance"]
    other = sight["other_episodes"]
    context.log.info(
        f"direction accuracy {numbers['direction_accuracy_first']:.3f} (first step, "
        f"{numbers['predictions']:.0f} validation predictions), "
        f"{margin['direction_accuracy_margin']:+.3f} over the best constant baseline ({margin['best_accuracy_baseline']}), "
        f"scripted replay {numbers.get('baseline_scripted_replay_direction_accuracy_first', float('nan')):.3f}, "
        f"instruction flip {numbers.get('instruction_flip_fraction_first', float('nan')):.2f}, "
        f"sight reliance {sight['drop']:+.3f} (first frame only {sight['first_frame']:.3f}, another episode's frames "
        + (f"{other:.3f})" if other is not None else f"not run: {sight['other_episodes_skipped']})")
    )
    return dg.Output(
        {"policy_dir": lora_adapter, "val_episodes": split.val, "headline": numbers, "metrics": result},
        metadata={
            "direction_accuracy_first": numbers["direction_accuracy_first"],
            "direction_accuracy_all": numbers["direction_accuracy_all"],
            "margin_over_best_baseline": numbers["direction_accuracy_margin_first"],
            "best_baseline": margin["best_accuracy_baseline"],
            "scripted_replay_accuracy_first": numbers.get("baseline_scripted_replay_direction_accuracy_first", float("nan")),
            "mse_first": numbers["mse_first"],
            "instruction_flip_fraction": numbers.get("instruction_flip_fraction_first", float("nan")),
            "sight_reliance": numbers["sight_reliance"],
            "direction_accuracy_first_frame": numbers["direction_accuracy_first_frame"],
            "direction_accuracy_other_episode": numbers["direction_accuracy_other_episode"] if other is not None
            else dg.MetadataValue.text(f"not run: {sight['other_episodes_skipped']}"),
            "sight_ablations": metadata_table(sight_table(sight)),
            "val_episodes": result["episodes"],
            "predictions": result["predictions"],
            "predictions_plot": metadata_plot(context, report_dir / PREDICTIONS_PLOT, "predicted vs recorded"),
            "confusion_plot": metadata_plot(context, report_dir / CONFUSION_PLOT, "confusion matrix"),
            "model_vs_baselines_first_step": metadata_table(summary_table(result)),
            "model_vs_baselines_all_steps": metadata_table(summary_table(result, "all")),
            "instruction_sensitivity": metadata_table(sensitivity_table(result["instruction_sensitivity"])),
            "errors_per_dimension": metadata_table(per_dimension_table(result)),
            "direction_classes": metadata_table(per_class_table(result)),
            "confusion_matrix": metadata_table(confusion_table(result)),
            "by_side_first_step": metadata_table(group_table(result["by_side"], "side")),
            "by_scenario_first_step": metadata_table(group_table(result["by_scenario"], "scenario")),
            "report": dg.MetadataValue.path(str(report_dir / "report.md")),
            **mlflow_link,
        },
    )


class RegistryConfig(dg.Config):
    model_name: str = Field(default_factory=lambda: settings().registered_model or gate.DEFAULT_MODEL_NAME)
    min_accuracy_margin: float = Field(
        default=0.05, description="first-step direction accuracy the model must gain over the best constant baseline")
    require_beating_replay: bool = Field(
        default=False, description="also require a first-step direction accuracy above the scripted replay's")
    min_closed_loop_success: float = Field(
        default=gate.DEFAULT_MIN_CLOSED_LOOP_SUCCESS, ge=0.0, le=1.0,
        description="where the data comes from a simulated world: the closed-loop success rate required")
    min_closed_loop_rollouts: int = Field(
        default=gate.DEFAULT_MIN_CLOSED_LOOP_ROLLOUTS, ge=1, description=(
            "where the data comes from a simulated world: the fewest closed-loop rollouts (closed_loop_metrics' "
            "episodes) whose success rate counts; from fewer, the version stays challenger"))
    min_margin_over_blind: float = Field(
        default=gate.DEFAULT_MIN_MARGIN_OVER_BLIND, ge=0.0, le=1.0, description=(
            "where the data comes from a simulated world: the closed-loop success rate the policy must gain over "
            f"the best driver blind to the image ({gate.BEST_BLIND_SUCCESS}, same scenes); where that was not "
            "recorded, the version stays challenger"))


def _version_tags(numbers: dict, split: Split, lora_adapter: str, snapshot: dict) -> dict[str, str]:
    tags = {f"metric.{key}": f"{value:.4f}" for key, value in numbers.items()}
    tags.update({
        "training_fingerprint": Path(lora_adapter).parent.name,
        "git_commit": git_commit(),
        "split": json.dumps({"train_episodes": len(split.train), "val_episodes": len(split.val),
                             "val_fraction": split.val_fraction}),
        "split_val_episodes": ",".join(split.val)[:4900],
        **{key: str(value) for key, value in snapshot.items()},
    })
    return tags


def _sight_tags(result: dict) -> dict[str, str]:
    # Always set, so that a re-gated version never keeps an earlier gating's word for it.
    skipped = result["sight_reliance"]["other_episodes_skipped"]
    return {"sight_other_episode": f"skipped: {skipped}" if skipped else "the next validation episode's frames"}


def _closed_loop_tags(closed_loop_metrics: dict) -> dict[str, str]:
    if not closed_loop_metrics.get("env"):
        return {"closed_loop": f"skipped: {closed_loop_metrics.get('skipped')}"[:4900]}
    numbers = closed_loop_metrics["headline"]
    return {"closed_loop": closed_loop_metrics["env"],
            **{f"metric.{key}": f"{value:.4f}" for key, value in numbers.items()}}


def _robustness_tags(robustness: dict) -> dict[str, str]:
    """The worst closed-loop condition and its success (or why there is none), and every robustness number."""
    worst = (robustness.get("closed_loop") or {}).get("worst")
    text = (f"{worst['condition']} {worst['success_rate']:.2f}" if worst
            else f"skipped: {robustness.get('skipped') or 'no closed-loop conditions ran'}")
    return {"robustness_worst": text[:4900],
            **{f"metric.{key}": f"{value:.4f}" for key, value in robustness.get("headline", {}).items()}}


@dg.asset(group_name="evaluation", kinds={"mlflow"})
def registered_model(
    context: dg.AssetExecutionContext,
    config: RegistryConfig,
    lora_adapter: str,
    evaluation_metrics: dict,
    closed_loop_metrics: dict,
    robustness: dict,
    train_val_split: dict,
    window_store: WindowStoreResource,
    compute: ComputeResource,
) -> dg.Output:
    """A new version of the registered model (MLflow pyfunc whose artifact is the policy
    directory). It takes alias `champion` only if it beats the best constant baseline by
    `min_accuracy_margin`, reaches the goal in `min_closed_loop_success` of at least
    `min_closed_loop_rollouts` closed-loop rollouts and in `min_margin_over_blind` more of them than
    the best driver blind to the image (where the data comes from a simulated world), and matches
    the current champion re-evaluated on the same validation episodes; otherwise alias
    `challenger`, with the reason. The same weights again re-gate their existing version, which
    then holds only its new alias (a failing champion loses @champion)."""
    from vla_pipeline.evaluation import registry
    from vla_pipeline.evaluation.evaluate import headline

    split = Split.from_dict(train_val_split)
    result, numbers = evaluation_metrics["metrics"], evaluation_metrics["headline"]
    margin = result["margin"]["first"]
    best = margin["best_accuracy_baseline"]
    fingerprint = Path(lora_adapter).parent.name

    closed = closed_loop_metrics["headline"] if closed_loop_metrics.get("env") else {}  # {}: no world, no clause
    champion = registry.version_by_alias(config.model_name, gate.CHAMPION)
    champion_accuracy = None
    if champion is not None:
        if champion.tags.get("training_fingerprint") == fingerprint:
            champion_accuracy = numbers[gate.GATE_METRIC]  # the very same weights
        else:
            context.log.info(f"re-evaluating champion v{champion.version} on the current {len(split.val)} validation episodes")
            champion_dir = registry.policy_dir_of(champion)
            again = _evaluate(champion_dir, split, window_store, compute, result["dead_band"], context.log.info,
                              sight_ablations=False)  # only its accuracy is compared
            champion_accuracy = headline(again.metrics)[gate.GATE_METRIC]
    decision = gate.decide_promotion(
        numbers[gate.GATE_METRIC], best, result["baselines"][best]["first"]["direction_accuracy"],
        config.min_accuracy_margin, champion_accuracy, champion.version if champion else None,
        replay_accuracy=result["scripted_replay"]["first"]["direction_accuracy"]
        if config.require_beating_replay and result.get("scripted_replay") else None,
        closed_loop_success=closed[gate.CLOSED_LOOP_SUCCESS] if closed else None,
        min_closed_loop_success=config.min_closed_loop_success,
        closed_loop_rollouts=closed[gate.CLOSED_LOOP_ROLLOUTS] if closed else None,
        min_closed_loop_rollouts=config.min_closed_loop_rollouts,
        closed_loop_best_blind=closed.get(gate.BEST_BLIND_SUCCESS), min_margin_over_blind=config.min_margin_over_blind,
    )

    store = window_store.open()
    hashes = {i: store.episode_attrs(i)["content_hash"] for i in split.train + split.val}
    tags = _version_tags(numbers, split, lora_adapter, data_snapshot(split.train, split.val, hashes))
    tags.update(_sight_tags(result))
    tags.update(_closed_loop_tags(closed_loop_metrics))
    tags.update(_robustness_tags(robustness))
    run_id, experiment = training_run_id(lora_adapter), experiment_id()
    version = registry.register_gated_version(config.model_name, lora_adapter, tags, decision, run_id, experiment,
                                              context.log)
    context.log.info(f"{config.model_name} v{version.version} → @{decision.alias}: {decision.reason}")
    return dg.Output(
        {"name": config.model_name, "version": str(version.version), "alias": decision.alias,
         "uri": f"models:/{config.model_name}/{version.version}"},
        metadata={
            "model_name": config.model_name,
            "version": int(version.version),
            "alias": decision.alias,
            "reason": decision.reason,
            "direction_accuracy_first": numbers[gate.GATE_METRIC],
            "best_baseline": f"{best} ({result['baselines'][best]['first']['direction_accuracy']:.3f})",
            "champion_before": f"v{champion.version}" if champion else "none",
            "champion_before_accuracy_on_current_val": champion_accuracy if champion_accuracy is not None else float("nan"),
            "robustness_worst": tags["robustness_worst"],
            **({"closed_loop_success": closed[gate.CLOSED_LOOP_SUCCESS],
                "closed_loop_best_blind": closed.get(gate.BEST_BLIND_SUCCESS, float("nan"))} if closed else {}),
            "model_uri": f"models:/{config.model_name}@{decision.alias}",
            "git_commit": tags["git_commit"],
            "evaluation": dg.MetadataValue.md(markdown(result)),
            **({"mlflow_run": dg.MetadataValue.url(run_link(run_id, experiment))} if run_id else {}),
        },
    )
