"""LeRobotDataset v3.0 export and import: their cost against the store and the HDF5 ingest.

    .venv/bin/python benchmarks/lerobot.py [--episodes 24] [--append 4]

Renders --episodes sample episodes (720p, both of the collector's layouts) and ingests them into a fresh store
(the HDF5 ingest: validate, resize, store; one worker), then:
  export    vla_pipeline.data.lerobot.export_lerobot over the whole store: seconds per episode and per stored
            frame; the dataset's size on disk against the store's
  append    --append more episodes rendered, ingested and exported into the same dataset: what a re-export after
            new episodes costs (only they are encoded), against the first export
  import    import_lerobot of the dataset into collector files, then their ingest into a second store: frames
            per second of each, against the HDF5 ingest of the rendered episodes
Each timing waits up to --quiet-wait s for a quiet CPU and is marked "busy" if other processes competed
(benchmarks/ingest.py's check).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from pathlib import Path

from vla_pipeline.data.ingest import episode_files, ingest_episodes
from vla_pipeline.data.lerobot import export_lerobot, import_lerobot
from vla_pipeline.data.store import WindowStore
from vla_pipeline.sim.operator import write_sample_episodes

from ingest import OUT  # benchmarks/ingest.py, beside this script
from train_throughput import measured


def disk_bytes(path: Path) -> int:
    return sum(item.stat().st_size for item in path.rglob("*") if item.is_file())


def timed(work, quiet_wait: float) -> tuple[object, float, list[str]]:
    """(work(), its seconds, the processes that competed meanwhile)."""
    def run():
        started = time.perf_counter()
        result = work()
        return result, time.perf_counter() - started

    (result, seconds), busy = measured(run, quiet_wait)
    return result, seconds, busy


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--episodes", type=int, default=24, help="sample episodes exported first (default 24)")
    parser.add_argument("--append", type=int, default=4, help="episodes added, then re-exported (default 4)")
    parser.add_argument("--quiet-wait", type=float, default=30, help="max s to wait for a quiet CPU (30)")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    print(f"command: {shlex.join([Path(sys.executable).name, *sys.argv])}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(dir=OUT) as scratch:
        scratch = Path(scratch)
        write_sample_episodes(scratch / "episodes", args.episodes, seed=11)
        store = WindowStore(scratch / "store.zarr")
        outcomes, ingest_s, busy = timed(lambda: ingest_episodes(episode_files(scratch / "episodes"), store.path),
                                         args.quiet_wait)
        frames = sum(outcome.frames for outcome in outcomes)
        rows.append(("HDF5 ingest (720p gzip files -> store)", args.episodes, frames, ingest_s, busy))
        report, export_s, busy = timed(lambda: export_lerobot(store, scratch / "lerobot"), args.quiet_wait)
        rows.append(("export (store -> LeRobot v3.0)", report.total_episodes, report.total_frames, export_s, busy))
        store_bytes, dataset_bytes = disk_bytes(store.path), disk_bytes(scratch / "lerobot")

        write_sample_episodes(scratch / "more", args.append, seed=12)
        ingest_episodes(episode_files(scratch / "more"), store.path)
        report, append_s, busy = timed(lambda: export_lerobot(store, scratch / "lerobot"), args.quiet_wait)
        assert report.mode == "append", report.mode
        rows.append((f"re-export after {args.append} new episodes (append)", len(report.written), report.frames,
                     append_s, busy))

        imported, import_s, busy = timed(lambda: import_lerobot(str(scratch / "lerobot"), scratch / "imported",
                                                                ["linear_x", "linear_y"]), args.quiet_wait)
        rows.append(("import (LeRobot v3.0 -> collector files)", len(imported.files), imported.frames, import_s, busy))
        outcomes, again_s, busy = timed(lambda: ingest_episodes(episode_files(scratch / "imported"),
                                                                scratch / "again.zarr"), args.quiet_wait)
        rows.append(("ingest of the imported files (224x224 -> store)", len(outcomes),
                     sum(outcome.frames for outcome in outcomes), again_s, busy))

    print("\n| step | episodes | frames | seconds | ms per episode | ms per frame | frames/s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, episodes, count, seconds, busy in rows:
        print(f"| {name}{' (busy)' if busy else ''} | {episodes} | {count} | {seconds:.2f} | "
              f"{seconds / max(episodes, 1) * 1e3:.0f} | {seconds / max(count, 1) * 1e3:.1f} | {count / seconds:.0f} |")
    print(f"\ndisk: the store {store_bytes / 2**20:.1f} MiB, the LeRobot dataset {dataset_bytes / 2**20:.2f} MiB "
          f"({dataset_bytes / store_bytes:.3f}x) for the same {args.episodes} episodes")
    print(f"append: {append_s / max(args.append, 1) * 1e3:.0f} ms per new episode against "
          f"{export_s / args.episodes * 1e3:.0f} ms per episode of the first export")
    if any(row[4] for row in rows):
        print("(busy): other processes used the CPU during that measurement; rerun on a quiet machine")
    return 0


if __name__ == "__main__":
    sys.exit(main())
