"""Incremental update: the work to take in ONE new episode with 5 vs 50 episodes already stored.

    .venv/bin/python benchmarks/incremental.py [--new 5] [--repeat 5] [--seed 0] [--quiet-wait 3]

Setup per size N, not measured: a drop folder with the first N sample episodes (720x1280, made
and cached as by benchmarks/ingest.py), a fresh store with them ingested and the split saved, and
a FolderState primed by two scans, like the sensor's cursor after handing them to ingest. A round
copies one new episode into the folder and times the automation's incremental path, in process:

  scan_folder twice (settle_seconds=0)  the sensor's two looks that make the new file due
  is_up_to_date on the due files        the size+mtime / content-hash skip
  ingest_episodes(due, workers=1)       validate, decode, resize, write (atomic per episode)
  load_split + split_from_store + save_split

Measured: episode files read (opened by Python - audit hook - or by h5py; decoded by read_frames),
store files/bytes written (new, or size, mtime or inode changed), wall time and this process's CPU
time (all threads; less sensitive to other load). After each round the new episode is taken out
again (store, split.json, folder, cursor): every round starts from exactly N stored episodes, and
both sizes take in the same new episodes (sample episodes 50 and up, --repeat times each), so the
50/5 ratios compare like with like. Rounds alternate the sizes; figures are medians, plus the
ratio of the best rounds (least disturbed by other load). Dagster's per-run cost is left out.
Target: wall time 50/5 <= 1.2 (medians). Exits 1 if an existing episode was read or rewritten,
or the new one was not taken in.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import cv2
import h5py

import vla_pipeline.data.ingest as ingest_module
from vla_pipeline.data.episodes import inspect_episode
from vla_pipeline.data.ingest import episode_files, ingest_episodes, is_up_to_date
from vla_pipeline.data.schema import IMAGE_SIZE
from vla_pipeline.training.split import SPLIT_FILE, load_split, save_split, split_from_store
from vla_pipeline.data.store import WindowStore
from vla_pipeline.data.watch import FolderState, scan_folder

from ingest import OUT, RULES, accepted, competitors, sample_folder, snapshot, wait_for_quiet

SIZES = (5, 50)
PHASES = ("scan x2", "is_up_to_date", "ingest", "split")
WATCHERS: list = []  # the audit hook hands every path Python opens to the innermost watcher


@contextmanager
def reads(*roots: Path):
    """Names of the files under `roots` opened (Python open via the audit hook, h5py) and decoded."""
    seen, prefixes = {"opened": set(), "decoded": set()}, tuple(f"{root}{os.sep}" for root in roots)
    is_hdf5, read_frames = h5py.is_hdf5, ingest_module.read_frames

    def note(path) -> None:
        if isinstance(path, str | bytes | os.PathLike) and os.fsdecode(path).startswith(prefixes):
            seen["opened"].add(os.path.basename(os.fsdecode(path)))

    class File(h5py.File):
        def __init__(self, name, *args, **kwargs):
            note(name)
            super().__init__(name, *args, **kwargs)

    def decode(header, *args, **kwargs):
        seen["decoded"].add(header.path.name)
        return read_frames(header, *args, **kwargs)

    with mock.patch.object(h5py, "File", File), mock.patch.object(ingest_module, "read_frames", decode), \
            mock.patch.object(h5py, "is_hdf5", lambda path: (note(path), is_hdf5(path))[1]):
        WATCHERS.append(note)
        try:
            yield seen
        finally:
            WATCHERS.pop()


def store_files(root: Path) -> dict[str, tuple[int, int, int]]:
    return {str(path.relative_to(root)): (stat.st_size, stat.st_mtime_ns, stat.st_ino)
            for path in root.rglob("*") if path.is_file() for stat in [path.stat()]}


def set_up(n: int, pool: list[Path], scratch: Path) -> dict:
    folder, store = scratch / f"drop-{n}", WindowStore(scratch / f"store-{n}.zarr")
    folder.mkdir()
    for path in pool[:n]:
        (folder / path.name).symlink_to(path)
    ingest_episodes(episode_files(folder), store.path, RULES, IMAGE_SIZE, workers=2)
    save_split(store, split_from_store(store, load_split(store)))
    state = scan_folder(folder, scan_folder(folder, FolderState(), settle_seconds=0).state, settle_seconds=0).state
    assert sorted(state.handed) == sorted(p.stem for p in pool[:n])
    return {"n": n, "folder": folder, "store": store, "cursor": state.to_json(),
            "split": store.read_text(SPLIT_FILE), "stored": len(store.episode_ids())}


def add_one(site: dict, new: Path, pool_dir: Path) -> dict:
    store, target = site["store"], site["folder"] / new.name
    shutil.copyfile(new, target)  # a fresh drop: new mtime, real file
    before, times = store_files(store.path), []
    with reads(site["folder"], pool_dir) as seen:
        started, cpu = time.perf_counter(), time.process_time()
        scan = scan_folder(site["folder"], FolderState.from_json(site["cursor"]), settle_seconds=0)
        scan = scan_folder(site["folder"], scan.state, settle_seconds=0)
        times.append(time.perf_counter())
        due = [path for path in scan.due if not is_up_to_date(store, path, RULES)]
        times.append(time.perf_counter())
        outcomes = ingest_episodes(due, store.path, RULES, IMAGE_SIZE, workers=1)
        times.append(time.perf_counter())
        save_split(store, split_from_store(store, load_split(store)))
        times.append(time.perf_counter())
        cpu = time.process_time() - cpu
    after = store_files(store.path)
    written = [name for name, sig in after.items() if before.get(name) != sig]
    touched = sorted({name.split(os.sep)[1] for name in written + [n for n in before if n not in after]
                      if name.startswith("episodes" + os.sep)} - {new.stem})
    store.remove_episode(new.stem)
    store.write_text(SPLIT_FILE, site["split"])
    target.unlink()
    return {"n": site["n"], "new": new.stem, "due": [p.stem for p in scan.due], "touched": touched,
            "status": [o.status for o in outcomes], "opened": sorted(seen["opened"]),
            "decoded": sorted(seen["decoded"]), "files_written": len(written),
            "bytes_written": sum(after[name][0] for name in written), "seconds": times[-1] - started,
            "cpu": cpu, "phases": dict(zip(PHASES, [b - a for a, b in zip([started, *times], times)]))}


def machine() -> str:
    cpu = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
           if line.startswith("model name")]
    return (f"{cpu[0] if cpu else platform.processor()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}, "
            f"Python {platform.python_version()}, OpenCV threads {cv2.getNumThreads()}")


def report(rounds: list[dict], stored: dict[int, int]) -> bool:
    """Print the tables and checks; True when all checks pass."""
    def median(n: int, key) -> float:
        return statistics.median(key(r) for r in rounds if r["n"] == n)
    measures = {"episodes read": lambda r: len(r["opened"]), "episodes decoded": lambda r: len(r["decoded"]),
                "store files written": lambda r: r["files_written"],
                "store bytes written": lambda r: r["bytes_written"], "wall time": lambda r: r["seconds"],
                "CPU time": lambda r: r["cpu"]}
    ms = "{:.0f} ms".format
    shown = {"store bytes written": lambda v: f"{v / 1e6:.3f} MB", "wall time": lambda v: ms(v * 1000),
             "CPU time": lambda v: ms(v * 1000)}
    table = {n: {name: median(n, key) for name, key in measures.items()} for n in SIZES}
    small, large = SIZES
    ratio = {name: table[large][name] / table[small][name] if table[small][name] else float("nan") for name in measures}
    print(f"\nmedians of {len(rounds) // len(SIZES)} rounds per size\n")
    print("| stored before | " + " | ".join(measures) + " |\n|---:|" + "---:|" * len(measures))
    for n in SIZES:
        print(f"| {stored[n]} ({n} files) | "
              + " | ".join(shown.get(name, "{:g}".format)(table[n][name]) for name in measures) + " |")
    print(f"| ratio {large}/{small} | " + " | ".join(f"{ratio[name]:.3f}x" for name in measures) + " |")
    best = {key: min(r[key] for r in rounds if r["n"] == large) / min(r[key] for r in rounds if r["n"] == small)
            for key in ("seconds", "cpu")}
    print(f"| ratio {large}/{small}, best rounds |" + " |" * (len(measures) - 2)
          + f" {best['seconds']:.3f}x | {best['cpu']:.3f}x |")
    print(f"\n| phase (median ms) | N={small} | N={large} | ratio {large}/{small} | ms per extra file |\n"
          "|---|---:|---:|---:|---:|")
    for phase in PHASES:
        a, b = (median(n, lambda r: r["phases"][phase]) for n in SIZES)
        print(f"| {phase} | {a * 1000:.2f} | {b * 1000:.2f} | {b / a:.2f}x | {(b - a) * 1000 / (large - small):+.3f} |")
    if busy := sum(bool(r["busy"]) for r in rounds):
        print(f"\nbusy: other processes used CPU in {busy} of {len(rounds)} rounds (medians taken)")

    reread = sorted({name for r in rounds for name in r["opened"] + r["decoded"] if Path(name).stem != r["new"]})
    touched = sorted({name for r in rounds for name in r["touched"]})
    missed = [r["new"] for r in rounds if r["due"] != [r["new"]] or r["status"] != ["stored"]]
    for label, found in (("existing episodes re-read", reread), ("existing episodes rewritten", touched),
                         ("new episode not due or not stored", missed)):
        print(f"{label}: none (ok)" if not found else f"ERROR: {label}: {', '.join(found)}")
    met = ratio["wall time"] <= 1.2
    print(f"wall-time ratio {large}/{small}: {ratio['wall time']:.3f}x of medians ({best['seconds']:.3f}x of best "
          f"rounds), target <= 1.2: {'met' if met else 'NOT met'}")
    return not (reread or touched or missed)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new", type=int, default=5, help="rounds: sample episodes 50.. to add (default 5; "
                        "rejected ones are skipped)")
    parser.add_argument("--repeat", type=int, default=5, help="rounds per new episode and size (default 5)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet-wait", type=float, default=3, help="max s to wait for a quiet CPU per round (3)")
    args = parser.parse_args()

    begun = time.perf_counter()
    print(f"command: {Path(sys.executable).name} {' '.join(sys.argv)}\nmachine: {machine()}")
    OUT.mkdir(parents=True, exist_ok=True)
    pool_dir = sample_folder(max(SIZES) + args.new, args.seed).resolve()
    pool = episode_files(pool_dir)
    new = accepted(pool[max(SIZES):])
    height, width = inspect_episode(new[0], RULES).summary()["source_resolution"]
    print(f"episodes: {pool_dir}, {height}x{width} source frames; stored: the first N files; "
          f"new: the {len(new)} accepted of the next {args.new}, the same for every N, x{args.repeat}")

    rounds, sites = [], {}
    sys.addaudithook(lambda event, args: event == "open" and WATCHERS and WATCHERS[-1](args[0]))
    scratch = Path(tempfile.mkdtemp(prefix="incremental-", dir=OUT))
    try:
        for n in SIZES:
            started, sites[n] = time.perf_counter(), set_up(n, pool, scratch)
            print(f"setup N={n}: {sites[n]['stored']} stored (rest rejected), split saved, "
                  f"cursor primed ({time.perf_counter() - started:.1f} s)", flush=True)
        for index, episode in enumerate(new * args.repeat):
            for n in SIZES if index % 2 == 0 else SIZES[::-1]:
                wait_for_quiet(args.quiet_wait)
                before = snapshot()
                r = add_one(sites[n], episode, pool_dir)
                r["busy"] = competitors(before, snapshot(), r["seconds"])
                rounds.append(r)
                print(f"  round {index + 1} N={n}: {r['new']} {'/'.join(r['status'])}; read {r['opened']}; "
                      f"wrote {r['files_written']} files, {r['bytes_written']:,} B; "
                      f"{r['seconds'] * 1000:.0f} ms, {r['cpu'] * 1000:.0f} ms CPU"
                      + (f" (busy: {', '.join(r['busy'])})" if r["busy"] else ""), flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    ok = report(rounds, {n: site["stored"] for n, site in sites.items()})
    print(f"total run time: {time.perf_counter() - begun:.1f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
