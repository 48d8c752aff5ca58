"""An exclusive lock between processes that says who holds it, and goes with its holder.

An OS file lock (flock): released when the holding process ends, however it ends (a SIGKILL
included), so a killed writer never leaves a stale lock behind.
"""

from __future__ import annotations

import fcntl
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path


@contextmanager
def exclusive(lock_file: Path | str, purpose: str, waiting: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold `lock_file`; while another process holds it, wait, telling `waiting` who that is."""
    lock_file = Path(lock_file)
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(descriptor, 300, 0).decode(errors="replace").strip() or "another process"
            if waiting:
                waiting(f"waiting for {holder} to finish {purpose}")
            fcntl.flock(descriptor, fcntl.LOCK_EX)
            if waiting:
                waiting(f"done waiting: {purpose} now")
        os.ftruncate(descriptor, 0)
        since = datetime.now().isoformat(timespec="seconds")
        os.pwrite(descriptor, f"pid {os.getpid()} ({Path(sys.argv[0]).name}, since {since})".encode(), 0)
        yield
    finally:
        os.close(descriptor)
