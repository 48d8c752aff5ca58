"""Is an episode file finished? Asked before a file is handed to ingest, by the drop-folder sensor
and by `vla-pipeline ingest` alike.

A copy that stalls (scp over Wi-Fi, a slow USB stick) keeps its size and modification time
for a while, so a quiet file is not yet a finished one. A file is finished when no writer
holds it (HDF5 locks a file while a writer has it open) and it opens read-only as HDF5 whose
image and action datasets read to their last frame. An unfinished file stays *pending* —
listed, not ingested, never quarantined — until it is finished, or until it has not changed
for `max_pending_seconds`: then it is ingested, and rejected with its reason if still broken.
"""

from __future__ import annotations

import time
from pathlib import Path

import h5py

from .episodes import HDF5_SIGNATURE, IMAGE_DATASETS

DEFAULT_MAX_PENDING_SECONDS = 600.0


def unfinished_reason(path: Path | str) -> str | None:
    """Why `path` is not a finished HDF5 file yet, or None when it reads completely.

    A file that is complete but wrong (another format, datasets missing) counts as finished:
    validation rejects it with its own reason, at once."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            head = handle.read(len(HDF5_SIGNATURE))
    except FileNotFoundError:
        return "gone while looked at"
    if len(head) < len(HDF5_SIGNATURE):
        return "nothing written yet"
    if head != HDF5_SIGNATURE:
        return None  # not an HDF5 file at all: nothing more will make it one
    try:
        # "best-effort": where the file system has no locks, skip the lock, not the check.
        with h5py.File(path, "r", locking="best-effort") as h5:
            images = next((h5[name] for name in IMAGE_DATASETS if name in h5), None)
            if images is None or "actions" not in h5:
                return None
            if images.shape[0]:
                images[images.shape[0] - 1]  # the last frame: its chunks lie at the end of the file
            h5["actions"][()]
    except OSError as error:
        if "unable to lock file" in str(error).lower():
            return "a writer still has it open"
        return f"does not read as a complete HDF5 file yet ({_first_line(error)})"
    except Exception as error:  # h5py raises KeyError/RuntimeError/ValueError on half-written files too
        return f"does not read as a complete HDF5 file yet ({_first_line(error)})"
    return None


def pending_reason(path: Path | str, max_pending_seconds: float = DEFAULT_MAX_PENDING_SECONDS,
                   now: float | None = None) -> str | None:
    """Why `path` must wait before ingest, or None: unfinished, and changed within
    `max_pending_seconds` (an older unfinished file is ingested, and rejected as broken)."""
    reason = unfinished_reason(path)
    if reason is None:
        return None
    try:
        age = (time.time() if now is None else now) - Path(path).stat().st_mtime
    except FileNotFoundError:
        return reason
    return reason if age < max_pending_seconds else None


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:160]
