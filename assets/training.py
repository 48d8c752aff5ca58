"""Training assets: the train/val split of the stored episodes, and the trained policy.

torch, transformers, accelerate and MLflow are imported inside `lora_adapter` (through
`vla_pipeline.training.run`), not with the module: the code location loads in every Dagster
process, most of which never train.
"""

import os
from pathlib import Path

import dagster as dg
from dagster._core.errors import DagsterPipesExecutionError  # not exported in 1.13
from pydantic import Field

from assets.episodes import episode_windows
from resources import ComputeResource, WindowStoreResource
from resources.typed import optional_dagster_config
from vla_pipeline.policy.policy_config import DEFAULT_BACKBONE, PolicyConfig
from vla_pipeline.data.schema import ACTION_DIMS
from vla_pipeline.training.split import (Split, load_split, save_split, split_from_store, split_location,
                                         train_action_stats)
from vla_pipeline.settings import settings
from vla_pipeline.tracking import run_link
from vla_pipeline.training.train_config import TrainConfig


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


# VLA_MODEL values (and `model` values) that train the CPU preset; "tiny" and "small" are its
# names from earlier releases, still taken.
CPU_PRESET_NAMES = ("cpu", "tiny", "small")


def _setups(model: str) -> tuple[PolicyConfig, TrainConfig]:
    """The policy and training setup of `model`: the CPU preset's own, or the full-size defaults."""
    if model in CPU_PRESET_NAMES:
        return PolicyConfig.cpu(), TrainConfig.cpu()
    return PolicyConfig(backbone=model), TrainConfig()


FULL_SIZE, CPU_PRESET = _setups(DEFAULT_BACKBONE), _setups("cpu")
PolicySettings = optional_dagster_config(PolicyConfig, "PolicySettings",
                                         {"full size": FULL_SIZE[0], "CPU preset": CPU_PRESET[0]},
                                         exclude=("backbone",))
TrainSettings = optional_dagster_config(TrainConfig, "TrainSettings",
                                        {"full size": FULL_SIZE[1], "CPU preset": CPU_PRESET[1]},
                                        exclude=("loader_workers",))


class TrainingConfig(dg.Config):
    """`model`: "cpu" (the CPU preset: a small Kosmos-2 built in-process and trained in full, with
    its own training setup), a hub id or a save_pretrained folder. `policy` and `train` are the
    policy's and the training's settings, each with its type, bounds and each setup's default: a
    field left unset takes the default of the `model` chosen, a field set applies as given."""

    model: str = Field(default_factory=lambda: settings().model or DEFAULT_BACKBONE,
                       description="cpu (the CPU preset), a Kosmos-2 hub id or a save_pretrained folder")
    policy: PolicySettings = PolicySettings()
    train: TrainSettings = TrainSettings()

    def configs(self) -> tuple[PolicyConfig, TrainConfig]:
        """(PolicyConfig, TrainConfig): the model's setup with the values set on it."""
        policy, train = _setups(self.model)
        try:
            return policy.replace(**self.policy.values_set()), train.replace(**self.train.values_set())
        except ValueError as error:
            raise dg.Failure(str(error), allow_retries=False) from None


def _pipes_launch(context: dg.AssetExecutionContext):
    """Several training processes through torchrun, launched and heard through Dagster Pipes:
    the main process's log lines reach the run log, its TrainResult the asset."""

    def launch(spec: Path, processes: int, log):
        from vla_pipeline.training.launch import clear_failures, failure_reasons, launch_command, result_from_report

        clear_failures(spec)
        command = launch_command(spec, processes)
        log(f"launching {processes} training processes through Dagster Pipes: {' '.join(command[1:])}")
        # One CPU thread per process unless set: the processes share the machine's cores.
        client = dg.PipesSubprocessClient(env={"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
                                               "PYTHONUNBUFFERED": "1"})
        try:
            invocation = client.run(command=command, context=context)
        except DagsterPipesExecutionError as error:
            reasons = "; ".join(failure_reasons(spec)) or str(error)
            raise dg.Failure(f"distributed training failed: {reasons}", allow_retries=False) from None
        reports = invocation.get_custom_messages()
        if not reports:
            raise dg.Failure("the training processes ended without reporting a result", allow_retries=False)
        return result_from_report(reports[-1])

    return launch


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

    Trains on the split's training windows on the compute resource (several processes through
    torchrun and Dagster Pipes), records the run in MLflow, resumes from the last checkpoint when
    the same training was interrupted, and trains nothing when it already finished.
    """
    from vla_pipeline.policy.hub import BackboneUnavailable
    from vla_pipeline.training.run import run_training

    policy_config, train_config = config.configs()
    try:
        training = run_training(policy_config, train_config, window_store.open(), Split.from_dict(train_val_split),
                                settings().models, compute.settings(), log=context.log.info,
                                launch=_pipes_launch(context))
    except BackboneUnavailable as error:
        raise dg.Failure(str(error), allow_retries=False) from None
    except OSError as error:  # a folder that is not a save_pretrained checkpoint, a broken download
        raise dg.Failure(f"could not load the backbone {policy_config.backbone!r}: {error}",
                         allow_retries=False) from None
    result = training.result
    return dg.Output(
        str(training.policy_dir.resolve()),
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
            "lr": train_config.lr,
            "setup": training.setup,
            **{key: round(value, 2) for key, value in training.measured_speed().items()},
            "policy_dir": dg.MetadataValue.path(str(training.policy_dir.resolve())),
            "mlflow_run": dg.MetadataValue.url(run_link(training.run_id, training.experiment_id)),
            "mlflow_run_id": training.run_id,
            # What the retraining schedule compares the store with.
            "episode_hashes": dg.MetadataValue.json(training.content_hashes),
            **training.snapshot,
        },
    )
