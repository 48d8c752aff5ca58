"""Ingest assets: raw HDF5 episode (validated) → episode windows in the Zarr store.

Both are partitioned per episode file and run many partitions in one run
(single-run backfill policy), so a batch of new episodes pays Dagster's per-run
cost once. Metadata and check results are still recorded per partition.
"""


import re
import time
from collections.abc import Sequence

import dagster as dg
from dagster._core.definitions.asset_checks.asset_check_evaluation import (
    AssetCheckEvaluationTargetMaterializationData,  # not exported at the top level in 1.13
)

from resources import EpisodeFolder, WindowStoreResource
from vla_pipeline.data.contracts import colour_error, colour_order_ok, schema_problems
from vla_pipeline.data.episodes import EpisodeRejected, inspect_episode
from vla_pipeline.data.ingest import ingest_episodes

episode_partitions = dg.DynamicPartitionsDefinition(name="episodes")


def register_partitions(instance: dg.DagsterInstance, episode_ids: Sequence[str]) -> list[str]:
    """Add the missing episode partitions; the ones this call added.

    Idempotent and safe against a concurrent add of the same keys (another `vla-pipeline
    ingest`, the sensor): Dagster's add reads, then inserts, so a key added in between fails
    the insert; the add is then retried with what is still missing."""
    from sqlalchemy.exc import IntegrityError, OperationalError  # Dagster's storage raises these

    for attempt in range(5):
        known = set(instance.get_dynamic_partitions(episode_partitions.name))
        missing = [key for key in dict.fromkeys(episode_ids) if key not in known]
        if not missing:
            return []
        try:
            instance.add_dynamic_partitions(episode_partitions.name, missing)
            return missing
        except IntegrityError:  # someone added some of them meanwhile
            continue
        except OperationalError as error:  # sqlite: another writer holds the database
            if "locked" not in str(error):
                raise
            time.sleep(0.2 * (attempt + 1))
    raise dg.DagsterError(f"could not register {len(episode_ids)} episode partitions: others kept adding them")


RAW_VALID = "episode_is_valid"
STORE_SCHEMA = "stored_schema"
RGB_ORDER = "rgb_channel_order"


class PartitionChecks:
    """Check results per partition, logged once the partitions' materializations exist.

    Dagster's AssetCheckResult cannot name a partition inside a multi-partition run, so the
    evaluations are logged directly, each pointing at its partition's new materialization
    (which makes it the current result in the UI).
    """

    def __init__(self, asset: str, names: list[str]):
        self.asset_key = dg.AssetKey(asset)
        self.names = names
        self.results: list[tuple[str, str, bool, dict, bool]] = []

    def add(self, name: str, partition: str, passed: bool, metadata: dict, warn: bool = False) -> None:
        self.results.append((name, partition, passed, metadata, warn))

    def emit(self, context: dg.AssetExecutionContext):
        partitions = sorted({partition for _, partition, *_ in self.results})
        records = context.instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=self.asset_key, asset_partitions=partitions),
            limit=max(len(partitions), 1),
        ).records
        targets = {
            record.partition_key: AssetCheckEvaluationTargetMaterializationData(
                run_id=record.run_id, storage_id=record.storage_id, timestamp=record.timestamp
            )
            for record in records
            if record.run_id == context.run_id
        }
        for name, partition, passed, metadata, warn in self.results:
            context.log_event(
                dg.AssetCheckEvaluation(
                    asset_key=self.asset_key,
                    check_name=name,
                    passed=passed,
                    metadata=metadata,
                    partition=partition,
                    target_materialization_data=targets.get(partition),
                    severity=dg.AssetCheckSeverity.WARN if warn else dg.AssetCheckSeverity.ERROR,
                )
            )
        # The check outputs themselves carry nothing; they only close the declared specs.
        for name in self.names:
            yield dg.Output(None, output_name=f"{self.asset_key.path[-1]}_{name}")


@dg.asset(
    group_name="ingest",
    partitions_def=episode_partitions,
    backfill_policy=dg.BackfillPolicy.single_run(),
    check_specs=[dg.AssetCheckSpec(RAW_VALID, asset="raw_episode", partitions_def=episode_partitions)],
    kinds={"hdf5"},
)
def raw_episode(context: dg.AssetExecutionContext, episode_folder: EpisodeFolder, window_store: WindowStoreResource):
    """One teleop episode file from the drop folder, validated (header, actions, names).

    A rejected file is marked here (status `rejected`, the reason in metadata and in the
    `episode_is_valid` check) and never reaches the store; other partitions go on.
    """
    rules = window_store.rules
    checks = PartitionChecks("raw_episode", [RAW_VALID])
    for episode_id in context.partition_keys:
        path = episode_folder.file_for(episode_id)
        try:
            summary = {"status": "valid", **inspect_episode(path, rules).summary()}
            summary["scenario"] = summary["scenario"] or ""
            summary["side"] = summary["side"] or "unknown"
            summary["warnings"] = "; ".join(summary["warnings"]) or "none"
            summary["source_resolution"] = "×".join(map(str, summary["source_resolution"]))
            reason = ""
        except EpisodeRejected as rejection:
            reason = rejection.reason
            summary = {"status": "rejected", "reason": reason, "source_file": str(path)}
            # In the partition's metadata and check; episode_windows and the CLI count rejections.
            context.log.debug(f"{episode_id}: rejected: {reason}")
        context.add_asset_metadata(summary, partition_key=episode_id)
        # A quarantined file is an expected outcome, not a broken asset: a warning, not an error.
        checks.add(RAW_VALID, episode_id, not reason, {"reason": reason or "ok"}, warn=bool(reason))
    yield dg.MaterializeResult()
    yield from checks.emit(context)


PROGRESS_EVERY_S = 10.0


def _every_few_seconds(log):
    """Ingest's per-episode lines in the debug log, and an info line with the count every
    PROGRESS_EVERY_S (a long ingest shows it moves; a short one shows its total only)."""
    last = time.monotonic()

    def progress(line: str) -> None:
        nonlocal last
        counted = re.match(r"\[(\d+)/(\d+)\]", line)
        if counted is None:  # waiting for another writer and the like
            log.info(line)
            return
        log.debug(line)
        if time.monotonic() - last >= PROGRESS_EVERY_S and counted[1] != counted[2]:
            last = time.monotonic()
            log.info(f"{counted[1]}/{counted[2]} episodes done")

    return progress


@dg.asset(
    group_name="ingest",
    partitions_def=episode_partitions,
    backfill_policy=dg.BackfillPolicy.single_run(),
    deps=[raw_episode],
    check_specs=[
        dg.AssetCheckSpec(STORE_SCHEMA, asset="episode_windows", partitions_def=episode_partitions),
        dg.AssetCheckSpec(RGB_ORDER, asset="episode_windows", partitions_def=episode_partitions),
    ],
    kinds={"zarr"},
)
def episode_windows(
    context: dg.AssetExecutionContext, episode_folder: EpisodeFolder, window_store: WindowStoreResource
):
    """The episode in the Zarr window store: 224×224 RGB frames, (linear_x, linear_y)
    actions, event types, instruction, scenario, action statistics and window starts.

    Unchanged files are not rewritten; a changed file replaces its episode atomically.
    """
    store = window_store.open()
    keys = list(context.partition_keys)
    context.log.info(f"ingesting {len(keys)} episode(s) into {store.path} with {window_store.workers} worker(s)")
    outcomes = ingest_episodes(
        [episode_folder.file_for(key) for key in keys],
        store.path,
        window_store.rules,
        window_store.image_size,
        workers=window_store.workers,
        progress=_every_few_seconds(context.log),
    )
    checks = PartitionChecks("episode_windows", [STORE_SCHEMA, RGB_ORDER])
    for outcome in outcomes:
        key = outcome.episode_id
        if outcome.status == "rejected":
            context.add_asset_metadata({"status": "rejected", "reason": outcome.reason}, partition_key=key)
            for name in (STORE_SCHEMA, RGB_ORDER):
                checks.add(name, key, False, {"reason": f"quarantined: {outcome.reason}"}, warn=True)
            continue
        summary = outcome.summary
        context.add_asset_metadata(
            {
                "status": outcome.status,
                "frames": summary["num_frames"],
                "windows": len(summary["window_starts"]),
                "instruction": summary["instruction"],
                "scenario": summary["scenario"] or "",
                "content_hash": summary["content_hash"],
                "group": dg.MetadataValue.path(str(store.episodes_dir / key)),
            },
            partition_key=key,
        )
        problems = schema_problems(store, key, window_store.max_abs_action)
        checks.add(STORE_SCHEMA, key, not problems, {"problems": "; ".join(problems) or "none"})
        errors = colour_error(store, key)
        checks.add(RGB_ORDER, key, colour_order_ok(errors), errors)
    stored = sum(o.status == "stored" for o in outcomes)
    rejected = sum(o.status == "rejected" for o in outcomes)
    context.log.info(f"{stored} stored, {len(outcomes) - stored - rejected} unchanged, {rejected} rejected")
    yield dg.MaterializeResult()
    yield from checks.emit(context)
