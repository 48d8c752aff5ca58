"""One training, start to finish: the output folder named by what it trains, the MLflow run it is
recorded in, one process or several, and nothing left behind when it cannot start.

`run_training` is what `lora_adapter` materializes, and works without Dagster too (one process;
several need a `launch`, which Dagster gives through Pipes: `assets/training.py`).
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..data.store import WindowStore
from ..policy.backbone import local_backbone_dir, uses_local_build
from ..policy.policy_config import PolicyConfig
from ..tracking import RUN_ID_FILE, data_snapshot, experiment_id, flat_params
from .compute import ComputeSettings, plan_compute
from .launch import write_spec
from .split import Split
from .train import TrainResult, train
from .train_config import TrainConfig, describe_setup

# launch(spec, processes, log) -> TrainResult: the training of `spec` in that many processes.
Launch = Callable[[Path, int, Callable[[str], None]], TrainResult]


@dataclass
class TrainingRun:
    result: TrainResult
    output_dir: Path
    run_id: str  # the MLflow run it is recorded in
    experiment_id: str
    snapshot: dict  # data_snapshot: which episode contents it saw
    content_hashes: dict[str, str]  # episode_id -> content hash, train and val
    setup: str  # describe_setup's line

    @property
    def policy_dir(self) -> Path:
        return self.output_dir / "policy"

    def measured_speed(self) -> dict[str, float]:
        """Steady-state throughput, and the GPU's peak memory when training ran on one."""
        return {key: value for key, value in (("steady_windows_per_s", self.result.steady_windows_per_s),
                                              ("peak_memory_gib", self.result.peak_memory_gib))
                if math.isfinite(value)}


def training_fingerprint(policy: PolicyConfig, train_config: TrainConfig, snapshot: dict) -> str:
    """Names the output folder: the same configs on the same data resume the same training."""
    listing = json.dumps([policy.to_dict(), train_config.model_dump(), snapshot], sort_keys=True)
    return hashlib.sha256(listing.encode()).hexdigest()[:12]


def run_training(policy: PolicyConfig, train_config: TrainConfig, store: WindowStore, split: Split,
                 models_dir: Path, compute: ComputeSettings = ComputeSettings(),
                 log: Callable[[str], None] = print, launch: Launch | None = None) -> TrainingRun:
    """Train (resume, or find finished) `policy` on the split's episodes into
    `models_dir/lora-<fingerprint>/`, recorded in an MLflow run. Raises what `train` raises; a
    training that fails before its first checkpoint leaves no folder."""
    import mlflow

    train_config = train_config.replace(loader_workers=compute.loader_workers)
    hashes = {i: store.episode_attrs(i)["content_hash"] for i in split.train + split.val}
    snapshot = data_snapshot(split.train, split.val, hashes)
    fingerprint = training_fingerprint(policy, train_config, snapshot)
    output_dir = Path(models_dir) / f"lora-{fingerprint}"
    what = {"small": "a small Kosmos-2 built in-process", "grounded": "the CPU preset (a small Kosmos-2 built "
            "in-process, its image path grounding-pretrained)"}.get(policy.preset, policy.backbone)
    log(f"training {what} into {output_dir}")
    setup = describe_setup(policy, train_config)
    log(f"setup: {setup}")
    if uses_local_build(policy):
        local_backbone_dir(policy.preset, log)  # built here once, not by each training process
    if compute.processes > 1 and launch is None:
        raise ValueError(f"{compute.processes} processes need a launcher: materialize lora_adapter, or run "
                         "torchrun -m vla_pipeline.training.launch on a spec (training/launch.py)")

    experiment = experiment_id()
    run_file = output_dir / RUN_ID_FILE
    known_run = run_file.read_text().strip() if run_file.is_file() else None
    created = not output_dir.exists()
    try:
        with mlflow.start_run(run_id=known_run, experiment_id=experiment, run_name=f"lora-{fingerprint}") as run:
            output_dir.mkdir(parents=True, exist_ok=True)
            run_file.write_text(run.info.run_id)
            if known_run is None:
                mlflow.log_params({**flat_params("policy", policy.to_dict()),
                                   **flat_params("train", train_config.model_dump()), **snapshot})
                mlflow.log_dict(split.to_dict(), "split.json")

            def log_epoch(record: dict, _policy=None) -> None:
                mlflow.log_metrics({"train_loss": record["train_loss"], "val_loss": record["val_loss"]},
                                   step=record["epoch"])

            if compute.processes > 1:  # torchrun: one process per GPU, the main one writes
                spec = write_spec(output_dir, policy.to_dict(), train_config.model_dump(), str(store.path),
                                  split.train, split.val, compute.device, compute.precision, compute.batch_size)
                result = launch(spec, compute.processes, log)
                if not result.already_trained:
                    for record in result.history:
                        log_epoch(record)
            else:
                result = train(policy, train_config, store.path, split.train, split.val, output_dir,
                               compute=plan_compute(compute.device, compute.precision, compute.batch_size),
                               log=log, on_epoch=log_epoch)
            training = TrainingRun(result, output_dir, run.info.run_id, experiment, snapshot, hashes, setup)
            if not result.already_trained:  # a finished training's run already holds all of it
                mlflow.log_metrics({"best_val_loss": result.best_val_loss,
                                    "trainable_parameters": result.parameters["trainable"],
                                    **training.measured_speed()})
                mlflow.log_artifacts(str(training.policy_dir), "policy")
                mlflow.log_artifact(str(output_dir / "training.json"))
                mlflow.set_tags({"device": result.device, "precision": result.precision, "setup": setup, **snapshot})
    except BaseException:
        if created and not any((output_dir / name).exists() for name in ("checkpoint", "policy")):
            shutil.rmtree(output_dir, ignore_errors=True)  # nothing to resume from: leave no folder behind
        raise
    return training
