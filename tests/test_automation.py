"""The pipeline runs itself: the drop-folder sensor, the split's automation and the retraining
schedule, evaluated in-process against a temporary Dagster instance (its own DAGSTER_HOME): once
on sqlite, as `make ui` runs it, and once on PostgreSQL through deploy/dagster.yaml, as the team
deployment runs it."""

from __future__ import annotations

import json
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path

import dagster as dg
import pytest
from conftest import write_episode_file
from postgres_server import deploy_instance

from assets.automation import (
    automation_sensor, contiguous_ranges, ingest_job, new_episodes_sensor, retrain_job, retrain_schedule,
)
from assets.episodes import episode_partitions, episode_windows, raw_episode
from assets.closed_loop import closed_loop_metrics
from assets.robustness import robustness
from assets.evaluation import evaluation_metrics, registered_model
from assets.training import lora_adapter, train_val_split
from resources import ComputeResource, EpisodeFolder, WindowStoreResource
from vla_pipeline.training.retraining import retrain_decision, stored_episodes
from vla_pipeline.training.split import load_split
from vla_pipeline.data.store import WindowStore
from vla_pipeline.data.watch import FolderState, scan_folder


def episode_name(i: int, side: str = "left") -> str:
    return f"episode_20250614_10{i:04d}_1box_hori_{side}_core_medium.h5"


class Pipeline:
    """The code location's automation wired to a temporary folder, store and instance."""

    def __init__(self, root: Path, instance: dg.DagsterInstance):
        self.folder, self.store_path, self.instance = root / "episodes", root / "store.zarr", instance
        self.folder.mkdir()
        self.resources = {
            "episode_folder": EpisodeFolder(path=str(self.folder), settle_seconds=0),
            "window_store": WindowStoreResource(path=str(self.store_path), workers=1),
            "compute": ComputeResource(),
        }
        self.defs = dg.Definitions(
            assets=[raw_episode, episode_windows, train_val_split, lora_adapter, evaluation_metrics, closed_loop_metrics,
                    robustness, registered_model],
            jobs=[ingest_job, retrain_job], sensors=[new_episodes_sensor, automation_sensor],
            schedules=[retrain_schedule], resources=self.resources,
        )
        self.cursor, self.automation_cursor, self.ingested = None, None, []
        assert self.automation_tick() == {"train_val_split": 0, "lora_adapter": 0}  # the sensor starts with Dagster

    def drop(self, i: int, **kwargs) -> Path:
        return write_episode_file(self.folder / episode_name(i, kwargs.pop("side", "left")), seed=i, **kwargs)

    def sensor_tick(self) -> dg.SensorResult:
        """One sensor evaluation, then what the daemon would do with it: add partitions, run."""
        # As context managers: they set and, on exit, reset Dagster's current-instance state.
        with dg.build_sensor_context(instance=self.instance, cursor=self.cursor, resources=self.resources) as context:
            result = new_episodes_sensor(context)
        if isinstance(result, dg.SkipReason):
            return result
        self.cursor = result.cursor
        for request in result.dynamic_partitions_requests:
            self.instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
        job = self.defs.resolve_job_def("ingest_job")
        ordered = self.instance.get_dynamic_partitions(episode_partitions.name)
        for request in result.run_requests:
            first, last = request.tags["dagster/asset_partition_range_start"], request.tags["dagster/asset_partition_range_end"]
            self.ingested.append(ordered[ordered.index(first) : ordered.index(last) + 1])
            assert job.execute_in_process(instance=self.instance, tags=request.tags).success
        return result

    def automation_tick(self) -> dict:
        """Evaluate the declarative automation; run what it requests; {asset name: requested}."""
        result = dg.evaluate_automation_conditions(defs=self.defs, instance=self.instance, cursor=self.automation_cursor)
        self.automation_cursor = result.cursor
        requested = {key.path[-1]: result.get_num_requested(key) for key in (train_val_split.key, lora_adapter.key)}
        if requested["train_val_split"]:
            assert dg.materialize([train_val_split], instance=self.instance, resources=self.resources).success
        return requested

    def schedule_tick(self):
        with dg.build_schedule_context(instance=self.instance, resources=self.resources,
                                       scheduled_execution_time=datetime.now(timezone.utc)) as context:
            return retrain_schedule(context)

    def trained_now(self) -> None:
        """Record a lora_adapter materialization over the store's current episodes (as training would)."""
        hashes = stored_episodes(WindowStore(self.store_path))
        self.instance.report_runless_asset_event(
            dg.AssetMaterialization(lora_adapter.key, metadata={"episode_hashes": dg.MetadataValue.json(hashes)}))


@pytest.fixture(params=["sqlite", "postgres"])
def pipeline(request, tmp_path):
    """On the local instance (sqlite) and on the team deployment's deploy/dagster.yaml (PostgreSQL)."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    if request.param == "postgres":
        opened = deploy_instance(request.getfixturevalue("postgres"), tmp_path)
    else:
        opened = dg.instance_for_test(temp_dir=str(home))
    with opened as instance:
        yield Pipeline(tmp_path, instance)


def test_episodes_flow_through_without_a_command(pipeline):
    for i in range(3):
        pipeline.drop(i, side=("left", "right")[i % 2])
    first = pipeline.sensor_tick()  # a file must look the same twice before it is taken
    assert first.run_requests == [] and "3 still being written" in first.skip_reason.skip_message
    second = pipeline.sensor_tick()
    assert len(second.run_requests) == 1  # three new partitions, one run
    assert sorted(pipeline.instance.get_dynamic_partitions("episodes")) == sorted(p.stem for p in pipeline.folder.iterdir())
    store = WindowStore(pipeline.store_path)
    assert len(store.episode_ids()) == 3
    assert pipeline.automation_tick()["train_val_split"] == 1
    split = load_split(store)
    assert len(split.train) + len(split.val) == 3
    assert pipeline.automation_tick() == {"train_val_split": 0, "lora_adapter": 0}  # nothing new

    stored_at = {i: store.episode_attrs(i)["ingested_at"] for i in store.episode_ids()}
    newcomer = pipeline.drop(3, side="right")
    pipeline.sensor_tick()
    pipeline.sensor_tick()
    assert pipeline.ingested[-1] == [newcomer.stem]  # only the new episode
    assert all(store.episode_attrs(i)["ingested_at"] == at for i, at in stored_at.items())
    assert pipeline.automation_tick()["train_val_split"] == 1
    assert newcomer.stem in load_split(store).train + load_split(store).val
    assert set(split.train) <= set(load_split(store).train)  # the split only grows
    assert isinstance(pipeline.sensor_tick(), dg.SensorResult) and pipeline.ingested[-1] == [newcomer.stem]


def test_retraining_runs_only_when_the_data_moved(pipeline):
    first = pipeline.schedule_tick()  # empty store
    assert isinstance(first, dg.SkipReason) and "no accepted episodes" in first.skip_message
    for i in range(2):
        pipeline.drop(i)
    pipeline.sensor_tick(), pipeline.sensor_tick()
    request = pipeline.schedule_tick()
    assert isinstance(request, dg.RunRequest) and "no model trained yet" in request.tags["retrain_reason"]
    pipeline.trained_now()
    skipped = pipeline.schedule_tick()
    assert isinstance(skipped, dg.SkipReason) and "unchanged since the last training" in skipped.skip_message

    pipeline.drop(7, frames=12)  # too short: rejected, and never a reason to retrain
    pipeline.sensor_tick(), pipeline.sensor_tick()
    assert WindowStore(pipeline.store_path).quarantine_record(Path(episode_name(7)).stem)
    assert isinstance(pipeline.schedule_tick(), dg.SkipReason)

    pipeline.drop(8)
    pipeline.sensor_tick(), pipeline.sensor_tick()
    request = pipeline.schedule_tick()
    assert isinstance(request, dg.RunRequest) and request.tags["retrain_reason"].startswith("1 new, 0 changed")
    assert request.job_name in (None, "retrain_job")


def test_a_half_written_file_waits_until_complete(pipeline, tmp_path):
    finished = write_episode_file(tmp_path / "outside" / episode_name(5))
    data = finished.read_bytes()
    growing = pipeline.folder / finished.name
    for end in (len(data) // 3, 2 * len(data) // 3, len(data)):  # the copy grows between ticks
        growing.write_bytes(data[:end])
        result = pipeline.sensor_tick()
        assert result.run_requests == [] and "1 still being written" in result.skip_reason.skip_message
    assert not WindowStore(pipeline.store_path).episode_ids()
    assert len(pipeline.sensor_tick().run_requests) == 1  # unchanged since the last tick: complete
    assert WindowStore(pipeline.store_path).episode_ids() == [growing.stem]


def test_changed_and_deleted_files(pipeline):
    path = pipeline.drop(0)
    pipeline.sensor_tick(), pipeline.sensor_tick()
    before = WindowStore(pipeline.store_path).episode_attrs(path.stem)["content_hash"]
    time.sleep(0.01)
    write_episode_file(path, seed=42)  # same name, new content
    pipeline.sensor_tick(), pipeline.sensor_tick()
    assert pipeline.ingested == [[path.stem], [path.stem]]
    assert WindowStore(pipeline.store_path).episode_attrs(path.stem)["content_hash"] != before
    path.unlink()
    result = pipeline.sensor_tick()
    assert result.skip_reason and "1 deleted" in result.skip_reason.skip_message
    observation = result.asset_events[0]
    assert observation.partition == path.stem and observation.metadata["status"].value == "source file deleted"


def test_scan_ignores_temporary_names_and_survives_a_missing_folder(tmp_path):
    folder = tmp_path / "drop"
    folder.mkdir()
    for name in (".episode_20250614_101502_x.h5", "episode_20250614_101502_x.h5.part", "notes.txt"):
        (folder / name).write_bytes(b"...")
    state = scan_folder(folder, FolderState(), settle_seconds=0).state
    assert scan_folder(folder, state, settle_seconds=0).due == [] and state.seen == {}
    shutil.rmtree(folder)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        scan_folder(folder, state)


def test_retrain_decision_counts_new_changed_and_removed():
    assert retrain_decision({"a": "1", "b": "2"}, {"a": "1", "b": "2"}).retrain is False
    decision = retrain_decision({"a": "1", "b": "3", "c": "4"}, {"a": "1", "b": "2", "d": "5"})
    assert decision.retrain and (decision.new, decision.changed, decision.removed) == (1, 1, 1)
    waiting = retrain_decision({"a": "1", "c": "4"}, {"a": "1"}, min_changed=5)
    assert not waiting.retrain and "waiting for 5" in waiting.reason


def test_contiguous_ranges_make_one_run_per_batch():
    ordered = ["a", "b", "c", "d", "e"]
    assert contiguous_ranges(["b", "c", "e"], ordered) == [("b", "c"), ("e", "e")]


def test_the_cursor_names_each_file_once_and_reads_earlier_cursors(tmp_path):
    folder = tmp_path / "drop"
    folder.mkdir()
    for i in range(3):
        (folder / f"episode_20250614_10150{i}_1box_hori_left_core_far.h5").write_bytes(b"x" * (i + 1))
    state = scan_folder(folder, scan_folder(folder, FolderState(), settle_seconds=0).state, settle_seconds=0).state
    assert len(state.handed) == 3 and state.handed == state.seen  # all handed to ingest at their current stat
    cursor = state.to_json()
    for stem in state.seen:
        assert cursor.count(stem) == 1, cursor
    assert FolderState.from_json(cursor) == state
    earlier = json.dumps({"seen": state.seen, "handed": state.handed})  # the format before: stats twice
    assert FolderState.from_json(earlier) == state
    changed = FolderState(seen=state.seen, handed={**state.handed, next(iter(state.seen)): [0, 0]})
    assert FolderState.from_json(changed.to_json()) == changed
