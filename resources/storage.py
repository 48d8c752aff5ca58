"""Where episodes come from and where the window store lives, as Dagster resources."""


import os
from typing import Optional
from pathlib import Path

import dagster as dg

from vla_pipeline.data.episodes import ValidationRules
from vla_pipeline.data.pending import DEFAULT_MAX_PENDING_SECONDS, pending_reason
from vla_pipeline.data.schema import IMAGE_SIZE
from vla_pipeline.data.store import WindowStore
from vla_pipeline.settings import settings


def from_settings(field: str) -> str | dg.EnvVar:
    """A setting for a resource: its EnvVar when VLA_<FIELD> is set (shown as such in the UI),
    else the setting's default."""
    current = settings()
    return dg.EnvVar(f"VLA_{field.upper()}") if field in current.model_fields_set else str(getattr(current, field))


class EpisodeFolder(dg.ConfigurableResource):
    """The drop folder of raw HDF5 episodes (VLA_EPISODES_DIR)."""

    path: str = "data/episodes"
    settle_seconds: float = 2.0  # a file must keep its size and mtime this long to count as complete
    # A quiet file that does not read as complete HDF5 (or that a writer holds) waits this long
    # before it is ingested anyway, and rejected with its reason.
    max_pending_seconds: float = DEFAULT_MAX_PENDING_SECONDS

    def pending_reason(self, path: Path) -> str | None:
        """Why `path` must still wait before ingest (a stalled or unfinished copy), or None."""
        return pending_reason(path, self.max_pending_seconds)

    def file_for(self, episode_id: str) -> Path:
        return Path(self.path) / f"{episode_id}.h5"


class WindowStoreResource(dg.ConfigurableResource):
    """The Zarr window store (VLA_STORE) and the rules episodes must meet to enter it."""

    path: str = "data/store.zarr"
    image_size: int = IMAGE_SIZE
    window: int = ValidationRules.window
    chunk: int = ValidationRules.chunk
    max_abs_action: float = ValidationRules.max_abs_action
    min_frames: Optional[int] = ValidationRules.min_frames
    workers: int = min(os.cpu_count() or 1, 8)

    @property
    def rules(self) -> ValidationRules:
        return ValidationRules(
            window=self.window,
            chunk=self.chunk,
            max_abs_action=self.max_abs_action,
            min_frames=self.min_frames,
        )

    def open(self) -> WindowStore:
        return WindowStore(self.path).create(self.image_size)
