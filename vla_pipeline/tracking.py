"""MLflow: where runs go, and the training run's params, metrics and artifacts.

MLflow is imported on first use (`mlflow_client`), not with this module: the Dagster code
location imports this module and must load in seconds.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from .settings import settings

DEFAULT_EXPERIMENT = "mobile-vla"
MLRUNS = Path("mlruns")
RUN_ID_FILE = "mlflow_run_id"  # in a lora_adapter output folder, beside policy/


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI if set, else a sqlite store in ./mlruns (artifacts beside it)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(MLRUNS / 'mlflow.db').resolve()}"


def artifact_root(uri: str) -> str | None:
    """Where a new experiment keeps its artifacts: VLA_ARTIFACT_ROOT when set (any URL MLflow
    stores artifacts at: file://, s3://, gs://, …); else, for a sqlite store, an `artifacts`
    folder beside the database (MLflow's own default is ./mlruns under the working directory,
    wherever the database is). Otherwise the store (a tracking server) chooses."""
    if root := settings().artifact_root:
        return root
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri.removeprefix("sqlite:///")).parent / "artifacts").resolve().as_uri()


def mlflow_client():
    """An MlflowClient on `tracking_uri()`, with MLflow's own info logging (database
    migrations and the like) kept out of the pipeline's output."""
    import mlflow
    from mlflow.tracking import MlflowClient

    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    mlflow.set_tracking_uri(tracking_uri())
    return MlflowClient()


def experiment_id(name: str = DEFAULT_EXPERIMENT) -> str:
    client = mlflow_client()
    existing = client.get_experiment_by_name(name)
    if existing is not None:
        return existing.experiment_id
    return client.create_experiment(name, artifact_location=artifact_root(tracking_uri()))


def data_snapshot(train_ids: list[str], val_ids: list[str], content_hashes: dict[str, str]) -> dict:
    """A short fingerprint of exactly which episode contents a model saw."""
    listing = json.dumps({"train": sorted(train_ids), "val": sorted(val_ids),
                          "hashes": {k: content_hashes[k] for k in sorted(content_hashes)}})
    return {
        "data_snapshot": hashlib.sha256(listing.encode()).hexdigest()[:16],
        "train_episodes": len(train_ids),
        "val_episodes": len(val_ids),
    }


def flat_params(prefix: str, values: dict) -> dict[str, str]:
    return {f"{prefix}.{key}": str(value) for key, value in values.items()}


def run_link(run_id: str, experiment: str) -> str:
    """The run's page in the MLflow UI: the tracking server when MLFLOW_TRACKING_URI is one
    (the team deployment), else `mlflow ui`'s default address for the local sqlite store."""
    uri = tracking_uri()
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    return f"{base}/#/experiments/{experiment}/runs/{run_id}"


def training_run_id(policy_dir: Path | str) -> str | None:
    """The MLflow run that trained the policy in `policy_dir` (recorded beside it by lora_adapter)."""
    run_file = Path(policy_dir).parent / RUN_ID_FILE
    return run_file.read_text().strip() if run_file.is_file() else None


def git_commit() -> str:
    """The commit of the code that is running, "+dirty" with uncommitted changes; "unknown" outside git."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit.stdout.strip() + ("+dirty" if status.stdout.strip() else "")
