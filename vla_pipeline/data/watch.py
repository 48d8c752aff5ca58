"""What changed in the episode drop folder since the last look, without reading any file.

Each look records every episode file's (size, mtime_ns). A file is *ready* once it shows the
same size and modification time on two consecutive looks and is at least `settle_seconds`
old — a file the collector or a copy is still writing keeps changing and waits. Only `*.h5`
names count (`episode_files`), so `*.h5.part`, `*.tmp` and hidden files are never picked up.
A ready file is *due* when its stat differs from the one it had when it was last handed to
ingest (new or replaced content) and, when a `pending` check is given (`pending.py`), the file
is finished: a stalled copy is *pending* and asked again at every look, never handed over
half; files that were present before and are gone are *deleted*.

The state is plain JSON, so a Dagster sensor can keep it as its cursor.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .ingest import episode_files

DEFAULT_SETTLE_SECONDS = 2.0


@dataclass
class FolderState:
    seen: dict[str, list[int]] = field(default_factory=dict)  # stem -> [size, mtime_ns] at the last look
    handed: dict[str, list[int]] = field(default_factory=dict)  # stem -> [size, mtime_ns] when sent to ingest

    def to_json(self) -> str:
        """Compact: a file handed to ingest at the stat it still has (the usual case) is marked by a
        third element in `seen` ([size, mtime_ns, 1]); only other handed stats are listed apart."""
        seen = {stem: stat + [1] if self.handed.get(stem) == stat else stat for stem, stat in self.seen.items()}
        handed = {stem: stat for stem, stat in self.handed.items() if self.seen.get(stem) != stat}
        return json.dumps({"seen": seen, "handed": handed}, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | None) -> FolderState:
        if not text:
            return cls()
        data = json.loads(text)  # earlier cursors list every handed stat in "handed": read as they are
        seen = {stem: list(stat[:2]) for stem, stat in data.get("seen", {}).items()}
        handed = {stem: list(stat[:2]) for stem, stat in data.get("seen", {}).items() if len(stat) > 2}
        return cls(seen=seen, handed={**handed, **data.get("handed", {})})


@dataclass
class FolderScan:
    due: list[Path]  # complete files, new or changed since they were last handed to ingest
    waiting: list[str]  # files still changing (or too fresh) to be taken
    deleted: list[str]  # handed to ingest before, now gone from the folder
    state: FolderState  # the next state: commit it once `due` has been requested
    pending: dict[str, str] = field(default_factory=dict)  # quiet but unfinished: stem -> why

    def summary(self) -> str:
        parts = [f"{len(self.due)} ready"]
        if self.waiting:
            parts.append(f"{len(self.waiting)} still being written ({', '.join(self.waiting[:3])})")
        if self.pending:
            parts.append(f"{len(self.pending)} pending (" + "; ".join(
                f"{stem}: {reason}" for stem, reason in list(self.pending.items())[:3]) + ")")
        if self.deleted:
            parts.append(f"{len(self.deleted)} deleted ({', '.join(self.deleted[:3])})")
        return ", ".join(parts)


def scan_folder(folder: Path | str, state: FolderState, settle_seconds: float = DEFAULT_SETTLE_SECONDS,
                now: float | None = None, pending: Callable[[Path], str | None] | None = None) -> FolderScan:
    """Compare the folder with `state`; returns what to ingest and the state to keep.

    `pending(path)` says why a quiet file must still wait (None: it may go)."""
    now = time.time() if now is None else now
    seen, handed = {}, dict(state.handed)
    due, waiting, held = [], [], {}
    for path in episode_files(folder):
        try:
            stat = path.stat()
        except FileNotFoundError:  # removed while we looked
            continue
        current = [stat.st_size, stat.st_mtime_ns]
        seen[path.stem] = current
        stable = state.seen.get(path.stem) == current and now - stat.st_mtime_ns / 1e9 >= settle_seconds
        if handed.get(path.stem) == current:
            continue
        reason = pending(path) if stable and pending else None
        if reason:
            held[path.stem] = reason
        elif stable:
            due.append(path)
            handed[path.stem] = current
        else:
            waiting.append(path.stem)
    deleted = sorted(stem for stem in state.handed if stem not in seen)
    for stem in deleted:
        handed.pop(stem)
    return FolderScan(due, waiting, deleted, FolderState(seen, handed), held)
