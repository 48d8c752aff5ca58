"""From drop to stored under `make ui`: how long a new episode file waits before it is in the store.

    .venv/bin/python benchmarks/sensor_latency.py [--drops 3] [--json PATH]

Starts `make ui` (dagster dev: webserver, daemon, code server) on a temporary DAGSTER_HOME,
drop folder and store, waits until the sensor has ticked once on the empty folder, then drops
sample episodes one at a time (written under a temporary name and renamed, as a finished copy
appears) and times each until its group is in the store. Also printed per drop, from the run's
own records: when the sensor's run was created, when it started, when it ended. Always exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET_S = 15.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def served(url: str) -> bool:
    query = json.dumps({"query": "{ workspaceOrError { ... on Workspace { locationEntries { loadStatus } } } }"})
    request = urllib.request.Request(f"{url}/graphql", query.encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            entries = json.load(response)["data"]["workspaceOrError"]["locationEntries"]
    except OSError:
        return False
    return any(entry["loadStatus"] == "LOADED" for entry in entries)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--drops", type=int, default=3, help="episodes dropped one after another (default 3)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--keep", action="store_true", help="keep the temporary home (make ui's log is in it)")
    args = parser.parse_args()

    from vla_pipeline.sim.operator import write_sample_episodes

    home = Path(tempfile.mkdtemp(prefix="vla-sensor-"))
    shutil.copy(ROOT / ".dagster" / "dagster.yaml", home / "dagster.yaml")
    drops = home / "episodes"
    drops.mkdir()
    sources = [p for p in write_sample_episodes(home / "samples", args.drops + 4, seed=11)
               if p.stat().st_size][: args.drops]
    env = {**os.environ, "DAGSTER_HOME": str(home), "VLA_EPISODES_DIR": str(drops),
           "VLA_STORE": str(home / "store.zarr"), "VLA_MODELS": str(home / "models"),
           "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}"}
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = (home / "make-ui.log").open("wb")
    started = time.perf_counter()
    ui = subprocess.Popen(["make", "--no-print-directory", "ui", f"UI_PORT={port}"], cwd=ROOT, env=env,
                          stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    rows = []
    try:
        while not served(url):
            if ui.poll() is not None or time.perf_counter() - started > 180:
                print(f"make ui did not serve; log in {home / 'make-ui.log'}")
                return 0
            time.sleep(0.5)
        serve_s = time.perf_counter() - started
        print(f"make ui served the code location after {serve_s:.1f} s; waiting 15 s for the daemon's first ticks")
        time.sleep(15)

        os.environ["DAGSTER_HOME"] = str(home)
        import dagster as dg

        from vla_pipeline.data.store import WindowStore

        store = WindowStore(home / "store.zarr")
        for source in sources:
            partial = drops / f".{source.name}.part"
            shutil.copy(source, partial)
            dropped = time.time()
            partial.rename(drops / source.name)
            while source.stem not in set(store.episode_ids()):
                if time.time() - dropped > 120:
                    print(f"{source.stem}: not stored after 120 s; log in {home / 'make-ui.log'}")
                    break
                time.sleep(0.1)
            stored = time.time()
            with dg.DagsterInstance.get() as instance:
                run = next(r for r in instance.get_run_records() if r.dagster_run.tags.get(
                    "dagster/asset_partition_range_start") == source.stem)
            row = {"episode": source.stem, "drop_to_stored_s": round(stored - dropped, 2),
                   "drop_to_run_created_s": round(run.create_timestamp.timestamp() - dropped, 2),
                   "run_start_s": round((run.start_time or dropped) - dropped, 2),
                   "run_end_s": round((run.end_time or stored) - dropped, 2)}
            rows.append(row)
            print(f"{row['episode'][:48]:<48}  run created {row['drop_to_run_created_s']:5.1f} s, started "
                  f"{row['run_start_s']:5.1f} s, ended {row['run_end_s']:5.1f} s, stored {row['drop_to_stored_s']:5.1f} s")
            time.sleep(6)  # the next drop lands at an arbitrary point of the sensor's interval
    finally:
        os.killpg(ui.pid, signal.SIGTERM)
        try:
            ui.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(ui.pid, signal.SIGKILL)
    if rows:
        median = statistics.median(r["drop_to_stored_s"] for r in rows)
        print(f"\ndrop → stored under make ui: median {median:.1f} s, max {max(r['drop_to_stored_s'] for r in rows):.1f} s "
              f"over {len(rows)} drops (target <= {TARGET_S:.0f} s); make ui served after {serve_s:.1f} s")
        if args.json:
            args.json.write_text(json.dumps({"rows": rows, "median_s": median, "serve_s": serve_s}, indent=1))
    if args.keep:
        print(f"kept {home} (make ui's log: {home / 'make-ui.log'})")
    else:
        shutil.rmtree(home, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
