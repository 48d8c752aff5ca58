"""LeRobotDataset v3.0 out of the store and back in, checked by tools this project did not write: LeRobot's
own loader (tests/lerobot_load.py, in .venv-lerobot: lerobot 0.4.4 pins torch < 2.11) and lerobot-doctor
(.venv-doctor)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from vla_pipeline.data import lerobot
from vla_pipeline.data.ingest import episode_files, ingest_episodes
from vla_pipeline.data.lerobot import LeRobotError, export_lerobot, import_lerobot
from vla_pipeline.data.store import WindowStore

ROOT = Path(__file__).resolve().parents[1]
CLI = Path(sys.executable).parent / "vla-pipeline"
LEROBOT_PYTHON = ROOT / ".venv-lerobot" / "bin" / "python"
DOCTOR = ROOT / ".venv-doctor" / "bin" / "lerobot-doctor"
MIN_PSNR_DB = 35.0  # AV1 at CRF 30 on the rendered 224×224 frames gives ~38 dB

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def stored(tmp_path_factory) -> tuple[Path, Path]:
    """(episode folder, store): 4 rendered sample episodes in both of the collector's layouts, ingested."""
    folder = tmp_path_factory.mktemp("episodes")
    done = subprocess.run([str(CLI), "sample-episodes", str(folder), "-n", "4", "--seed", "3"], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    store = tmp_path_factory.mktemp("store") / "store.zarr"
    assert {outcome.status for outcome in ingest_episodes(episode_files(folder), store)} == {"stored"}
    return folder, store


def load_with_lerobot(dataset: Path, tmp_path: Path) -> tuple[dict, dict]:
    """(the loader script's summary line, the npz of every item) from LeRobot's own LeRobotDataset."""
    assert LEROBOT_PYTHON.is_file(), "LeRobot's environment is missing: run `make install`"
    out = tmp_path / f"{dataset.name}-loaded.npz"
    done = subprocess.run([str(LEROBOT_PYTHON), str(ROOT / "tests" / "lerobot_load.py"), str(dataset), str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), dict(np.load(out))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def test_lerobot_loads_every_frame_and_action_and_the_doctor_passes(stored, tmp_path):
    folder, store_path = stored
    store = WindowStore(store_path)
    dataset = tmp_path / "lerobot"
    done = subprocess.run([str(CLI), "export-dataset", "--format", "lerobot", str(dataset)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "VLA_STORE": str(store_path)})
    assert done.returncode == 0, done.stderr
    assert "is a LeRobotDataset v3.0 of 4 episodes" in done.stdout
    summary, loaded = load_with_lerobot(dataset, tmp_path)
    ids = store.episode_ids()
    assert summary["episodes"] == 4 and summary["frames"] == sum(store.episode_attrs(e)["num_frames"] for e in ids)
    for index, episode_id in enumerate(ids):
        group, attrs = store.open_episode(episode_id), store.episode_attrs(episode_id)
        mine = loaded["episode_index"] == index
        np.testing.assert_array_equal(loaded["frame_index"][mine], np.arange(attrs["num_frames"]))
        np.testing.assert_array_equal(loaded["actions"][mine], group["actions"][:])  # exactly: float32 both ways
        assert set(loaded["tasks"][mine]) == {attrs["instruction"]}
        assert psnr(loaded["frames"][mine], group["images"][:]) >= MIN_PSNR_DB
        meta = summary["episode_meta"][index]
        assert meta["vla/episode_id"] == episode_id and meta["vla/source_file"] == attrs["source_file"]
        assert meta["vla/scenario"] == attrs["scenario"] and meta["vla/side"] == attrs["side"]
        # the episode's own timing: its recorded duration over its frames, else the nominal 0.4 s press
        stamps = loaded["timestamp"][mine]
        period = attrs["duration_s"] / attrs["num_frames"] if attrs.get("duration_s") else 0.4
        np.testing.assert_allclose(stamps, np.round(np.arange(attrs["num_frames"]) * period, 3), atol=1e-6)
    assert any(store.episode_attrs(e).get("duration_s") for e in ids)  # the legacy layout records it
    assert not all(store.episode_attrs(e).get("duration_s") for e in ids)  # the observations layout does not

    assert DOCTOR.is_file(), "lerobot-doctor's environment is missing: run `make install`"
    doctor = subprocess.run([str(DOCTOR), "check", str(dataset.resolve()), "--ci"], capture_output=True, text=True,
                            timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert doctor.returncode == 0, doctor.stdout[-3000:] + doctor.stderr[-3000:]
    report = json.loads(doctor.stdout)
    messages = {(check["name"], message["severity"]): message["message"] for check in report["checks"]
                for message in check["messages"]}
    assert report["overall_severity"] in ("PASS", "WARN") and ("Metadata & Format Compliance", "FAIL") not in messages
    # the timestamps agree with info.json's fps (2.5 for 0.4 s presses, not rounded to 2 or 3)
    assert ("Temporal Consistency", "WARN") not in messages, messages


def test_a_re_export_appends_only_new_episodes_and_a_change_rewrites(stored, tmp_path):
    folder, store_path = stored
    store = WindowStore(store_path)
    ids = store.episode_ids()
    dataset = tmp_path / "lerobot"
    first = export_lerobot(store, dataset, ids[:3])
    assert first.mode == "new" and first.total_episodes == 3
    earlier = {path: path.stat().st_mtime_ns for path in dataset.rglob("*") if path.is_file() and "meta" not in
               path.relative_to(dataset).parts[:1]}
    second = export_lerobot(store, dataset, ids)
    assert second.mode == "append" and second.written == [ids[3]] and second.kept == 3
    for path, mtime in earlier.items():  # the first export's data and video files are untouched
        assert path.stat().st_mtime_ns == mtime
    assert export_lerobot(store, dataset, ids).mode == "unchanged"
    summary, loaded = load_with_lerobot(dataset, tmp_path)
    assert summary["episodes"] == 4 and [m["vla/episode_id"] for m in summary["episode_meta"]] == ids
    np.testing.assert_array_equal(loaded["actions"][loaded["episode_index"] == 3],
                                  store.open_episode(ids[3])["actions"][:])
    third = export_lerobot(store, dataset, ids[1:])
    assert third.mode == "rewrite" and "no longer among" in third.reason and third.total_episodes == 3


def test_a_failure_part_way_leaves_no_half_written_dataset(stored, tmp_path, monkeypatch):
    _, store_path = stored
    store = WindowStore(store_path)
    ids = store.episode_ids()
    dataset = tmp_path / "lerobot"

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(lerobot, "_write_video", broken)
    with pytest.raises(OSError, match="disk full"):
        export_lerobot(store, dataset, ids[:2])
    assert not dataset.exists() and not list(tmp_path.glob(".lerobot*"))
    monkeypatch.undo()
    export_lerobot(store, dataset, ids[:2])
    before = sorted((path.relative_to(dataset), path.read_bytes()) for path in dataset.rglob("*") if path.is_file())
    monkeypatch.setattr(lerobot, "_write_video", broken)
    with pytest.raises(OSError):
        export_lerobot(store, dataset, ids)  # an append that fails
    after = sorted((path.relative_to(dataset), path.read_bytes()) for path in dataset.rglob("*") if path.is_file())
    assert after == before and not list(tmp_path.glob(".lerobot*"))


def test_round_trip_through_the_cli_gives_the_same_actions_and_instructions(stored, tmp_path):
    _, store_path = stored
    store = WindowStore(store_path)
    dataset = tmp_path / "lerobot"
    export_lerobot(store, dataset)
    folder, fresh = tmp_path / "imported", tmp_path / "fresh.zarr"
    env = {**os.environ, "VLA_STORE": str(fresh), "VLA_EPISODES_DIR": str(folder),
           "DAGSTER_HOME": str(tmp_path / "dagster")}
    (tmp_path / "dagster").mkdir()
    done = subprocess.run([str(CLI), "ingest", "--from-lerobot", str(dataset), "--action-keys", "linear_x,linear_y"],
                          capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "4 episodes" in done.stdout and "done: 4 stored" in done.stdout
    again = WindowStore(fresh)
    assert again.episode_ids() == store.episode_ids()  # the exported ids come back as the episode ids
    worst = np.inf
    for episode_id in store.episode_ids():
        before, after = store.open_episode(episode_id), again.open_episode(episode_id)
        np.testing.assert_array_equal(after["actions"][:], before["actions"][:])
        for key in ("instruction", "scenario", "side", "num_frames"):
            assert again.episode_attrs(episode_id)[key] == store.episode_attrs(episode_id)[key], key
        worst = min(worst, psnr(after["images"][:], before["images"][:]))
    assert worst >= MIN_PSNR_DB, worst


def _dataset_with(tmp_path: Path, store: WindowStore, edit) -> Path:
    dataset = tmp_path / "lerobot"
    export_lerobot(store, dataset, store.episode_ids()[:1])
    info_path = dataset / "meta" / "info.json"
    info = json.loads(info_path.read_text())
    edit(info)
    info_path.write_text(json.dumps(info))
    return dataset


@pytest.mark.parametrize("edit, args, words", [
    (lambda info: None, ["--action-keys", "x.vel,y.vel"], "has no axis x.vel, y.vel (its axes: linear_x, linear_y)"),
    (lambda info: None, ["--action-keys", "linear_x,linear_y,theta"], "names 3 axes"),
    (lambda info: info["features"]["action"].update(shape=[2, 2]), ["--action-keys", "linear_x,linear_y"],
     "a planar base velocity is a float vector"),
    (lambda info: None, ["--action-keys", "linear_x,linear_y", "--camera", "observation.images.wrist"],
     "has no camera observation.images.wrist"),
    (lambda info: info["features"].pop("action"), [], "has no 'action' feature"),
])
def test_import_refuses_what_it_cannot_read_in_one_line(stored, tmp_path, edit, args, words):
    dataset = _dataset_with(tmp_path, WindowStore(stored[1]), edit)
    folder = tmp_path / "imported"
    done = subprocess.run([str(CLI), "ingest", str(folder), "--from-lerobot", str(dataset), *args],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and words in done.stderr, done.stderr
    assert not folder.exists() or not list(folder.iterdir())  # nothing written


def test_import_takes_a_rotation_axis_as_angular_z_and_scales(stored, tmp_path, monkeypatch):
    """A LeKiwi-like base: its action (x.vel, y.vel, theta.vel); --action-scale turns its units into the robot's."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    store = WindowStore(stored[1])
    dataset = _dataset_with(tmp_path, store, lambda info: info["features"]["action"].update(
        names=["x.vel", "y.vel", "theta.vel"], shape=[3]))
    data_file = next((dataset / "data").rglob("*.parquet"))
    table = pq.read_table(data_file)
    planar = np.asarray(table["action"].to_pylist(), np.float32)
    turned = np.concatenate([planar, np.full((len(planar), 1), 0.25, np.float32)], axis=1)
    table = table.set_column(0, "action", pa.FixedSizeListArray.from_arrays(pa.array(turned.ravel(), pa.float32()), 3))
    pq.write_table(table, data_file)
    report = import_lerobot(str(dataset), tmp_path / "imported", ["x.vel", "y.vel"], action_scale=2.0)
    with h5py.File(report.files[0]) as h5:
        actions = h5["actions"][:]
        assert h5["observations/images"].shape[1:] == (224, 224, 3)
    np.testing.assert_array_equal(actions[:, :2], store.open_episode(store.episode_ids()[0])["actions"][:] * 2.0)
    np.testing.assert_allclose(actions[:, 2], 0.5)  # angular_z: ingest warns that the policy ignores it
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # the cache only, whatever the network
    with pytest.raises(LeRobotError, match="not a folder here"):
        import_lerobot("no-such-owner/no-such-dataset", tmp_path / "x", ["x.vel", "y.vel"])


def test_the_lerobot_dataset_asset_exports_and_appends(stored, tmp_path):
    """`lerobot_dataset` (group export): materialized on demand, with no automation condition, so a drop never
    rewrites it; its metadata says what it did."""
    import dagster as dg

    from assets.export import lerobot_dataset
    from resources import WindowStoreResource

    assert lerobot_dataset.group_names_by_key[dg.AssetKey("lerobot_dataset")] == "export"
    assert not lerobot_dataset.automation_conditions_by_key.get(dg.AssetKey("lerobot_dataset"))
    _, store_path = stored
    ids = WindowStore(store_path).episode_ids()
    resources = {"window_store": WindowStoreResource(path=str(store_path))}

    def run(config: dict) -> dict:
        result = dg.materialize([lerobot_dataset], resources=resources, run_config={
            "ops": {"lerobot_dataset": {"config": {"out_dir": str(tmp_path / "lerobot"), **config}}}})
        assert result.success
        return result.asset_materializations_for_node("lerobot_dataset")[0].metadata

    first = run({"episodes": ids[:2]})
    assert first["mode"].value == "new" and first["total_episodes"].value == 2
    second = run({})
    assert second["mode"].value == "append" and second["episodes_written"].value == 2
    assert second["total_episodes"].value == 4
    failed = dg.materialize([lerobot_dataset], resources=resources, raise_on_error=False, run_config={
        "ops": {"lerobot_dataset": {"config": {"out_dir": str(tmp_path / "x"), "episodes": ["nope"]}}}})
    assert not failed.success
    failure = next(event for event in failed.all_events if event.is_step_failure)
    assert "not in the store" in str(failure.step_failure_data.error.message) and not (tmp_path / "x").exists()
