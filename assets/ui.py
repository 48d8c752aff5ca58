"""Asset metadata the Dagster UI shows inline: tables and plots."""

import shutil
from pathlib import Path

import dagster as dg
from dagster._core.storage.local_compute_log_manager import LocalComputeLogManager  # not exported in 1.13

from vla_pipeline.evaluation.report import NO_SENSITIVITY, Table, inline_image
from vla_pipeline.tracking import experiment_id, run_link, training_run_id


def metadata_table(table: Table | None, empty: str = NO_SENSITIVITY) -> dg.MetadataValue:
    """A table the asset page renders as one (markdown tables over 1,000 characters hide behind a button)."""
    if table is None:
        return dg.MetadataValue.md(empty)
    return dg.MetadataValue.table(
        records=[dg.TableRecord(dict(zip(table.header, row))) for row in table.cells()],
        schema=dg.TableSchema(columns=[dg.TableColumn(name, "string") for name in table.header]),
    )


def metadata_plot(context: dg.AssetExecutionContext, path: Path, title: str) -> dg.MetadataValue:
    """A plot shown inline on the asset page. Dagster renders only short markdown inline, so the
    PNG is not embedded but served by the webserver itself from the instance's compute-log
    folder (its /logs/ route). With a compute log manager that has no such folder, it is embedded
    and shown behind "[Show Markdown]"."""
    manager = context.instance.compute_log_manager
    if not isinstance(manager, LocalComputeLogManager):
        return dg.MetadataValue.md(inline_image(path, title))
    key = ["vla_reports", context.run_id, path.stem]
    served = Path(manager.get_captured_local_path(key, path.suffix.lstrip(".")))
    served.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(path, served)
    return dg.MetadataValue.md(f"![{title}](/logs/{'/'.join(key)}/{path.suffix.lstrip('.')})")


def log_to_training_run(context: dg.AssetExecutionContext, lora_adapter: str, metrics: dict[str, float],
                        artifacts: Path, artifact_path: str) -> dict[str, dg.MetadataValue]:
    """Log `metrics` and the `artifacts` folder (under `artifact_path`) to the MLflow run that trained
    `lora_adapter`; the asset's `mlflow_run` link, or {} (with a warning) where no run is recorded."""
    import mlflow

    run_id, experiment = training_run_id(lora_adapter), experiment_id()
    if not run_id:
        context.log.warning(f"{lora_adapter}: no MLflow training run recorded beside it; metrics not logged")
        return {}
    with mlflow.start_run(run_id=run_id, experiment_id=experiment):
        mlflow.log_metrics(metrics)
        mlflow.log_artifacts(str(artifacts), artifact_path)
    return {"mlflow_run": dg.MetadataValue.url(run_link(run_id, experiment))}
