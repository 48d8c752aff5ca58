"""The pipeline runs itself: jobs, the drop-folder sensor, the split's declarative automation
sensor, and the retraining schedule."""

import hashlib
from collections.abc import Sequence

import dagster as dg

from assets.console import RUN_CONFIG
from assets.episodes import episode_partitions, episode_windows, raw_episode, register_partitions
from assets.closed_loop import closed_loop_metrics
from assets.robustness import robustness
from assets.evaluation import evaluation_metrics, registered_model
from assets.training import lora_adapter, train_val_split
from resources import EpisodeFolder, WindowStoreResource
from vla_pipeline.data.ingest import up_to_date_check
from vla_pipeline.settings import settings
from vla_pipeline.training.retraining import retrain_decision, stored_episodes
from vla_pipeline.data.watch import FolderState, scan_folder

# How often the drop folder is looked at: Dagster's sensor daemon ticks every 5 s at most, and a
# file is taken on its second unchanged look, so a dropped episode is ingested 5-10 s later.
SENSOR_INTERVAL_S = 5
RANGE_START, RANGE_END = "dagster/asset_partition_range_start", "dagster/asset_partition_range_end"

ingest_job = dg.define_asset_job(
    "ingest_job",
    selection=[raw_episode, episode_windows],
    partitions_def=episode_partitions,
    description="Validate episode files and write them into the window store.",
    config=RUN_CONFIG,
)

retrain_job = dg.define_asset_job(
    "retrain_job",
    selection=[train_val_split, lora_adapter, evaluation_metrics, closed_loop_metrics, robustness, registered_model],
    description=("Split the stored episodes, train the policy, evaluate it offline, in closed loop and under the "
                 "robustness suite's perturbations, and register it behind the gate."),
    config=RUN_CONFIG,
)


def contiguous_ranges(selected: Sequence[str], ordered: Sequence[str]) -> list[tuple[str, str]]:
    """Split `selected` keys into runs of neighbours in partition order."""
    position = {key: index for index, key in enumerate(ordered)}
    indices = sorted(position[key] for key in selected)
    ranges: list[tuple[str, str]] = []
    for index in indices:
        if ranges and position[ranges[-1][1]] == index - 1:
            ranges[-1] = (ranges[-1][0], ordered[index])
        else:
            ranges.append((ordered[index], ordered[index]))
    return ranges


@dg.sensor(job=ingest_job, minimum_interval_seconds=SENSOR_INTERVAL_S, default_status=dg.DefaultSensorStatus.RUNNING)
def new_episodes_sensor(context: dg.SensorEvaluationContext, episode_folder: EpisodeFolder,
                        window_store: WindowStoreResource):
    """Watches the drop folder (VLA_EPISODES_DIR): adds a partition per new episode file and
    ingests new and replaced files once they stop changing, in one run per contiguous batch.
    Files still being written, and quiet files that do not read as complete HDF5 yet (a
    stalled copy), wait; deleted files are reported."""
    stored = up_to_date_check(window_store.open(), window_store.rules)

    def pending(path):  # a stored file is never pending: no need to open it
        return None if stored(path) else episode_folder.pending_reason(path)

    try:
        scan = scan_folder(episode_folder.path, FolderState.from_json(context.cursor), episode_folder.settle_seconds,
                           pending=pending)
    except FileNotFoundError as error:
        return dg.SkipReason(str(error))
    due = [path.stem for path in scan.due if not stored(path)]
    # Added here rather than as a request to the daemon: a concurrent `vla-pipeline ingest` may
    # be adding the same keys, which register_partitions tolerates.
    new = register_partitions(context.instance, due)
    ordered = context.instance.get_dynamic_partitions(episode_partitions.name)
    fingerprint = hashlib.sha256(scan.state.to_json().encode()).hexdigest()[:12]
    runs = [
        dg.RunRequest(run_key=f"{first}..{last}@{fingerprint}", tags={RANGE_START: first, RANGE_END: last},
                      run_config=RUN_CONFIG)
        for first, last in contiguous_ranges(due, ordered)
    ]
    events = [
        dg.AssetObservation(asset_key=raw_episode.key, partition=stem,
                            metadata={"status": "source file deleted", "source_file": f"{episode_folder.path}/{stem}.h5"})
        for stem in scan.deleted if stem in set(ordered)
    ]
    for stem in scan.deleted:
        context.log.warning(f"{stem}.h5 was deleted from {episode_folder.path}; its stored copy is kept")
    context.log.info(f"{episode_folder.path}: {scan.summary()}; {len(due)} to ingest ({len(new)} new partitions)")
    return dg.SensorResult(
        run_requests=runs,
        asset_events=events,
        cursor=scan.state.to_json(),
        skip_reason=None if runs else f"nothing to ingest: {scan.summary()}",
    )


# Dagster ships its automation sensor stopped; this one runs from the start and keeps the split
# in step with the store (train_val_split is AutomationCondition.eager()).
automation_sensor = dg.AutomationConditionSensorDefinition(
    "automation_sensor",
    target=dg.AssetSelection.all(),
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=30,
)

RETRAIN_CRON = settings().retrain_cron  # nightly, 02:00 UTC unless VLA_RETRAIN_CRON says otherwise
RETRAIN_MIN_CHANGED = settings().retrain_min_episodes


def last_trained_episodes(instance: dg.DagsterInstance) -> dict[str, str] | None:
    """episode_id -> content hash that the latest lora_adapter materialization trained on."""
    event = instance.get_latest_materialization_event(lora_adapter.key)
    if event is None or event.asset_materialization is None:
        return None
    recorded = event.asset_materialization.metadata.get("episode_hashes")
    return dict(recorded.value) if recorded is not None else None


@dg.schedule(cron_schedule=RETRAIN_CRON, job=retrain_job, execution_timezone="UTC",
             default_status=dg.DefaultScheduleStatus.RUNNING)
def retrain_schedule(context: dg.ScheduleEvaluationContext, window_store: WindowStoreResource):
    """Retrains (split → lora_adapter → evaluation_metrics → registered_model) on the cron
    (VLA_RETRAIN_CRON, default nightly) only when at least VLA_RETRAIN_MIN_EPISODES (default 1)
    stored episodes are new, changed or removed since the last training; otherwise the tick
    is skipped with the reason."""
    decision = retrain_decision(stored_episodes(window_store.open()), last_trained_episodes(context.instance),
                                RETRAIN_MIN_CHANGED)
    if not decision.retrain:
        return dg.SkipReason(decision.reason)
    return dg.RunRequest(run_key=f"retrain@{context.scheduled_execution_time.isoformat()}",
                         tags={"retrain_reason": decision.reason[:200]}, run_config=RUN_CONFIG)
