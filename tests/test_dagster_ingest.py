"""The Dagster side of ingest: the code location, the `vla-pipeline ingest` command and what
it records in DAGSTER_HOME, end to end on full-size (720×1280) sample episodes.

The full-size folder is written once per module (`vla-pipeline sample-episodes`, ~30 s) and
ingested once; the acceptance, re-run, run-record and changed-file tests share it. Each of
them reads only what the module fixtures recorded or what stays true whatever order they
run in, so they can be selected or run in any order.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import re
import shutil
import subprocess
import time
import sys
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import pytest

from vla_pipeline.data.episodes import EpisodeRejected, content_hash, inspect_episode
from vla_pipeline.data.store import WindowStore
from vla_pipeline.sim.operator import write_sample_episodes

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
VLA = str(BIN / "vla-pipeline")
DAGSTER = str(BIN / "dagster")
DAGSTER_YAML = REPO / ".dagster" / "dagster.yaml"

MIN_FRAMES = 18  # window 8 + chunk 10, the default ValidationRules
PARTITIONS = "episodes"



# --- helpers -----------------------------------------------------------------------


def dagster_home(parent: Path) -> Path:
    home = parent / "dagster_home"
    home.mkdir(parents=True)
    shutil.copy(DAGSTER_YAML, home / "dagster.yaml")
    return home


def cli_env(home: Path, episodes: Path | None = None, store: Path | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VLA_", "DAGSTER_"))}
    env["DAGSTER_HOME"] = str(home)
    if episodes is not None:
        env["VLA_EPISODES_DIR"] = str(episodes)
    if store is not None:
        env["VLA_STORE"] = str(store)
    return env


def run(args: list[str], env: dict, cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def describe(result: subprocess.CompletedProcess) -> str:
    return f"exit {result.returncode}\n--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr}"


def frame_count(path: Path) -> int:
    with h5py.File(path, "r") as h5:
        name = "images" if "images" in h5 else "observations/images"
        return int(h5[name].shape[0])


def episodes_json(env: dict, cwd: Path) -> dict[str, dict]:
    result = run([VLA, "episodes", "--json"], env, cwd)
    assert result.returncode == 0, describe(result)
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    by_id = {row["episode_id"]: row for row in rows}
    assert len(by_id) == len(rows), f"an episode is listed twice:\n{result.stdout}"
    return by_id


def stored_attrs(store: WindowStore) -> dict[str, dict]:
    return {episode_id: store.episode_attrs(episode_id) for episode_id in store.episode_ids()}


@contextlib.contextmanager
def dagster_instance(home: Path):
    """The instance the CLI recorded into, opened in this process (DAGSTER_HOME set meanwhile)."""
    import dagster as dg

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DAGSTER_HOME", str(home))
        with dg.DagsterInstance.get() as instance:
            yield instance


def latest_by_partition(records, partition_of) -> dict:
    """Newest record per partition from records sorted newest first."""
    latest = {}
    for record in records:
        latest.setdefault(partition_of(record), record)
    return latest


def run_ids(home: Path) -> list[str]:
    with dagster_instance(home) as instance:
        return [run.run_id for run in instance.get_runs()]


@contextlib.contextmanager
def code_location(home: Path, folder: Path, store_path: Path):
    """`vla_pipeline.definitions` loaded with DAGSTER_HOME, VLA_EPISODES_DIR and VLA_STORE set.

    Its resources read the variables when the module is imported, so it is (re)loaded with
    them set, and reloaded afterwards (or forgotten) so that later tests see it as before.
    """
    name = "vla_pipeline.definitions"
    was_loaded = name in sys.modules
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("DAGSTER_HOME", str(home))
            patch.setenv("VLA_EPISODES_DIR", str(folder))
            patch.setenv("VLA_STORE", str(store_path))
            if was_loaded:
                yield importlib.reload(sys.modules[name])
            else:
                yield importlib.import_module(name)
    finally:
        if was_loaded:
            importlib.reload(sys.modules[name])
        else:
            sys.modules.pop(name, None)


# --- the full-size folder, ingested once -----------------------------------------------


@dataclass
class Batch:
    root: Path
    folder: Path
    store_path: Path
    home: Path
    env: dict
    samples: list[Path]  # the generated episodes
    frames: dict[str, int]  # stem -> frame count, read with h5py before ingest
    broken: dict[str, tuple[str, ...]]  # stem -> words one of which the reason must contain
    ingest: subprocess.CompletedProcess | None = None
    runs_after_ingest: list[str] = field(default_factory=list)
    attrs_after_ingest: dict = field(default_factory=dict)
    quarantine_after_ingest: dict = field(default_factory=dict)
    rerun: subprocess.CompletedProcess | None = None
    runs_after_rerun: list[str] = field(default_factory=list)
    attrs_after_rerun: dict = field(default_factory=dict)
    quarantine_after_rerun: dict = field(default_factory=dict)

    @property
    def store(self) -> WindowStore:
        return WindowStore(self.store_path)

    @property
    def h5_stems(self) -> set[str]:
        return set(self.frames) | set(self.broken)

    def good(self) -> list[str]:
        return sorted(stem for stem, count in self.frames.items() if count >= MIN_FRAMES)

    def short(self) -> list[str]:
        return sorted(stem for stem, count in self.frames.items() if count < MIN_FRAMES)


@pytest.fixture(scope="module")
def batch(tmp_path_factory) -> Batch:
    """20 full-size sample episodes (`sample-episodes -n 20 --seed 3`) plus broken files."""
    root = tmp_path_factory.mktemp("full_size")
    folder = root / "episodes"
    home = dagster_home(root)
    store_path = root / "store.zarr"
    env = cli_env(home, folder, store_path)
    result = run([VLA, "sample-episodes", str(folder), "-n", "20", "--seed", "3"], env, root, timeout=300)
    assert result.returncode == 0, describe(result)
    samples = sorted(folder.glob("*.h5"))
    assert len(samples) == 20, describe(result)
    frames = {path.stem: frame_count(path) for path in samples}
    good = sorted(stem for stem, count in frames.items() if count >= MIN_FRAMES)
    assert len(good) >= 10, f"too few usable sample episodes for the tests: {frames}"

    # Broken files dropped in next to the good ones, named to sort among them.
    (folder / "episode_20250614_000000_empty.h5").write_bytes(b"")
    (folder / "episode_20250614_000001_notes_export.h5").write_text(
        "episode 14: camera cable loose, redo tomorrow\n" * 20
    )
    source = folder / f"{good[3]}.h5"
    data = source.read_bytes()
    (folder / f"{good[3]}_truncated.h5").write_bytes(data[: int(len(data) * 0.3)])
    (folder / "notes.txt").write_text("not an episode; must be ignored\n")
    # Left there for an hour: older than `max_pending_seconds`, so no copy can still be under
    # way and they are rejected rather than kept pending.
    an_hour_ago = time.time() - 3600
    for name in ("episode_20250614_000000_empty.h5", "episode_20250614_000001_notes_export.h5",
                 f"{good[3]}_truncated.h5"):
        os.utime(folder / name, (an_hour_ago, an_hour_ago))
    broken = {
        "episode_20250614_000000_empty": ("empty", "0 bytes"),
        "episode_20250614_000001_notes_export": ("not an hdf5",),
        f"{good[3]}_truncated": ("truncated", "damaged"),
    }
    return Batch(root, folder, store_path, home, env, samples, frames, broken)


@pytest.fixture(scope="module")
def ingested(batch: Batch) -> Batch:
    """`vla-pipeline ingest DIR` once over the folder; what it left is recorded for the tests."""
    batch.ingest = run([VLA, "ingest", str(batch.folder)], batch.env, batch.root, timeout=300)
    batch.runs_after_ingest = run_ids(batch.home)
    store = batch.store
    batch.attrs_after_ingest = stored_attrs(store)
    batch.quarantine_after_ingest = {i: store.quarantine_record(i) for i in store.quarantined_ids()}
    return batch


@pytest.fixture(scope="module")
def reingested(ingested: Batch) -> Batch:
    """A second `vla-pipeline ingest DIR` over the unchanged folder."""
    batch = ingested
    assert batch.ingest.returncode == 0, describe(batch.ingest)
    batch.rerun = run([VLA, "ingest", str(batch.folder)], batch.env, batch.root)
    batch.runs_after_rerun = run_ids(batch.home)
    store = batch.store
    batch.attrs_after_rerun = stored_attrs(store)
    batch.quarantine_after_rerun = {i: store.quarantine_record(i) for i in store.quarantined_ids()}
    return batch


# --- the code location ----------------------------------------------------------------


def test_definitions_validate_from_repo_root(tmp_path):
    env = cli_env(dagster_home(tmp_path))
    result = run([DAGSTER, "definitions", "validate"], env, REPO)
    assert result.returncode == 0, describe(result)
    assert "mobile_vla" in result.stdout + result.stderr, describe(result)


# --- acceptance: a real-size folder through `vla-pipeline ingest` -------------------------


def test_ingest_stores_good_episodes_and_rejects_broken_files(ingested: Batch):
    batch = ingested
    assert batch.ingest.returncode == 0, describe(batch.ingest)
    rows = episodes_json(batch.env, batch.root)

    assert "notes" not in rows, "notes.txt is not an episode and must not be listed"
    assert set(rows) == batch.h5_stems, f"listed {sorted(rows)}"
    assert not [row for row in rows.values() if row["status"] == "pending"]

    for stem in batch.good():
        row = rows[stem]
        assert row["status"] == "stored", f"{stem} ({batch.frames[stem]} frames) not stored: {row}"
        assert row["frames"] == batch.frames[stem], row
    for stem in batch.short():
        row = rows[stem]
        assert row["status"] == "rejected", row
        assert "frames" in row["reason"], row
    for stem, words in batch.broken.items():
        row = rows[stem]
        assert row["status"] == "rejected", row
        reason = row["reason"].lower()
        assert any(word in reason for word in words), f"{stem}: reason does not name the problem: {row}"
        assert "Traceback" not in row["reason"], row

    assert batch.store.episode_ids() == batch.good()
    assert batch.store.quarantined_ids() == sorted(set(batch.short()) | set(batch.broken))
    # The command's own summary agrees with the store.
    assert f"{len(batch.h5_stems)} episode file(s)" in batch.ingest.stdout, describe(batch.ingest)
    assert f"done: {len(batch.good())} stored, {len(batch.short()) + len(batch.broken)} rejected" in (
        batch.ingest.stdout
    ), describe(batch.ingest)
    assert "notes" not in batch.ingest.stdout.replace("notes_export", "")
    # Rejections are reported once, in the summary line, alike reasons counted together.
    done = next(line for line in batch.ingest.stdout.splitlines() if line.startswith("done: "))
    if batch.short():
        assert f"{len(batch.short())} × only " in done, done
    listed = "\n".join(line for line in batch.ingest.stdout.splitlines() if not line.startswith("run over "))
    for stem in batch.short() + sorted(batch.broken):
        assert stem not in listed, f"{stem} listed:\n{batch.ingest.stdout}"
    assert batch.ingest.stdout.count("a training window needs") <= 1, describe(batch.ingest)


def test_second_ingest_stores_nothing_new(reingested: Batch):
    batch = reingested
    assert batch.rerun.returncode == 0, describe(batch.rerun)
    total = len(batch.h5_stems)
    assert f"{total} episode file(s), {total} already ingested, 0 to ingest" in batch.rerun.stdout, (
        describe(batch.rerun)
    )
    assert "run over" not in batch.rerun.stdout, describe(batch.rerun)
    assert batch.runs_after_rerun == batch.runs_after_ingest, "a no-op ingest started a Dagster run"

    assert set(batch.attrs_after_rerun) == set(batch.attrs_after_ingest) == set(batch.good())
    for episode_id, attrs in batch.attrs_after_ingest.items():
        after = batch.attrs_after_rerun[episode_id]
        assert after["ingested_at"] == attrs["ingested_at"], episode_id
        assert after["content_hash"] == attrs["content_hash"], episode_id
    assert batch.quarantine_after_rerun == batch.quarantine_after_ingest


def test_runs_partitions_materializations_and_checks_recorded(ingested: Batch):
    import dagster as dg

    batch = ingested
    assert batch.ingest.returncode == 0, describe(batch.ingest)
    # One batch is one run (a few at most), not one run per episode.
    assert 1 <= len(batch.runs_after_ingest) <= 3, batch.runs_after_ingest

    rejected = set(batch.short()) | set(batch.broken)
    with dagster_instance(batch.home) as instance:
        runs = instance.get_runs(filters=dg.RunsFilter(job_name="ingest_job"))
        assert any(run.status == dg.DagsterRunStatus.SUCCESS for run in runs), [
            (run.run_id, run.status) for run in runs
        ]
        assert set(batch.runs_after_ingest) <= {run.run_id for run in runs}

        partitions = instance.get_dynamic_partitions(PARTITIONS)
        assert batch.h5_stems <= set(partitions), sorted(batch.h5_stems - set(partitions))
        assert "notes" not in partitions

        windows = instance.fetch_materializations(dg.AssetKey("episode_windows"), limit=10_000).records
        latest = latest_by_partition(windows, lambda r: r.asset_materialization.partition)
        assert set(latest) == batch.h5_stems, sorted(set(latest) ^ batch.h5_stems)
        for stem, record in latest.items():
            metadata = record.asset_materialization.metadata
            assert "status" in metadata, (stem, dict(metadata))
            expected = "rejected" if stem in rejected else "stored"
            assert metadata["status"].value == expected, (stem, dict(metadata))
            if expected == "stored":
                assert metadata["frames"].value == batch.frames[stem]
            else:
                assert metadata["reason"].value, (stem, dict(metadata))

        raw = instance.fetch_materializations(dg.AssetKey("raw_episode"), limit=10_000).records
        latest_raw = latest_by_partition(raw, lambda r: r.asset_materialization.partition)
        assert set(latest_raw) == batch.h5_stems
        for stem, record in latest_raw.items():
            status = record.asset_materialization.metadata["status"].value
            assert status == ("rejected" if stem in rejected else "valid"), (stem, status)

        check_key = dg.AssetCheckKey(dg.AssetKey("raw_episode"), "episode_is_valid")
        history = instance.event_log_storage.get_asset_check_execution_history(check_key, limit=10_000)
        checks = latest_by_partition(history, lambda r: r.partition)
        assert set(checks) == batch.h5_stems, sorted(set(checks) ^ batch.h5_stems)
        for stem, record in checks.items():
            evaluation = record.evaluation
            assert evaluation is not None, (stem, record.status)
            assert evaluation.passed is (stem not in rejected), (stem, evaluation)
            if stem in rejected:  # quarantine is an expected outcome: a warning, not a failed asset
                assert evaluation.severity == dg.AssetCheckSeverity.WARN, (stem, evaluation)
            if stem in batch.broken:
                reason = evaluation.metadata["reason"].value.lower()
                assert any(word in reason for word in batch.broken[stem]), (stem, reason)


def test_ingest_reads_the_folder_given_on_the_command_line(tmp_path):
    """`vla-pipeline ingest DIR` with no VLA_EPISODES_DIR exported ingests the files in DIR."""
    folder = tmp_path / "drop"
    good = write_sample_episodes(folder, 3, seed=5, height=120, width=160)
    env = cli_env(dagster_home(tmp_path), store=tmp_path / "store.zarr")  # no VLA_EPISODES_DIR
    result = run([VLA, "ingest", str(folder)], env, tmp_path)
    assert result.returncode == 0, describe(result)
    store = WindowStore(tmp_path / "store.zarr")
    reasons = {i: store.quarantine_record(i)["reason"] for i in store.quarantined_ids()}
    assert store.episode_ids() == sorted(path.stem for path in good), (
        f"files in {folder} were not stored; quarantined: {reasons}"
    )


# --- a changed file -------------------------------------------------------------------------


def test_changed_file_is_reingested(reingested: Batch):
    import dagster as dg

    batch = reingested
    store = batch.store
    stored = [stem for stem in batch.good() if store.has_episode(stem)]
    # Overwrite one stored episode with another stored one of the same length: same name and
    # frame count, new bytes.
    target = stored[0]
    donor = next(
        stem for stem in stored[1:]
        if batch.frames[stem] == batch.frames[target]
        and content_hash(batch.folder / f"{stem}.h5") != content_hash(batch.folder / f"{target}.h5")
    )
    before = stored_attrs(store)
    old_hash = before[target]["content_hash"]
    target_file = batch.folder / f"{target}.h5"
    shutil.copyfile(batch.folder / f"{donor}.h5", target_file)
    new_hash = content_hash(target_file)
    assert new_hash != old_hash

    result = run([VLA, "ingest", str(batch.folder)], batch.env, batch.root)
    assert result.returncode == 0, describe(result)
    total = len(batch.h5_stems)
    assert f"{total - 1} already ingested, 1 to ingest" in result.stdout, describe(result)
    assert "done: 1 stored, 0 rejected" in result.stdout, describe(result)

    after = stored_attrs(store)
    assert after[target]["content_hash"] == new_hash
    assert after[target]["source_file"] == str(target_file)
    for episode_id, attrs in before.items():
        if episode_id != target:
            assert after[episode_id]["ingested_at"] == attrs["ingested_at"], f"{episode_id} was rewritten"
            assert after[episode_id]["content_hash"] == attrs["content_hash"]

    rows = episodes_json(batch.env, batch.root)
    assert rows[target]["status"] == "stored" and rows[target]["frames"] == batch.frames[donor]
    with dagster_instance(batch.home) as instance:
        windows = instance.fetch_materializations(dg.AssetKey("episode_windows"), limit=10_000).records
        latest = latest_by_partition(windows, lambda r: r.asset_materialization.partition)
        assert latest[target].asset_materialization.metadata["content_hash"].value == new_hash


# --- one bad file among good ones, in process ---------------------------------------------


def _corrupt_first_image_chunk(source: Path, target: Path) -> None:
    """A copy whose header and actions read fine but whose first image chunk is garbage."""
    shutil.copyfile(source, target)
    with h5py.File(target, "r") as h5:
        images = h5["images"] if "images" in h5 else h5["observations/images"]
        info = images.id.get_chunk_info(0)
    with open(target, "r+b") as handle:
        handle.seek(info.byte_offset + info.size // 4)
        handle.write(np.random.default_rng(0).integers(0, 256, info.size // 2, dtype=np.uint8).tobytes())


def test_bad_files_do_not_stop_good_ones_in_one_run(tmp_path):
    import dagster as dg

    folder = tmp_path / "episodes"
    store_path = tmp_path / "store.zarr"
    home = dagster_home(tmp_path)
    good = sorted(write_sample_episodes(folder, 3, seed=5, height=120, width=160))
    assert all(frame_count(path) >= MIN_FRAMES for path in good), {p.name: frame_count(p) for p in good}
    # Rejected by raw_episode (not HDF5), and one that only fails when its frames are decoded.
    not_hdf5 = folder / f"{good[0].stem}_export.h5"
    not_hdf5.write_text("this is a text file renamed to .h5\n")
    corrupt = folder / f"{good[1].stem}_copy.h5"
    _corrupt_first_image_chunk(good[1], corrupt)
    inspect_episode(corrupt)  # the header is intact: the damage only shows in the images
    stems = sorted(path.stem for path in folder.glob("*.h5"))
    assert stems == [good[0].stem, not_hdf5.stem, good[1].stem, corrupt.stem, good[2].stem]
    with pytest.raises(EpisodeRejected):
        inspect_episode(not_hdf5)

    with code_location(home, folder, store_path) as definitions:
        # Never let an in-process run touch the repository's data/ folder.
        assert Path(definitions.resource("window_store").path) == store_path
        assert Path(definitions.resource("episode_folder").path) == folder
        with dg.DagsterInstance.get() as instance:
            results = definitions.ingest_partitions(instance, stems, log_level="WARNING")
            assert len(results) == 1, "one contiguous range of new partitions is one run"
            result = results[0]
            assert result.success
            assert instance.get_run_by_id(result.run_id).status == dg.DagsterRunStatus.SUCCESS
            assert instance.get_dynamic_partitions(PARTITIONS) == stems

    store = WindowStore(store_path)
    assert store.episode_ids() == [path.stem for path in good]
    for path in good:
        assert store.episode_attrs(path.stem)["num_frames"] == frame_count(path)
    assert store.quarantined_ids() == sorted([not_hdf5.stem, corrupt.stem])
    assert "not an HDF5" in store.quarantine_record(not_hdf5.stem)["reason"]
    assert re.search("damaged|truncated", store.quarantine_record(corrupt.stem)["reason"])

    valid = {
        e.partition: e.passed
        for e in result.get_asset_check_evaluations()
        if e.asset_check_key.name == "episode_is_valid"
    }
    assert valid == {stem: stem != not_hdf5.stem for stem in stems}
    statuses = {
        m.partition: m.metadata["status"].value for m in result.asset_materializations_for_node("episode_windows")
    }
    assert statuses == {stem: "rejected" if stem in (not_hdf5.stem, corrupt.stem) else "stored" for stem in stems}
