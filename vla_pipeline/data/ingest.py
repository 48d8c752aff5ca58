"""From HDF5 files to the window store: one episode at a time, or a batch on several processes.

A batch holds the store's writer lock (`WindowStore.writer_lock`): overlapping ingests of the
same store run one after the other, and the later one finds the episodes the first stored
unchanged. Worker processes end on their own when the process that started them is gone.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2

from .episodes import EpisodeRejected, ValidationRules, content_hash, inspect_episode, read_frames
from .schema import IMAGE_SIZE, window_starts
from .store import WindowStore


@dataclass
class IngestOutcome:
    episode_id: str
    status: str  # "stored", "unchanged" or "rejected"
    reason: str = ""
    frames: int = 0
    seconds: float = 0.0
    summary: dict = field(default_factory=dict)

    def line(self) -> str:
        detail = f"{self.frames} frames, {self.seconds:.2f}s" if self.status == "stored" else self.reason
        return f"{self.status:<9} {self.episode_id}" + (f"  ({detail})" if detail else "")


def episode_files(folder: Path | str) -> list[Path]:
    """The *.h5 files directly in `folder`, oldest name first; anything else is ignored."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"episode folder {folder} does not exist; create it and drop *.h5 files in")
    return sorted(
        path
        for path in folder.iterdir()
        if path.suffix == ".h5" and path.is_file() and not path.name.startswith(".")
    )


def _ingested_as(store: WindowStore, path: Path, rules: dict, digest: str | None = None) -> str | None:
    """'stored' or 'rejected' when this exact file content was already ingested under these
    rules (`asdict(ValidationRules)`, as recorded).

    An unchanged size and modification time stand for unchanged content (as in rsync and
    make); otherwise the content hash decides, so a touched but identical file is not redone.
    """
    for status, record in (
        ("stored", store.episode_attrs(path.stem)),
        ("rejected", store.quarantine_record(path.stem)),
    ):
        if not record or record.get("rules") != rules or not path.is_file():
            continue
        stat = path.stat()
        if (record.get("size_bytes"), record.get("source_mtime_ns")) == (stat.st_size, stat.st_mtime_ns):
            return status
        if record.get("content_hash") == (digest or content_hash(path)):
            return status
    return None


def is_up_to_date(store: WindowStore, path: Path, rules: ValidationRules) -> bool:
    return _ingested_as(store, path, asdict(rules)) is not None


def up_to_date_check(store: WindowStore, rules: ValidationRules) -> Callable[[Path], bool]:
    """`is_up_to_date` for many files of one look, each file's answer found once."""
    recorded_rules, answers = asdict(rules), {}

    def check(path: Path) -> bool:
        if path not in answers:
            answers[path] = _ingested_as(store, path, recorded_rules) is not None
        return answers[path]

    return check


def ingest_episode(
    path: Path | str,
    store_path: Path | str,
    rules: ValidationRules = ValidationRules(),
    image_size: int = IMAGE_SIZE,
    force: bool = False,
) -> IngestOutcome:
    """Validate, resize and store one episode, or quarantine it. Never raises for a bad file."""
    started = time.perf_counter()
    path = Path(path)
    store = WindowStore(store_path)
    mtime_ns = path.stat().st_mtime_ns if path.is_file() else None  # taken before hashing
    digest = content_hash(path) if path.is_file() else None
    if not force and _ingested_as(store, path, asdict(rules), digest) == "stored":
        attrs = store.episode_attrs(path.stem)
        return IngestOutcome(path.stem, "unchanged", frames=attrs["num_frames"], summary=attrs)
    try:
        header = inspect_episode(path, rules, digest)
        frames = read_frames(header, image_size, rules)
    except EpisodeRejected as rejection:
        record = {
            "episode_id": path.stem,
            "source_file": str(path),
            "reason": rejection.reason,
            "content_hash": digest,
            "size_bytes": path.stat().st_size if path.is_file() else None,
            "source_mtime_ns": mtime_ns,
            "rules": asdict(rules),
        }
        store.quarantine(path.stem, record)
        return IngestOutcome(path.stem, "rejected", rejection.reason, seconds=time.perf_counter() - started)

    summary = {
        **header.summary(),
        "source_mtime_ns": mtime_ns,
        "rules": asdict(rules),
        "window": rules.window,
        "chunk": rules.chunk,
        "window_starts": window_starts(header.num_frames, rules.window, rules.chunk),
        "image_size": image_size,
        "colour_order": "RGB",
    }
    store.write_episode(header.episode_id, frames, header.actions[:, :2], header.event_types, summary)
    return IngestOutcome(
        header.episode_id,
        "stored",
        frames=header.num_frames,
        seconds=time.perf_counter() - started,
        summary=summary,
    )


def ingest_episodes(
    paths: Iterable[Path | str],
    store_path: Path | str,
    rules: ValidationRules = ValidationRules(),
    image_size: int = IMAGE_SIZE,
    workers: int = 1,
    force: bool = False,
    progress: Callable[[str], None] | None = None,
) -> list[IngestOutcome]:
    """Ingest many episodes; `workers` > 1 spreads them over processes. Order is kept.

    Waits (saying so through `progress`) while another process writes into the same store."""
    paths = [Path(p) for p in paths]
    store = WindowStore(store_path).create(image_size)
    report = progress or (lambda line: None)
    outcomes: list[IngestOutcome] = []

    def record(outcome: IngestOutcome) -> None:
        outcomes.append(outcome)
        report(f"[{len(outcomes)}/{len(paths)}] {outcome.line()}")

    with store.writer_lock(waiting=report):
        store.clear_staging()  # the lock is ours: whatever is staged was left by a killed writer
        if workers <= 1 or len(paths) <= 1:
            for path in paths:
                record(ingest_episode(path, store_path, rules, image_size, force))
            return outcomes
        return _ingest_in_parallel(paths, workers, record, ingest_episode, store_path, rules, image_size, force)


def _ingest_in_parallel(paths: list[Path], workers: int, record, job, *args) -> list[IngestOutcome]:
    """Run `job(path, *args)` on `workers - 1` processes plus this one, largest files first.

    This process works too, so the batch starts at once while the worker processes start
    (about a second: they import the libraries afresh).
    """
    todo = deque(sorted(range(len(paths)), key=lambda i: -_size(paths[i])))
    lock = threading.Lock()
    finished: queue.SimpleQueue = queue.SimpleQueue()
    results: list[IngestOutcome | None] = [None] * len(paths)

    def take() -> int | None:
        with lock:
            return todo.popleft() if todo else None

    def feed(pool: ProcessPoolExecutor) -> None:
        index = take()
        if index is None:
            return
        future = pool.submit(job, paths[index], *args)
        future.add_done_callback(lambda done: (finished.put((index, done)), feed(pool)))

    def drain(block: bool) -> None:
        while not finished.empty() or (block and None in results):
            index, outcome = finished.get()
            results[index] = outcome.result() if isinstance(outcome, Future) else outcome
            record(results[index])

    # forkserver: workers do not inherit the caller's threads, locks or open database handles.
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["vla_pipeline.data.ingest"])
    processes = min(workers, len(paths)) - 1  # never more processes than files to share
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        with ProcessPoolExecutor(processes, mp_context=context, initializer=_start_worker,
                                 initargs=(os.getpid(),)) as pool:
            for _ in range(processes):
                feed(pool)
            while (index := take()) is not None:
                finished.put((index, job(paths[index], *args)))
                drain(block=False)
            drain(block=True)
    finally:
        cv2.setNumThreads(threads)
    return results


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else 0


def _start_worker(batch_pid: int) -> None:
    # Each worker owns one core; OpenCV's own thread pool would only oversubscribe it.
    cv2.setNumThreads(1)
    threading.Thread(target=_exit_when_gone, args=(batch_pid,), daemon=True, name="batch-watch").start()


def _exit_when_gone(batch_pid: int, every_s: float = 0.5) -> None:
    """End this worker once the process that runs the batch is gone (killed, say). A forkserver
    worker is not its child, and it holds the pipes it waits on open itself, so nothing else
    would ever tell it; the forkserver ends in turn once its last worker has."""
    while True:
        time.sleep(every_s)
        try:
            os.kill(batch_pid, 0)
        except (ProcessLookupError, PermissionError):  # gone (its pid reused by another user's process)
            os._exit(1)


def grouped_reasons(reasons: list[str]) -> str:
    """Rejection reasons in one line: alike reasons (equal but for their numbers) counted once,
    numbers that differ shown as their range, e.g. "6 × only 13–16 frames; a training window needs 18"."""
    groups: dict[str, list[list[str]]] = {}
    texts: dict[str, list[str]] = {}
    for reason in reasons:
        template = re.sub(r"\d+(?:\.\d+)?", "#", reason)
        groups.setdefault(template, []).append(re.findall(r"\d+(?:\.\d+)?", reason))
        texts.setdefault(template, re.split(r"\d+(?:\.\d+)?", reason))
    parts = []
    for template, numbers in sorted(groups.items(), key=lambda item: -len(item[1])):
        shown = []
        for column in zip(*numbers):
            values = sorted(set(column), key=float)
            shown.append(values[0] if len(values) == 1 else f"{values[0]}–{values[-1]}")
        pieces = texts[template]
        parts.append(f"{len(numbers)} × " + "".join(p + n for p, n in zip(pieces, shown + [""])))
    return " | ".join(parts)
