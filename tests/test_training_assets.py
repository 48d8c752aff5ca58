"""The training assets as Dagster runs them."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pytest
from conftest import write_episode_file

from assets.training import train_val_split
from resources import WindowStoreResource
from vla_pipeline.data.ingest import ingest_episodes
from vla_pipeline.training.split import load_split
from vla_pipeline.data.store import WindowStore


def _ingest(folder, store_path, count, offset=0):
    paths = [
        write_episode_file(folder / f"episode_2025061{i % 10}_10{i:04d}_1box_hori_{('left', 'right')[i % 2]}_core_far.h5",
                           seed=i)
        for i in range(offset, offset + count)
    ]
    ingest_episodes(paths, store_path)


def _materialize(store_path, val_fraction=0.2):
    result = dg.materialize(
        [train_val_split],
        resources={"window_store": WindowStoreResource(path=str(store_path))},
        run_config={"ops": {"train_val_split": {"config": {"val_fraction": val_fraction}}}},
    )
    assert result.success
    materialization = result.asset_materializations_for_node("train_val_split")[0]
    return result.output_for_node("train_val_split"), materialization.metadata


def test_split_asset_is_stable_and_reports_counts(episode_dir, tmp_path):
    store_path = tmp_path / "store.zarr"
    _ingest(episode_dir, store_path, 10)
    first, metadata = _materialize(store_path)
    assert metadata["train_episodes"].value + metadata["val_episodes"].value == 10
    assert metadata["train_windows"].value == 8  # one window per 18-frame episode
    assert "| left |" in metadata["by_side"].value and "| right |" in metadata["by_side"].value
    assert load_split(WindowStore(store_path)).to_dict() == first

    _ingest(episode_dir, store_path, 10, offset=10)
    second, _ = _materialize(store_path)
    assert set(first["train"]) <= set(second["train"]) and set(first["val"]) <= set(second["val"])
    assert len(second["train"]) + len(second["val"]) == 20


def test_split_asset_fails_clearly_on_an_empty_store(tmp_path):
    with pytest.raises(dg.Failure, match="ingest episodes before splitting"):
        dg.materialize([train_val_split], resources={"window_store": WindowStoreResource(path=str(tmp_path / "s.zarr"))})


def _training_setup(episode_dir, tmp_path, monkeypatch) -> Path:
    """4 ingested episodes; MLflow and the models folder in tmp_path. Returns the store path."""
    store_path = tmp_path / "store.zarr"
    _ingest(episode_dir, store_path, 4)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("VLA_MODELS", str(tmp_path / "models"))
    return store_path


def test_lora_adapter_trains_the_cpu_preset_and_records_mlflow(episode_dir, tmp_path, monkeypatch):
    import mlflow

    from assets.training import lora_adapter
    from resources import ComputeResource

    store_path = _training_setup(episode_dir, tmp_path, monkeypatch)
    config = {"model": "tiny", "train": {"epochs": 1, "batch_size": 2, "grad_accum": 1, "log_every": 5}}
    result = dg.materialize(
        [train_val_split, lora_adapter],
        resources={"window_store": WindowStoreResource(path=str(store_path)), "compute": ComputeResource()},
        run_config={"ops": {"lora_adapter": {"config": config}}},
    )
    assert result.success
    policy_dir = result.output_for_node("lora_adapter")
    assert (tmp_path / "models") in Path(policy_dir).parents
    metadata = result.asset_materializations_for_node("lora_adapter")[0].metadata
    # VLA_MODEL=tiny is the CPU preset: a small backbone trained in full, not LoRA
    assert metadata["trainable_parameters"].value == metadata["total_parameters"].value
    assert metadata["device"].value == "cpu (fp32)"
    run = mlflow.get_run(metadata["mlflow_run_id"].value)
    split = result.output_for_node("train_val_split")
    assert run.data.params["policy.preset"] == "small" and run.data.params["policy.lora_enable"] == "False"
    assert "CPU preset's own setup" in run.data.tags["setup"]
    assert run.data.params["train_episodes"] == str(len(split["train"])) != "0"
    assert "val_loss" in run.data.metrics and "best_val_loss" in run.data.metrics
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "policy")}
    assert "policy/policy_config.json" in artifacts

    # The same training again: found finished, nothing trained or logged anew.
    history = [m.value for m in mlflow.MlflowClient().get_metric_history(run.info.run_id, "val_loss")]
    with dg.DagsterInstance.ephemeral() as instance:
        again = dg.materialize(
            [train_val_split, lora_adapter], instance=instance,
            resources={"window_store": WindowStoreResource(path=str(store_path)), "compute": ComputeResource()},
            run_config={"ops": {"lora_adapter": {"config": config}}},
        )
        messages = [entry.user_message for entry in instance.all_logs(again.run_id)]
    assert again.success and again.output_for_node("lora_adapter") == policy_dir
    repeated = again.asset_materializations_for_node("lora_adapter")[0].metadata
    assert repeated["already_trained"].value is True and repeated["mlflow_run_id"].value == run.info.run_id
    assert any(m.startswith("already trained: step") for m in messages), messages
    assert not any(m.startswith("step ") for m in messages), "no training step ran"
    assert [m.value for m in mlflow.MlflowClient().get_metric_history(run.info.run_id, "val_loss")] == history


def test_a_training_that_cannot_start_leaves_no_output_folder(episode_dir, tmp_path, monkeypatch):
    from assets.training import lora_adapter
    from resources import ComputeResource

    store_path = _training_setup(episode_dir, tmp_path, monkeypatch)
    result = dg.materialize(
        [train_val_split, lora_adapter], raise_on_error=False,
        resources={"window_store": WindowStoreResource(path=str(store_path)), "compute": ComputeResource()},
        run_config={"ops": {"lora_adapter": {"config": {"model": str(tmp_path / "no-such-kosmos")}}}},
    )
    assert not result.success
    failure = result.failure_data_for_node("lora_adapter").error.message
    assert "no-such-kosmos" in failure and "no such folder" in failure
    assert not any((tmp_path / "models").glob("lora-*")), list((tmp_path / "models").iterdir())


def test_lora_adapter_trains_in_two_processes_and_streams_their_log(episode_dir, tmp_path, monkeypatch):
    import mlflow

    from assets.training import lora_adapter
    from resources import ComputeResource
    from vla_pipeline.policy.model import load_policy_dir

    store_path = _training_setup(episode_dir, tmp_path, monkeypatch)
    config = {"model": "tiny", "train": {"epochs": 2, "batch_size": 1, "grad_accum": 1, "log_every": 1}}
    with dg.DagsterInstance.ephemeral() as instance:
        result = dg.materialize(
            [train_val_split, lora_adapter], instance=instance,
            resources={"window_store": WindowStoreResource(path=str(store_path)),
                       "compute": ComputeResource(device="cpu", processes=2)},
            run_config={"ops": {"lora_adapter": {"config": config}}},
        )
        assert result.success
        messages = [entry.user_message for entry in instance.all_logs(result.run_id)]
    assert any(m.startswith("launching 2 training processes") for m in messages), messages
    assert any("2 processes" in m and m.startswith("training on CPU") for m in messages), messages
    assert sum(m.startswith("epoch 2:") for m in messages) == 1  # the main process's lines, once
    metadata = result.asset_materializations_for_node("lora_adapter")[0].metadata
    assert metadata["batch"].value == "1 × 1 accumulation × 2 processes" and metadata["epochs"].value == 2
    run = mlflow.get_run(metadata["mlflow_run_id"].value)
    assert [m.step for m in mlflow.MlflowClient().get_metric_history(run.info.run_id, "val_loss")] == [1, 2]
    load_policy_dir(result.output_for_node("lora_adapter"))
