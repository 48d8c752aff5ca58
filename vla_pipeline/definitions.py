"""The Dagster code location, and in-process runs of it for the command line.

This is the one module of the package that imports Dagster.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import dagster as dg

from assets.automation import (
    automation_sensor, contiguous_ranges, ingest_job, new_episodes_sensor, retrain_job, retrain_schedule,
)
from assets.console import console_logger
from assets.closed_loop import closed_loop_metrics
from assets.evaluation import evaluation_metrics, registered_model
from assets.episodes import episode_partitions, episode_windows, raw_episode, register_partitions
from assets.training import lora_adapter, train_val_split
from resources import ComputeResource, EpisodeFolder, WindowStoreResource
from resources.storage import env_or

defs = dg.Definitions(
    assets=[raw_episode, episode_windows, train_val_split, lora_adapter, evaluation_metrics, closed_loop_metrics,
            registered_model],
    jobs=[ingest_job, retrain_job],
    sensors=[new_episodes_sensor, automation_sensor],
    schedules=[retrain_schedule],
    loggers={"console": console_logger},
    # Every run's steps in the run's own process: the steps of each job form a chain, and a step
    # process would only load the code location once more.
    executor=dg.in_process_executor,
    resources={
        "episode_folder": EpisodeFolder(path=env_or("VLA_EPISODES_DIR", "data/episodes")),
        "window_store": WindowStoreResource(path=env_or("VLA_STORE", "data/store.zarr")),
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
