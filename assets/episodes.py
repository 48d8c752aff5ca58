"""Ingest assets: raw HDF5 episode (validated) → episode windows in the Zarr store.

Both are partitioned per episode file and run many partitions in one run
(single-run backfill policy), so a batch of new episodes pays Dagster's per-run
cost once. Metadata and check results are still recorded per partition.
"""


import dagster as dg

from resources import EpisodeFolder, WindowStoreResource
from vla_pipeline.contracts import colour_error, colour_order_ok, schema_problems
from vla_pipeline.episodes import EpisodeRejected, inspect_episode
from vla_pipeline.ingest import ingest_episodes

episode_partitions = dg.DynamicPartitionsDefinition(name="episodes")

RAW_VALID = "episode_is_valid"
STORE_SCHEMA = "stored_schema"
RGB_ORDER = "rgb_channel_order"


def _check(asset: str, name: str, partition: str, passed: bool, metadata: dict, warn=False):
    return dg.AssetCheckEvaluation(
        asset_key=dg.AssetKey(asset),
        check_name=name,
        passed=passed,
        metadata=metadata,
        partition=partition,
        severity=dg.AssetCheckSeverity.WARN if warn else dg.AssetCheckSeverity.ERROR,
    )


def _check_outputs(context: dg.AssetExecutionContext, asset: str, names):
    # Results are logged per partition above; the check outputs themselves carry nothing.
    for name in names:
        yield dg.Output(None, output_name=f"{asset}_{name}")


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
            context.log.warning(f"{episode_id}: rejected: {reason}")
        context.add_asset_metadata(summary, partition_key=episode_id)
        context.log_event(
            _check("raw_episode", RAW_VALID, episode_id, not reason, {"reason": reason or "ok"})
        )
    yield dg.MaterializeResult()
    yield from _check_outputs(context, "raw_episode", [RAW_VALID])


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
        progress=context.log.info,
    )
    for outcome in outcomes:
        key = outcome.episode_id
        if outcome.status == "rejected":
            context.add_asset_metadata({"status": "rejected", "reason": outcome.reason}, partition_key=key)
            for name in (STORE_SCHEMA, RGB_ORDER):
                quarantined = {"reason": f"quarantined: {outcome.reason}"}
                context.log_event(_check("episode_windows", name, key, False, quarantined, warn=True))
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
        context.log_event(
            _check("episode_windows", STORE_SCHEMA, key, not problems, {"problems": "; ".join(problems) or "none"})
        )
        errors = colour_error(store, key)
        context.log_event(_check("episode_windows", RGB_ORDER, key, colour_order_ok(errors), errors))
    stored = sum(o.status == "stored" for o in outcomes)
    rejected = sum(o.status == "rejected" for o in outcomes)
    context.log.info(f"{stored} stored, {len(outcomes) - stored - rejected} unchanged, {rejected} rejected")
    yield dg.MaterializeResult()
    yield from _check_outputs(context, "episode_windows", [STORE_SCHEMA, RGB_ORDER])
