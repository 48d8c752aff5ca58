"""The `export` group: the window store's episodes in another format, written on demand (never by an
automation condition, so an episode drop does not rewrite it)."""

from typing import Optional

import dagster as dg
from pydantic import Field

from assets.episodes import episode_windows
from resources import WindowStoreResource


class LeRobotExportConfig(dg.Config):
    out_dir: str = Field("data/lerobot", description="the dataset folder: new, or one an earlier export wrote "
                         "(the episodes stored since are appended)")
    size: Optional[int] = Field(None, description="frames resized to size×size (default: as stored, 224)")
    episodes: Optional[list[str]] = Field(None, description="these stored episodes (default: all)")


@dg.asset(group_name="export", deps=[episode_windows], kinds={"parquet"})
def lerobot_dataset(context: dg.AssetExecutionContext, config: LeRobotExportConfig,
                    window_store: WindowStoreResource) -> dg.MaterializeResult:
    """The stored episodes as a LeRobotDataset v3.0 (parquet frames and actions, AV1 video, meta/), which
    LeRobot's loader and tools read; a re-export appends the episodes stored since (docs/data.md)."""
    from vla_pipeline.data.lerobot import LeRobotError, export_lerobot

    try:
        report = export_lerobot(window_store.open(), config.out_dir, config.episodes, config.size,
                                progress=context.log.info)
    except LeRobotError as error:
        raise dg.Failure(description=str(error)) from None
    context.log.info(f"{report.out_dir}: {report.mode}, {len(report.written)} episodes written, {report.kept} kept"
                     + (f" ({report.reason})" if report.reason else ""))
    return dg.MaterializeResult(metadata={
        "path": dg.MetadataValue.path(str(report.out_dir)), "mode": report.mode,
        "episodes_written": len(report.written), "episodes_kept": report.kept,
        "total_episodes": report.total_episodes, "total_frames": report.total_frames, "fps": report.fps,
        "seconds": round(report.seconds, 2)})
