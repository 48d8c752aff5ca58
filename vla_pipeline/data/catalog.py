"""Every episode the pipeline knows of, in one listing: stored in the window store, rejected
(quarantined, with the reason), or still in the drop folder (not ingested yet, or an unfinished
copy and why it waits)."""

from __future__ import annotations

from pathlib import Path

from .ingest import episode_files
from .pending import pending_reason
from .schema import parse_scenario
from .store import WindowStore


def episode_rows(store: WindowStore, folder: Path | None, max_pending_seconds: float | None = None) -> list[dict]:
    """Every known episode: stored, rejected, or present in the folder but not yet ingested
    (with why it waits, when it is an unfinished copy)."""
    rows = {}
    for episode_id in store.episode_ids():
        attrs = store.episode_attrs(episode_id)
        rows[episode_id] = {
            "episode_id": episode_id,
            "status": "stored",
            "reason": "",
            "frames": attrs["num_frames"],
            "windows": len(attrs["window_starts"]),
            "scenario": attrs["scenario"],
            "side": attrs["side"],
            "instruction": attrs["instruction"],
        }
    for episode_id in store.quarantined_ids():
        record = store.quarantine_record(episode_id)
        scenario = parse_scenario(episode_id)
        rows[episode_id] = {
            "episode_id": episode_id,
            "status": "rejected",
            "reason": record["reason"],
            "frames": None,
            "scenario": scenario.name if scenario else None,
            "side": scenario.side if scenario else None,
            "source_file": record["source_file"],
        }
    if folder is not None and folder.is_dir():
        for path in episode_files(folder):
            if path.stem in rows:
                continue
            unfinished = pending_reason(path, max_pending_seconds) if max_pending_seconds is not None else None
            rows[path.stem] = {"episode_id": path.stem, "status": "pending", "frames": None,
                               "reason": f"still being copied: {unfinished}" if unfinished else "not ingested yet"}
    return [rows[key] for key in sorted(rows)]
