"""The window store: layout, atomic and idempotent writes, quarantine, statistics."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import zarr
from conftest import GOOD_NAME, write_episode_file

from vla_pipeline.data.episodes import ValidationRules
from vla_pipeline.data.ingest import episode_files, ingest_episode, ingest_episodes, is_up_to_date
from vla_pipeline.data.stats import ActionStats
from vla_pipeline.data import store as store_module
from vla_pipeline.data.store import FRAMES_PER_CHUNK, StoreError, WindowStore


@pytest.fixture
def store(tmp_path) -> WindowStore:
    return WindowStore(tmp_path / "store.zarr").create(224)


@pytest.mark.parametrize("frames", [1, 18, 19])
def test_frames_read_back_whole_and_in_windows_for_any_chunk_fit(store, frames):
    images = np.random.default_rng(frames).integers(0, 256, (frames, 224, 224, 3), dtype=np.uint8)
    store.write_episode("e", images, np.zeros((frames, 2)), ["start_action"] * frames, {})
    stored = store.open_episode("e")["images"]
    np.testing.assert_array_equal(stored[:], images)
    for start in range(0, frames, 3):
        np.testing.assert_array_equal(stored[start : start + 8], images[start : start + 8])


def test_stored_episode_layout(episode_dir, store):
    path = write_episode_file(episode_dir / f"{GOOD_NAME}.h5", frames=20)
    outcome = ingest_episode(path, store.path)
    assert outcome.status == "stored"
    group = store.open_episode(GOOD_NAME)
    assert group["images"].shape == (20, 224, 224, 3) and group["images"].dtype == np.uint8
    assert group["images"].chunks == (FRAMES_PER_CHUNK, 224, 224, 3)  # 20 frames: five chunks, one shard
    assert group["images"].shards == (20, 224, 224, 3)
    assert group["actions"].shape == (20, 2) and group["actions"].dtype == np.float32
    assert group["event_types"][:].tolist()[:2] == ["episode_start", "start_action"]
    attrs = group.attrs
    assert attrs["window_starts"] == [0, 1, 2]
    assert attrs["side"] == "left" and attrs["scenario"] == "1box_hori_left_core_medium"
    assert attrs["colour_order"] == "RGB" and attrs["source_colour_order"] == "BGR"
    stats = attrs["action_stats"]
    assert stats["count"] == 20 and len(stats["mean"]) == 2
    # The store is plain Zarr: readable without this package.
    root = zarr.open_group(store.path, mode="r")
    assert root.attrs["layout_version"] == 1
    assert root["episodes"][GOOD_NAME]["actions"].shape == (20, 2)


def test_actions_keep_raw_units(episode_dir, store):
    actions = np.zeros((18, 3), np.float32)
    actions[1:, 0] = 1.15
    actions[5, 1] = -1.15
    path = write_episode_file(episode_dir / f"{GOOD_NAME}.h5", actions=actions)
    ingest_episode(path, store.path)
    np.testing.assert_array_equal(store.open_episode(GOOD_NAME)["actions"][:], actions[:, :2])


def test_unchanged_file_is_not_rewritten(episode_dir, store):
    path = write_episode_file(episode_dir / f"{GOOD_NAME}.h5")
    first = ingest_episode(path, store.path)
    written = (store.episodes_dir / GOOD_NAME / "zarr.json").stat().st_mtime_ns
    path.touch()  # a new mtime alone is no change
    again = ingest_episode(path, store.path)
    assert (first.status, again.status) == ("stored", "unchanged")
    assert (store.episodes_dir / GOOD_NAME / "zarr.json").stat().st_mtime_ns == written
    assert is_up_to_date(store, path, ValidationRules())


def test_changed_file_replaces_episode(episode_dir, store):
    path = write_episode_file(episode_dir / f"{GOOD_NAME}.h5", frames=18, seed=1)
    ingest_episode(path, store.path)
    old_hash = store.episode_attrs(GOOD_NAME)["content_hash"]
    write_episode_file(path, frames=22, seed=2)
    assert not is_up_to_date(store, path, ValidationRules())
    assert ingest_episode(path, store.path).status == "stored"
    attrs = store.episode_attrs(GOOD_NAME)
    assert attrs["content_hash"] != old_hash and attrs["num_frames"] == 22
    assert store.open_episode(GOOD_NAME)["images"].shape[0] == 22
    assert store.episode_ids() == [GOOD_NAME]
    assert not any(store.staging_dir.iterdir())


def test_new_rules_reprocess_unchanged_file(episode_dir, store):
    path = write_episode_file(episode_dir / f"{GOOD_NAME}.h5", frames=20)
    ingest_episode(path, store.path)
    rules = ValidationRules(window=8, chunk=1)
    assert not is_up_to_date(store, path, rules)
    assert ingest_episode(path, store.path, rules).status == "stored"
    assert store.episode_attrs(GOOD_NAME)["window_starts"] == list(range(12))


def test_crash_mid_write_leaves_no_half_episode(episode_dir, store, monkeypatch):
    path = write_episode_file(episode_dir / f"{GOOD_NAME}.h5")

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(store_module, "replace_directory", crash)
    with pytest.raises(KeyboardInterrupt):
        ingest_episode(path, store.path)
    assert store.episode_ids() == [] and not store.has_episode(GOOD_NAME)
    assert any(store.staging_dir.iterdir())  # the half-written copy sits in staging, unseen
    with pytest.raises(StoreError):
        store.open_episode(GOOD_NAME)
    monkeypatch.undo()
    assert ingest_episode(path, store.path).status == "stored"


def test_crash_while_replacing_keeps_old_version(episode_dir, store, monkeypatch):
    path = write_episode_file(episode_dir / f"{GOOD_NAME}.h5", frames=18, seed=1)
    ingest_episode(path, store.path)
    before = store.open_episode(GOOD_NAME)["images"][:]
    write_episode_file(path, frames=22, seed=2)

    original = zarr.Group.create_array
    calls = []

    def crash_on_second_array(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(zarr.Group, "create_array", crash_on_second_array)
    with pytest.raises(OSError):
        ingest_episode(path, store.path)
    monkeypatch.undo()
    np.testing.assert_array_equal(store.open_episode(GOOD_NAME)["images"][:], before)


def test_stale_staging_is_cleared(store):
    leftover = store.staging_dir / "episode_x.deadbeef"
    leftover.mkdir()
    import os

    os.utime(leftover, (0, 0))
    store.create(224)
    assert not leftover.exists()


def test_rejected_episode_is_quarantined_and_withdrawn(episode_dir, store):
    path = write_episode_file(episode_dir / f"{GOOD_NAME}.h5")
    ingest_episode(path, store.path)
    assert store.has_episode(GOOD_NAME)
    actions = np.zeros((18, 3), np.float32)
    actions[2, 0] = np.nan
    write_episode_file(path, actions=actions)
    outcome = ingest_episode(path, store.path)
    assert outcome.status == "rejected" and "NaN at frames 2" in outcome.reason
    assert not store.has_episode(GOOD_NAME)
    record = store.quarantine_record(GOOD_NAME)
    assert "NaN" in record["reason"] and record["content_hash"]
    assert is_up_to_date(store, path, ValidationRules())  # same bad bytes: not retried
    write_episode_file(path)  # fixed file: stored again, quarantine cleared
    assert ingest_episode(path, store.path).status == "stored"
    assert store.quarantined_ids() == []


def test_bad_file_among_good_ones(episode_dir, store):
    good = [write_episode_file(episode_dir / f"episode_2025061{i}_101502_1box_hori_right_core_far.h5", seed=i)
            for i in range(3)]
    bad = episode_dir / "episode_20250611_999999_1box_hori_left_core_far.h5"
    bad.write_bytes(b"\0" * 100)
    (episode_dir / "notes.txt").write_text("ignored")
    files = episode_files(episode_dir)
    assert bad in files and len(files) == 4
    outcomes = ingest_episodes(files, store.path, workers=2)
    assert [o.status for o in outcomes].count("stored") == 3
    assert store.episode_ids() == sorted(p.stem for p in good)
    assert store.quarantined_ids() == [bad.stem]


def test_parallel_ingest_keeps_input_order(episode_dir, store):
    paths = [write_episode_file(episode_dir / f"episode_2025061{i}_101502_1box_hori_left_core_far.h5",
                                frames=18 + 3 * i, seed=i) for i in range(5)]
    lines = []
    outcomes = ingest_episodes(paths, store.path, workers=3, progress=lines.append)
    assert [o.episode_id for o in outcomes] == [p.stem for p in paths]
    assert [o.frames for o in outcomes] == [18, 21, 24, 27, 30]
    assert len(lines) == 5 and lines[-1].startswith("[5/5]")


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        episode_files(tmp_path / "nope")


def test_unknown_layout_version_is_refused(tmp_path):
    root = zarr.open_group(tmp_path / "old.zarr", mode="w")
    root.attrs["layout_version"] = 99
    with pytest.raises(StoreError, match="layout 99"):
        WindowStore(tmp_path / "old.zarr").create(224)


RACE = """
import sys, time
from vla_pipeline.data.store import WindowStore
start = float(sys.argv[2])
time.sleep(max(0.0, start - time.time()))
WindowStore(sys.argv[1]).create(224)
"""


def test_processes_racing_to_create_the_store_all_open_it(tmp_path):
    """The sensor and `vla-pipeline ingest` start together on a new store path."""
    for trial in range(3):
        path, start = tmp_path / f"store{trial}.zarr", time.time() + 4
        racers = [subprocess.Popen([sys.executable, "-c", RACE, str(path), str(start)], stderr=subprocess.PIPE,
                                   text=True) for _ in range(6)]
        errors = [racer.communicate(timeout=120)[1] for racer in racers]
        assert all(racer.returncode == 0 for racer in racers), "\n".join(errors)
        assert zarr.open_group(path, mode="r").attrs["layout_version"] == store_module.LAYOUT_VERSION


def test_merged_statistics_equal_a_full_rescan(episode_dir, store):
    rng = np.random.default_rng(0)
    all_actions = []
    for index, frames in enumerate((18, 25, 19)):
        actions = np.zeros((frames, 3), np.float32)
        actions[:, :2] = rng.choice([-1.15, 0.0, 1.15], size=(frames, 2))
        all_actions.append(actions[:, :2])
        path = write_episode_file(episode_dir / f"episode_2025061{index}_101502_1box_hori_left_core_far.h5",
                                  actions=actions, seed=index)
        ingest_episode(path, store.path)
    merged = store.action_stats(store.episode_ids())
    everything = ActionStats.of(np.concatenate(all_actions))
    assert merged.count == everything.count == 62
    np.testing.assert_allclose(merged.mean, everything.mean, atol=1e-9)
    np.testing.assert_allclose(merged.var, everything.var, atol=1e-9)
    np.testing.assert_array_equal(merged.min, everything.min)
    np.testing.assert_array_equal(merged.max, everything.max)


def test_store_survives_copy(episode_dir, store, tmp_path):
    ingest_episode(write_episode_file(episode_dir / f"{GOOD_NAME}.h5"), store.path)
    shutil.copytree(store.path, tmp_path / "copy.zarr")
    assert WindowStore(tmp_path / "copy.zarr").episode_ids() == [GOOD_NAME]
