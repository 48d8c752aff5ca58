"""Training assets: the train/val split of the stored episodes, and the LoRA adapter.

torch, transformers, accelerate and MLflow are imported inside `lora_adapter`, not with the
module: the code location loads in every Dagster process, most of which never train.
"""

import hashlib
import json
import math
import os
import shutil
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import Field

from assets.episodes import episode_windows
from resources import ComputeResource, WindowStoreResource
from vla_pipeline.policy.policy_config import DEFAULT_BACKBONE, PolicyConfig
from vla_pipeline.data.schema import ACTION_DIMS
from vla_pipeline.training.split import (Split, load_split, save_split, split_from_store, split_location,
                                         train_action_stats)
from vla_pipeline.training.tracking import RUN_ID_FILE, data_snapshot, experiment_id, flat_params, run_link


class SplitConfig(dg.Config):
    val_fraction: float = 0.2


def _markdown_counts(summary: dict, key: str) -> str:
    names = sorted(set(summary["train"][key]) | set(summary["val"][key]))
    rows = [f"| {name} | {summary['train'][key].get(name, 0)} | {summary['val'][key].get(name, 0)} |" for name in names]
    return "\n".join([f"| {key[:-1]} | train | val |", "| --- | ---: | ---: |", *rows])


# Re-split whenever episodes were stored. Unlike eager(), an episode partition that is missing
# (its run failed, or it is still queued) holds nothing back.
SPLIT_AUTOMATION = (
    dg.AutomationCondition.any_deps_updated().since_last_handled()
    & ~dg.AutomationCondition.any_deps_in_progress()
    & ~dg.AutomationCondition.in_progress()
).with_label("on new episodes")


@dg.asset(group_name="training", deps=[episode_windows], kinds={"json"}, automation_condition=SPLIT_AUTOMATION)
def train_val_split(context: dg.AssetExecutionContext, config: SplitConfig, window_store: WindowStoreResource):
    """Train/val split by episode: stratified by side and scenario, and stable — an episode
    never changes sides as episodes are added. Rejected episodes are excluded and listed.
    Saved as `split.json` in the store; the value is the split itself."""
    store = window_store.open()
    previous = load_split(store)
    split = split_from_store(store, previous, config.val_fraction)
    if not split.train:
        raise dg.Failure(f"no stored episodes in {store.path}: ingest episodes before splitting")
    save_split(store, split)
    attrs = {episode_id: store.episode_attrs(episode_id) for episode_id in split.train + split.val}
    summary = split.summary(attrs)
    stats = train_action_stats(store, split)
    kept = len(set(previous.train + previous.val) & set(attrs)) if previous else 0
    context.log.info(
        f"{len(split.train)} train / {len(split.val)} val episodes "
        f"({kept} kept from the previous split, {len(split.excluded)} rejected excluded)"
    )
    return dg.Output(
        split.to_dict(),
        metadata={
            "train_episodes": len(split.train),
            "val_episodes": len(split.val),
            "train_windows": summary["train"]["windows"],
            "val_windows": summary["val"]["windows"],
            "by_side": dg.MetadataValue.md(_markdown_counts(summary, "sides")),
            "by_scenario": dg.MetadataValue.md(_markdown_counts(summary, "scenarios")),
            "train_action_mean": dict(zip(ACTION_DIMS, stats.mean.round(4).tolist())),
            "train_action_std": dict(zip(ACTION_DIMS, (stats.var**0.5).round(4).tolist())),
            "excluded": dg.MetadataValue.json(split.excluded),
            "split_file": dg.MetadataValue.path(split_location(store)),
        },
    )


CPU_PRESET_NAMES = ("tiny", "small")  # VLA_MODEL values that train the CPU preset


class TrainingConfig(dg.Config):
    """`model`: "tiny" (or "small": the CPU preset, built in-process, no download), a hub id or
    a local directory. `policy` and `train` override fields of PolicyConfig and TrainConfig by
    name, e.g. policy: {"lora_r": 64, "train_vision": false}, train: {"epochs": 5, "lr": 5e-5}.
    The CPU preset starts from its own setup (PolicyConfig.small, TrainConfig.small): a small
    backbone trained in full from scratch, not LoRA on a pretrained one."""

    model: str = Field(default_factory=lambda: os.environ.get("VLA_MODEL") or DEFAULT_BACKBONE)
    policy: dict[str, Any] = {}
    train: dict[str, Any] = {}

    def configs(self):
        """(PolicyConfig, TrainConfig) from the model and the overrides."""
        from vla_pipeline.training.train import TrainConfig

        try:
            if self.model in CPU_PRESET_NAMES:
                return PolicyConfig.small(**self.policy), TrainConfig.small(**self.train)
            return PolicyConfig(backbone=self.model, **self.policy), TrainConfig(**self.train)
        except (TypeError, ValueError) as error:
            raise dg.Failure(f"training config: {error}") from error


def _models_dir() -> Path:
    return Path(os.environ.get("VLA_MODELS") or "data/models")


@dg.asset(group_name="training", kinds={"pytorch", "mlflow"})
def lora_adapter(
    context: dg.AssetExecutionContext,
    config: TrainingConfig,
    train_val_split: dict,
    window_store: WindowStoreResource,
    compute: ComputeResource,
) -> dg.Output:
    """The trained policy: LoRA adapter on Kosmos-2, action token and LSTM head, with its
    config and action scale — everything serving needs besides the backbone weights.

    Trains on the split's training windows on the compute resource, records the run in
    MLflow, and resumes from the last checkpoint when the same training was interrupted.
    """
    import mlflow

    from vla_pipeline.training.train import describe_setup

    policy_config, train_config = config.configs()
    train_config = replace(train_config, loader_workers=compute.loader_workers)
    store = window_store.open()
    split = Split.from_dict(train_val_split)
    hashes = {i: store.episode_attrs(i)["content_hash"] for i in split.train + split.val}
    snapshot = data_snapshot(split.train, split.val, hashes)
    fingerprint = hashlib.sha256(
        json.dumps([policy_config.to_dict(), asdict(train_config), snapshot], sort_keys=True).encode()
    ).hexdigest()[:12]
    output_dir = _models_dir() / f"lora-{fingerprint}"
    what = "the CPU preset (a small Kosmos-2 built in-process)" if policy_config.preset in CPU_PRESET_NAMES \
        else policy_config.backbone
    context.log.info(f"training {what} into {output_dir}")
    setup = describe_setup(policy_config, train_config)
    context.log.info(f"setup: {setup}")

    experiment = experiment_id()
    run_file = output_dir / RUN_ID_FILE
    run_id = run_file.read_text().strip() if run_file.is_file() else None
    created = not output_dir.exists()
    try:
        with mlflow.start_run(run_id=run_id, experiment_id=experiment, run_name=f"lora-{fingerprint}") as run:
            result = _train_in_run(context, run, run_id, output_dir, policy_config, train_config, split, snapshot,
                                   setup, store, compute)
    except BaseException:
        if created and not any((output_dir / name).exists() for name in ("checkpoint", "policy")):
            shutil.rmtree(output_dir, ignore_errors=True)  # nothing to resume from: leave no folder behind
        raise
    speed = _measured_speed(result)
    return dg.Output(
        str((output_dir / "policy").resolve()),
        metadata={
            "trainable_parameters": result.parameters["trainable"],
            "total_parameters": result.parameters["total"],
            "best_val_loss": result.best_val_loss,
            "epochs": result.epochs,
            "steps": result.steps,
            "resumed_from_step": result.resumed_from_step,
            "already_trained": result.already_trained,
            "device": f"{result.device} ({result.precision})",
            "wall_time_s": round(result.seconds, 1),
            "batch": f"{result.batch_size} × {result.grad_accum} accumulation"
                     + (f" × {compute.processes} processes" if compute.processes > 1 else ""),
            **{key: round(value, 2) for key, value in speed.items()},
            "policy_dir": dg.MetadataValue.path(str((output_dir / "policy").resolve())),
            "mlflow_run": dg.MetadataValue.url(run_link(run.info.run_id, experiment)),
            "mlflow_run_id": run.info.run_id,
            # What the retraining schedule compares the store with.
            "episode_hashes": dg.MetadataValue.json(hashes),
            **snapshot,
        },
    )


def _train_in_run(context, run, run_id, output_dir: Path, policy_config, train_config, split, snapshot: dict,
                  setup: str, store, compute):
    """Train (or resume, or find finished) inside the open MLflow run; log what it produced."""
    import mlflow

    from vla_pipeline.policy.hub import BackboneUnavailable
    from vla_pipeline.training.launch import run_distributed, write_spec
    from vla_pipeline.training.train import train

    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / RUN_ID_FILE).write_text(run.info.run_id)
    if run_id is None:
        mlflow.log_params({**flat_params("policy", policy_config.to_dict()),
                           **flat_params("train", asdict(train_config)), **snapshot})
        mlflow.log_dict(split.to_dict(), "split.json")

    def log_epoch(record: dict, _policy=None) -> None:
        mlflow.log_metrics({"train_loss": record["train_loss"], "val_loss": record["val_loss"]}, step=record["epoch"])

    try:
        if compute.processes > 1:  # torchrun: one process per GPU, the main one writes
            spec = write_spec(output_dir, policy_config.to_dict(), asdict(train_config), str(store.path),
                              split.train, split.val, compute.device, compute.precision, compute.batch_size)
            result = run_distributed(spec, compute.processes, log=context.log.info)
            if not result.already_trained:
                for record in result.history:
                    log_epoch(record)
        else:
            result = train(policy_config, train_config, store.path, split.train, split.val, output_dir,
                           compute=compute.plan(), log=context.log.info, on_epoch=log_epoch)
    except BackboneUnavailable as error:
        raise dg.Failure(str(error), allow_retries=False) from None
    except RuntimeError as error:
        if compute.processes > 1:  # the processes' own traceback is in the message
            raise dg.Failure(str(error), allow_retries=False) from None
        raise
    except OSError as error:  # a folder that is not a save_pretrained checkpoint, a broken download
        raise dg.Failure(f"could not load the backbone {policy_config.backbone!r}: {error}",
                         allow_retries=False) from None
    if result.already_trained:  # its run already holds everything below
        return result
    mlflow.log_metrics({"best_val_loss": result.best_val_loss, "trainable_parameters": result.parameters["trainable"],
                        **_measured_speed(result)})
    mlflow.log_artifacts(str(output_dir / "policy"), "policy")
    mlflow.log_artifact(str(output_dir / "training.json"))
    mlflow.set_tags({"device": result.device, "precision": result.precision, "setup": setup, **snapshot})
    return result


def _measured_speed(result) -> dict[str, float]:
    """Steady-state throughput, and the GPU's peak memory when training ran on one."""
    return {key: value for key, value in (("steady_windows_per_s", result.steady_windows_per_s),
                                          ("peak_memory_gib", result.peak_memory_gib)) if math.isfinite(value)}
