"""Reliability with real processes: overlapping ingests, stalled and unfinished copies, killed runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import dagster as dg
import numpy as np
import pytest
from conftest import write_episode_file
from test_dagster_ingest import VLA, cli_env, dagster_home, dagster_instance, describe

from vla_pipeline.data.store import WindowStore
from vla_pipeline.sim.operator import write_sample_episodes

REPO = Path(__file__).resolve().parents[1]


def small_episodes(folder: Path, count: int, first_seed: int = 0) -> list[Path]:
    return [write_episode_file(folder / f"episode_20250614_{first_seed + i:06d}_1box_hori_left_core_medium.h5",
                               seed=first_seed + i) for i in range(count)]


def assert_complete(store: WindowStore, episode_ids) -> None:
    """Every episode stored once, whole: its arrays read back with the frames its attrs announce."""
    assert sorted(store.episode_ids()) == sorted(episode_ids)
    for episode_id in episode_ids:
        group = store.open_episode(episode_id)
        frames = store.episode_attrs(episode_id)["num_frames"]
        assert group["images"].shape[0] == frames and np.asarray(group["images"][frames - 1]).any()
        assert group["actions"].shape == (frames, 2)
    assert not any(store.staging_dir.iterdir()), "a write was left half done"


def partitions(home: Path) -> list[str]:
    with dagster_instance(home) as instance:
        return instance.get_dynamic_partitions("episodes")


# ---------------------------------------------------------------- overlapping runs


def test_two_cli_ingests_at_once_both_succeed(tmp_path):
    folder, store_path = tmp_path / "drop", tmp_path / "store.zarr"
    ids = [p.stem for p in small_episodes(folder, 8)]
    env = cli_env(dagster_home(tmp_path), folder, store_path)
    first = subprocess.Popen([VLA, "ingest"], env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(0.5)
    second = subprocess.Popen([VLA, "ingest"], env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    outputs = [process.communicate(timeout=300)[0] for process in (first, second)]
    for process, output in zip((first, second), outputs):
        assert process.returncode == 0, output
        assert "Traceback" not in output and "IntegrityError" not in output, output
    assert_complete(WindowStore(store_path), ids)
    assert sorted(partitions(tmp_path / "dagster_home")) == sorted(ids)


def test_a_second_writer_waits_for_the_first_and_says_so(tmp_path):
    folder, store_path = tmp_path / "drop", tmp_path / "store.zarr"
    ids = [p.stem for p in small_episodes(folder, 2)]
    env = cli_env(dagster_home(tmp_path), folder, store_path)
    store = WindowStore(store_path).create(224)
    log = tmp_path / "ingest.log"
    with store.writer_lock(), log.open("w") as sink:
        process = subprocess.Popen([VLA, "ingest"], env=env, cwd=tmp_path, stdout=sink, stderr=subprocess.STDOUT,
                                   text=True)
        # Held until it says it waits (or gives up), then a little longer: it must not write meanwhile.
        deadline = time.monotonic() + 240
        while (time.monotonic() < deadline and process.poll() is None and not store.episode_ids()
               and "waiting for pid" not in log.read_text()):
            time.sleep(0.2)
        time.sleep(2)
        assert process.poll() is None and not store.episode_ids(), "it wrote while the store was locked"
    process.wait(timeout=300)
    output = log.read_text()
    assert process.returncode == 0, output
    assert f"waiting for pid {os.getpid()}" in output and f"to finish writing into {store_path}" in output, output
    assert f"done waiting: writing into {store_path} now" in output, output
    assert_complete(store, ids)


SENSOR_RUN = textwrap.dedent('''
    """What the daemon does for the drop-folder sensor: two looks, then the run it requests."""
    import dagster as dg


    def main():
        from vla_pipeline import definitions
        from assets.automation import new_episodes_sensor

        instance = dg.DagsterInstance.get()
        resources = {name: definitions.defs.resources[name] for name in ("episode_folder", "window_store")}
        cursor, runs = None, 0
        for _ in range(2):
            with dg.build_sensor_context(instance=instance, cursor=cursor, resources=resources) as context:
                result = new_episodes_sensor(context)
            if isinstance(result, dg.SkipReason):
                continue
            cursor = result.cursor
            for request in result.run_requests:
                job = definitions.defs.resolve_job_def("ingest_job")
                outcome = job.execute_in_process(instance=instance, tags=request.tags, run_config=request.run_config)
                runs += outcome.success
        print(f"sensor runs succeeded: {runs}")


    if __name__ == "__main__":  # ingest's worker processes import this module again
        main()
''')


def test_cli_and_sensor_run_at_once(tmp_path):
    folder, store_path = tmp_path / "drop", tmp_path / "store.zarr"
    ids = [p.stem for p in small_episodes(folder, 8)]
    env = {**cli_env(dagster_home(tmp_path), folder, store_path), "PYTHONPATH": str(REPO)}
    with dagster_instance(tmp_path / "dagster_home"):
        pass  # the instance exists, as it does wherever a daemon runs sensors
    (tmp_path / "sensor_run.py").write_text(SENSOR_RUN)
    sensor = subprocess.Popen([sys.executable, str(tmp_path / "sensor_run.py")], env=env, cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    cli = subprocess.Popen([VLA, "ingest"], env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sensor_output, cli_output = sensor.communicate(timeout=300)[0], cli.communicate(timeout=300)[0]
    assert cli.returncode == 0 and "Traceback" not in cli_output, cli_output
    assert sensor.returncode == 0 and "Traceback" not in sensor_output, sensor_output
    assert_complete(WindowStore(store_path), ids)
    assert sorted(partitions(tmp_path / "dagster_home")) == sorted(ids)


# ---------------------------------------------------------------- stalled and unfinished copies


class Drop:
    """The sensor in this process, ticking over a folder with a real instance (settle 0)."""

    def __init__(self, root: Path, instance: dg.DagsterInstance):
        from assets.automation import ingest_job, new_episodes_sensor
        from assets.episodes import episode_windows, raw_episode
        from resources import EpisodeFolder, WindowStoreResource

        self.folder, self.store = root / "drop", WindowStore(root / "store.zarr")
        self.folder.mkdir()
        self.instance, self.sensor, self.cursor, self.runs = instance, new_episodes_sensor, None, []
        self.resources = {"episode_folder": EpisodeFolder(path=str(self.folder), settle_seconds=0),
                          "window_store": WindowStoreResource(path=str(self.store.path), workers=1)}
        self.job = dg.Definitions(assets=[raw_episode, episode_windows], jobs=[ingest_job],
                                  resources=self.resources).resolve_job_def("ingest_job")

    def tick(self):
        with dg.build_sensor_context(instance=self.instance, cursor=self.cursor, resources=self.resources) as context:
            result = self.sensor(context)
        if isinstance(result, dg.SensorResult):
            self.cursor = result.cursor
            for request in result.run_requests:
                self.runs.append(request.tags["dagster/asset_partition_range_start"])
                assert self.job.execute_in_process(instance=self.instance, tags=request.tags).success
            return result.skip_reason.skip_message if result.skip_reason else ""
        return result.skip_message


@pytest.fixture
def drop(tmp_path):
    (tmp_path / "dagster_home").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "dagster_home")) as instance:
        yield Drop(tmp_path, instance)


HOLD_OPEN = "import h5py, sys, time; f = h5py.File(sys.argv[1], 'a'); print('open', flush=True); sys.stdin.read()"


def test_a_file_a_writer_holds_is_pending_until_closed(drop, tmp_path):
    path = write_episode_file(drop.folder / "episode_20250614_101502_1box_hori_left_core_medium.h5")
    writer = subprocess.Popen([sys.executable, "-c", HOLD_OPEN, str(path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "open"
        assert "1 still being written" in drop.tick()  # the first look: not yet known to be quiet
        for _ in range(3):
            message = drop.tick()
            assert "pending" in message and "a writer still has it open" in message, message
        env = {**os.environ, "VLA_STORE": str(drop.store.path)}
        listed = subprocess.run([VLA, "episodes", "--json", "--folder", str(drop.folder)], env=env,
                                capture_output=True, text=True, check=True).stdout
        assert json.loads(listed)["reason"] == "still being copied: a writer still has it open", listed
    finally:
        writer.stdin.close()
        writer.wait(30)
    drop.tick(), drop.tick()
    assert drop.runs == [path.stem]  # ingested exactly once, when complete
    assert drop.store.episode_ids() == [path.stem] and not drop.store.quarantined_ids()


def test_a_copy_stalled_at_40_percent_waits_and_is_taken_once_complete(drop, tmp_path):
    finished = write_episode_file(tmp_path / "robot" / "episode_20250614_101503_1box_hori_right_core_far.h5")
    data = finished.read_bytes()
    copy = drop.folder / finished.name
    copy.write_bytes(data[: int(len(data) * 0.4)])
    stalled = time.time() - 30  # quiet for far longer than settle_seconds, far less than max_pending_seconds
    os.utime(copy, (stalled, stalled))
    drop.tick()  # the first look
    for _ in range(3):
        message = drop.tick()
        assert "pending" in message and "does not read as a complete HDF5 file" in message, message
    assert not drop.store.quarantined_ids() and not drop.runs
    with copy.open("ab") as handle:  # the copy resumes and completes
        handle.write(data[int(len(data) * 0.4):])
    drop.tick(), drop.tick(), drop.tick()
    assert drop.runs == [copy.stem]
    assert drop.store.episode_ids() == [copy.stem] and not drop.store.quarantined_ids()


def test_a_stalled_copy_older_than_max_pending_is_rejected(drop, tmp_path):
    finished = write_episode_file(tmp_path / "robot" / "episode_20250614_101504_1box_hori_right_core_far.h5")
    copy = drop.folder / finished.name
    copy.write_bytes(finished.read_bytes()[:5000])
    abandoned = time.time() - 3600
    os.utime(copy, (abandoned, abandoned))
    drop.tick(), drop.tick()
    assert drop.runs == [copy.stem]
    assert "truncated" in drop.store.quarantine_record(copy.stem)["reason"]


def test_cli_leaves_a_stalled_copy_pending(tmp_path):
    folder, store_path = tmp_path / "drop", tmp_path / "store.zarr"
    good = small_episodes(folder, 1)[0]
    half = folder / "episode_20250614_101505_1box_hori_left_core_close.h5"
    half.write_bytes(good.read_bytes()[: good.stat().st_size * 2 // 5])
    env = cli_env(dagster_home(tmp_path), folder, store_path)
    result = subprocess.run([VLA, "ingest"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, describe(result)
    assert "1 to ingest, 1 still pending" in result.stdout and f"pending {half.stem}: does not read" in result.stdout
    store = WindowStore(store_path)
    assert store.episode_ids() == [good.stem] and not store.quarantined_ids()


# ---------------------------------------------------------------- killed runs


def our_processes(marker: str) -> list[int]:
    """Processes whose environment carries `marker` (this test's store path), this one excepted."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if marker.encode() in (entry / "environ").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc to find the worker processes")
def test_killed_ingest_leaves_no_workers_and_reruns_cleanly(tmp_path):
    folder, store_path = tmp_path / "drop", tmp_path / "store.zarr"
    ids = [p.stem for p in write_sample_episodes(folder, 10, seed=4, height=480, width=640)]
    env = cli_env(dagster_home(tmp_path), folder, store_path)
    killed = subprocess.Popen([VLA, "ingest"], env=env, cwd=tmp_path, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    store, workers_seen = WindowStore(store_path), 0
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (store.episodes_dir.is_dir() and store.episode_ids()):
        workers_seen = max(workers_seen, len(our_processes(str(store_path))) - 1)
        time.sleep(0.05)
    assert store.episode_ids() and killed.poll() is None, "killed after it finished: nothing tested"
    workers_seen = max(workers_seen, len(our_processes(str(store_path))) - 1)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    deadline = time.monotonic() + 10
    while our_processes(str(store_path)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert workers_seen >= 1, "no worker process ran: nothing was tested"
    assert our_processes(str(store_path)) == [], "processes of the killed ingest live on"

    rerun = subprocess.run([VLA, "ingest"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, describe(rerun)
    accepted = [i for i in ids if not store.quarantine_record(i)]
    assert_complete(store, accepted)
