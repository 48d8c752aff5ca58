"""Store and MLflow artifacts at URLs: the fsspec path, exercised with local file:// URLs
(the same code reads s3:// or gs:// with their fsspec filesystem installed)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import write_episode_file

from vla_pipeline.data.ingest import ingest_episodes
from vla_pipeline.data.store import RemoteWindowStore, StoreError, WindowStore
from vla_pipeline.policy.model import load_policy_dir
from vla_pipeline.policy.policy_config import PolicyConfig
from vla_pipeline.training.split import load_split, save_split, split_from_store
from vla_pipeline.training.train import train
from vla_pipeline.training.train_config import TrainConfig
from vla_pipeline.training.windows import WindowDataset


@pytest.fixture(scope="module")
def copied_store(tmp_path_factory):
    """A store ingested locally, then copied whole to a 'bucket' folder, as `aws s3 sync` would."""
    root = tmp_path_factory.mktemp("object-storage")
    paths = [write_episode_file(root / "episodes" / f"episode_2025061{i}_101502_1box_hori_{('left', 'right')[i % 2]}"
                                f"_core_far.h5", frames=20, height=48, width=64, seed=i) for i in range(4)]
    paths.append(root / "episodes" / "episode_20250619_000000_broken.h5")
    paths[-1].write_text("not an episode")
    local = root / "store.zarr"
    ingest_episodes(paths, local)
    bucket = root / "bucket" / "store.zarr"
    shutil.copytree(local, bucket, ignore=shutil.ignore_patterns(".staging", "*.lock"))
    return local, bucket.as_uri()


def test_a_url_store_reads_like_the_local_one(copied_store):
    local, url = copied_store
    remote = WindowStore(url)
    assert isinstance(remote, RemoteWindowStore) and url.startswith("file://")
    here = WindowStore(local)
    assert remote.create(224) is remote
    assert remote.episode_ids() == here.episode_ids() and len(remote.episode_ids()) == 4
    assert remote.quarantined_ids() == here.quarantined_ids() == ["episode_20250619_000000_broken"]
    episode = here.episode_ids()[0]
    assert remote.episode_attrs(episode) == here.episode_attrs(episode)
    np.testing.assert_array_equal(remote.open_episode(episode)["images"][:], here.open_episode(episode)["images"][:])
    assert remote.action_stats(remote.episode_ids()).to_dict() == here.action_stats(here.episode_ids()).to_dict()
    dataset, reference = WindowDataset(url, remote.episode_ids(), 3, 2, 1.15), WindowDataset(local, here.episode_ids(), 3, 2, 1.15)
    assert len(dataset) == len(reference)
    np.testing.assert_array_equal(dataset[5]["images"], reference[5]["images"])


def test_a_url_store_is_never_written_but_keeps_its_split(copied_store, tmp_path):
    _, url = copied_store
    remote = WindowStore(url)
    with pytest.raises(StoreError, match="read only; ingest into a local store"):
        remote.write_episode("x", np.zeros((1, 2, 2, 3), np.uint8), np.zeros((1, 2)), ["episode_start"], {})
    with pytest.raises(StoreError, match="read only"):
        remote.writer_lock()
    split = split_from_store(remote)
    save_split(remote, split)
    assert load_split(WindowStore(url)) == split
    with pytest.raises(StoreError, match="no window store there"):
        WindowStore((tmp_path / "empty-bucket").as_uri()).create(224)


def test_training_reads_a_url_store(copied_store, tmp_path):
    _, url = copied_store
    ids = WindowStore(url).episode_ids()
    result = train(PolicyConfig.tiny(), TrainConfig(epochs=1, batch_size=2, grad_accum=1, log_every=100),
                   url, ids[:3], ids[3:], tmp_path / "run", log=lambda line: None)
    assert result.steps == 3 * 18 // 2  # 3 episodes × (20 - 3 + 1) tiny training windows, batch 2
    assert json.loads((tmp_path / "run" / "policy" / "action_stats.json").read_text())["count"] == 3 * 20
    load_policy_dir(tmp_path / "run" / "policy")


def test_mlflow_artifacts_go_to_the_artifact_root_url(tmp_path, monkeypatch):
    import mlflow

    from vla_pipeline.tracking import experiment_id, mlflow_client

    bucket = tmp_path / "artifact-bucket"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("VLA_ARTIFACT_ROOT", bucket.as_uri())
    experiment = experiment_id("object-storage-test")
    assert mlflow_client().get_experiment(experiment).artifact_location == bucket.as_uri()
    (tmp_path / "policy").mkdir()
    (tmp_path / "policy" / "policy_config.json").write_text("{}")
    with mlflow.start_run(experiment_id=experiment) as run:
        mlflow.log_artifacts(str(tmp_path / "policy"), "policy")
    assert list(bucket.rglob("policy_config.json"))
    fetched = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="policy",
                                                  dst_path=str(tmp_path / "fetched"))
    assert (tmp_path / "fetched" / "policy" / "policy_config.json").is_file(), fetched


def test_run_links_point_at_the_tracking_server(tmp_path, monkeypatch):
    from vla_pipeline.tracking import run_link

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://vla-server:5000/")
    assert run_link("abc", "7") == "http://vla-server:5000/#/experiments/7/runs/abc"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert run_link("abc", "7") == "http://127.0.0.1:5000/#/experiments/7/runs/abc"  # `mlflow ui` on the local store


def test_cli_ingest_into_a_url_store_is_a_clear_error(copied_store, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    _, url = copied_store
    folder = tmp_path / "drop"
    write_episode_file(folder / "episode_20250620_101502_1box_hori_left_core_far.h5", frames=20, height=48, width=64)
    env = {**os.environ, "VLA_STORE": url, "DAGSTER_HOME": str(tmp_path / "home")}
    done = subprocess.run([str(Path(sys.executable).with_name("vla-pipeline")), "ingest", str(folder)],
                          capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert "a store at a URL is read only; ingest into a local store" in done.stderr
    assert "Traceback" not in done.stderr
    assert "episode_20250620_101502_1box_hori_left_core_far" not in WindowStore(url).episode_ids()
