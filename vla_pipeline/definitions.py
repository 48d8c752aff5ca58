"""The Dagster code location, and in-process runs of it for the command line.

This is the one module of the package that imports Dagster.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import dagster as dg

from assets.automation import (
    automation_sensor, contiguous_ranges, ingest_job, new_episodes_sensor, retrain_job, retrain_schedule,
)
from assets.console import console_logger
from assets.closed_loop import closed_loop_metrics
from assets.robustness import robustness
from assets.evaluation import evaluation_metrics, registered_model
from assets.export import lerobot_dataset
from assets.episodes import episode_partitions, episode_windows, raw_episode, register_partitions
from assets.training import lora_adapter, train_val_split
from resources import ComputeResource, EpisodeFolder, WindowStoreResource
from resources.storage import from_settings
from vla_pipeline.data.ingest import episode_files, is_up_to_date
from vla_pipeline.data.locks import exclusive
from vla_pipeline.data.store import is_url

defs = dg.Definitions(
    assets=[raw_episode, episode_windows, train_val_split, lora_adapter, evaluation_metrics, closed_loop_metrics,
            robustness, registered_model, lerobot_dataset],
    jobs=[ingest_job, retrain_job],
    sensors=[new_episodes_sensor, automation_sensor],
    schedules=[retrain_schedule],
    loggers={"console": console_logger},
    # Every run's steps in the run's own process: the steps of each job form a chain, and a step
    # process would only load the code location once more.
    executor=dg.in_process_executor,
    resources={
        "episode_folder": EpisodeFolder(path=from_settings("episodes_dir")),
        "window_store": WindowStoreResource(path=from_settings("store")),
        "compute": ComputeResource(),
    },
)


def resource(name: str):
    """A configured resource of the code location (EnvVars resolved), for use outside a run."""
    return defs.resources[name].process_config_and_initialize()


def ingest_partitions(
    instance: dg.DagsterInstance,
    episode_ids: Sequence[str],
    folder: str | None = None,
    log_level: str = "INFO",
    on_run: Callable[[str, str, int], None] | None = None,
) -> list[dg.ExecuteInProcessResult]:
    """Register and ingest episodes through `ingest_job`, one run per contiguous key range.

    `folder` overrides the episode folder resource for these runs (recorded in their config).
    """
    register_partitions(instance, episode_ids)
    ordered = instance.get_dynamic_partitions(episode_partitions.name)
    job = defs.resolve_job_def("ingest_job")
    results = []
    for first, last in contiguous_ranges(episode_ids, ordered):
        if on_run:
            on_run(first, last, ordered.index(last) - ordered.index(first) + 1)
        results.append(
            job.execute_in_process(
                instance=instance,
                tags={
                    "dagster/asset_partition_range_start": first,
                    "dagster/asset_partition_range_end": last,
                },
                run_config={
                    "loggers": {"console": {"config": {"log_level": log_level}}},
                    **({"resources": {"episode_folder": {"config": {"path": folder}}}} if folder else {}),
                },
                raise_on_error=False,
            )
        )
    return results


@dataclass
class FolderIngest:
    """What `ingest_folder` did."""

    files: int = 0
    already_ingested: int = 0
    pending: dict[str, str] = field(default_factory=dict)  # episode_id -> why it waits
    stored: int = 0
    rejected_reasons: list[str] = field(default_factory=list)
    runs: int = 0
    failed_runs: list[str] = field(default_factory=list)


def ingest_folder(folder: Path, say: Callable[[str], None] = print) -> FolderIngest:
    """Ingest the folder's new or changed, complete episode files through `ingest_job` (the
    `vla-pipeline ingest` command), on the instance of $DAGSTER_HOME. Raises StoreError for a
    store that cannot be written (e.g. one at a URL), FileNotFoundError for a missing folder."""
    files = episode_files(folder)
    window_store, episode_folder = resource("window_store"), resource("episode_folder")
    store = window_store.open()
    if is_url(store.location):  # object storage has no rename or lock to publish episodes with
        store.writer_lock()  # says so
    new = [f for f in files if not is_up_to_date(store, f, window_store.rules)]
    report = FolderIngest(files=len(files), already_ingested=len(files) - len(new))
    report.pending = {f.stem: reason for f in new if (reason := episode_folder.pending_reason(f))}
    ready = [f for f in new if f.stem not in report.pending]
    say(f"{folder}: {len(files)} episode file(s), {report.already_ingested} already ingested, {len(ready)} to ingest"
        + (f", {len(report.pending)} still pending" if report.pending else ""))
    for episode_id, reason in report.pending.items():
        say(f"  pending {episode_id}: {reason}; taken once complete (rejected if still so after "
            f"{episode_folder.max_pending_seconds:.0f} s unchanged)")
    if not ready:
        return report
    # A new instance creates its sqlite tables on first use; two processes doing so at once collide.
    with exclusive(Path(os.environ["DAGSTER_HOME"]) / ".vla-instance.lock", "setting up the Dagster instance", say):
        instance = dg.DagsterInstance.get()
    results = ingest_partitions(instance, [path.stem for path in ready], folder=str(folder.resolve()),
                                on_run=lambda first, last, count: say(f"run over {count} partition(s): {first} … {last}"))
    report.runs = len(results)
    report.failed_runs = [result.run_id for result in results if not result.success]
    report.stored = sum(store.has_episode(path.stem) for path in ready)
    report.rejected_reasons = [record["reason"] for path in ready if (record := store.quarantine_record(path.stem))]
    return report
