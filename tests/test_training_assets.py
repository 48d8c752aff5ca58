"""The training assets as Dagster runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest
from conftest import write_episode_file

from assets.training import train_val_split
from resources import WindowStoreResource
from vla_pipeline.data.ingest import ingest_episodes
from vla_pipeline.training.split import load_split
from vla_pipeline.data.store import WindowStore
from vla_pipeline.policy.model import load_policy_dir
from vla_pipeline.policy.policy_config import PolicyConfig
from vla_pipeline.training.train_config import TrainConfig


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
    config = {"model": "cpu", "train": {"epochs": 1, "batch_size": 2, "grad_accum": 1, "log_every": 5}}
    result = dg.materialize(
        [train_val_split, lora_adapter],
        resources={"window_store": WindowStoreResource(path=str(store_path)), "compute": ComputeResource()},
        run_config={"ops": {"lora_adapter": {"config": config}}},
    )
    assert result.success
    policy_dir = result.output_for_node("lora_adapter")
    assert (tmp_path / "models") in Path(policy_dir).parents
    metadata = result.asset_materializations_for_node("lora_adapter")[0].metadata
    # VLA_MODEL=cpu is the CPU preset: the grounded small backbone trained in full but its vision tower, not LoRA
    vision = sum(p.numel() for p in load_policy_dir(policy_dir).kosmos.vision_model.parameters())
    assert metadata["trainable_parameters"].value == metadata["total_parameters"].value - vision
    assert metadata["device"].value == "cpu (fp32)"
    run = mlflow.get_run(metadata["mlflow_run_id"].value)
    split = result.output_for_node("train_val_split")
    assert run.data.params["policy.preset"] == "grounded" and run.data.params["policy.lora_enable"] == "False"
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


@pytest.mark.timeout(600)
def test_lora_adapter_trains_in_two_processes_through_pipes(episode_dir, tmp_path, monkeypatch):
    """torchrun with 2 gloo processes, launched through Dagster Pipes: the main process's lines
    reach the run log once, its result the asset; one writer; sharded windows; a policy that loads."""
    import mlflow

    from assets.training import lora_adapter
    from resources import ComputeResource
    from vla_pipeline.policy.model import load_policy_dir

    from vla_pipeline.policy.backbone import LOCAL_BACKBONES

    store_path = _training_setup(episode_dir, tmp_path, monkeypatch)
    # A backbone not built yet (a fresh machine), its pretraining cut short: this process builds it
    # once, with its lines in the run log, and the training processes load it.
    monkeypatch.setenv("VLA_GROUNDED_BACKBONE", str(tmp_path / "grounded"))
    monkeypatch.setitem(LOCAL_BACKBONES, "grounded", dict(LOCAL_BACKBONES["grounded"],
                                                          grounding=dict(scenes=2, epochs=1, seed=0)))
    config = {"model": "cpu", "train": {"epochs": 2, "batch_size": 1, "grad_accum": 1, "log_every": 1}}
    with dg.DagsterInstance.ephemeral() as instance:
        result = dg.materialize(
            [train_val_split, lora_adapter], instance=instance,
            resources={"window_store": WindowStoreResource(path=str(store_path)),
                       "compute": ComputeResource(device="cpu", processes=2)},
            run_config={"ops": {"lora_adapter": {"config": config}}},
        )
        assert result.success
        messages = [entry.user_message for entry in instance.all_logs(result.run_id)]
    assert sum(m.startswith("building the grounded backbone into ") for m in messages) == 1, messages
    assert sum(m.startswith("grounding: epoch 1/1") for m in messages) == 1, messages
    assert (tmp_path / "grounded" / "config.json").is_file()
    assert any(m.startswith("launching 2 training processes through Dagster Pipes") for m in messages), messages
    assert any("2 processes" in m and m.startswith("training on CPU") for m in messages), messages
    assert sum(m.startswith("epoch 2:") for m in messages) == 1  # the main process's lines, once
    metadata = result.asset_materializations_for_node("lora_adapter")[0].metadata
    assert metadata["batch"].value == "1 × 1 accumulation × 2 processes" and metadata["epochs"].value == 2
    steps = metadata["steps"].value
    assert sum(m.startswith(f"step {steps}/{steps}") for m in messages) == 1
    run = mlflow.get_run(metadata["mlflow_run_id"].value)
    assert [m.step for m in mlflow.MlflowClient().get_metric_history(run.info.run_id, "val_loss")] == [1, 2]
    policy_dir = Path(result.output_for_node("lora_adapter"))
    # One writer: one checkpoint, one policy, one training record, and nothing half-written.
    assert sorted(p.name for p in policy_dir.parent.iterdir()) == sorted(
        ["checkpoint", "policy", "training.json", "launch.json", "mlflow_run_id"])
    assert json.loads((policy_dir.parent / "training.json").read_text())["processes"] == 2
    load_policy_dir(policy_dir)


@pytest.mark.timeout(600)
def test_a_failing_training_process_fails_the_run_with_its_reason(episode_dir, tmp_path, monkeypatch):
    from assets.training import lora_adapter
    from resources import ComputeResource

    store_path = _training_setup(episode_dir, tmp_path, monkeypatch)

    @dg.asset(name="train_val_split")
    def no_training_episodes():
        return {"train": [], "val": WindowStore(store_path).episode_ids(), "val_fraction": 1.0}

    result = dg.materialize(
        [no_training_episodes, lora_adapter], raise_on_error=False,
        resources={"window_store": WindowStoreResource(path=str(store_path)),
                   "compute": ComputeResource(device="cpu", processes=2)},
        run_config={"ops": {"lora_adapter": {"config": {"model": "cpu"}}}},
    )
    assert not result.success
    failure = result.failure_data_for_node("lora_adapter").error.message
    assert "distributed training failed: rank 0: ValueError: no training windows" in failure, failure
    assert "rank 1: ValueError: no training windows" in failure, failure


def _materialize_from_the_command_line(tmp_path, store_path, config: dict) -> subprocess.CompletedProcess:
    """`dagster asset materialize --config-json` on the split and lora_adapter, as a user runs it, with
    VLA_MODEL unset (the launchpad shows the full-size defaults); its instance is tmp_path/dagster_home."""
    home = tmp_path / "dagster_home"
    home.mkdir(exist_ok=True)
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    env = {**os.environ, "DAGSTER_HOME": str(home), "VLA_STORE": str(store_path),
           "VLA_MODELS": str(tmp_path / "models"), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    env.pop("VLA_MODEL", None)
    run_config = json.dumps({"ops": {"lora_adapter": {"config": config}}})
    return subprocess.run([str(Path(sys.executable).parent / "dagster"), "asset", "materialize", "-m",
                           "vla_pipeline.definitions", "--select", "train_val_split,lora_adapter", "--config-json",
                           run_config], cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True,
                          timeout=300, env=env)


@pytest.mark.parametrize("policy, named", [
    ({"lora_r": 0}, "policy.lora_r"),  # out of bounds: refused as the step starts, before any work
    ({"lora_targets": "vision"}, "policy:lora_targets"),  # not a choice: refused before the run starts
])
def test_a_bad_config_value_fails_at_once_with_the_field_name(episode_dir, tmp_path, policy, named):
    store_path = tmp_path / "store.zarr"
    _ingest(episode_dir, store_path, 2)
    done = _materialize_from_the_command_line(tmp_path, store_path, {"model": "cpu", "policy": policy})
    assert done.returncode != 0
    output = done.stdout + done.stderr
    assert named in output, output[-3000:]
    assert "training the CPU preset" not in output and not (tmp_path / "models").exists()


@pytest.mark.timeout(300)
def test_a_value_equal_to_the_shown_default_still_applies(episode_dir, tmp_path):
    """epochs: 3 is the full-size default the launchpad shows, and not the CPU preset's (20): set
    with model: cpu, it is what trains."""
    store_path = tmp_path / "store.zarr"
    _ingest(episode_dir, store_path, 4)
    done = _materialize_from_the_command_line(tmp_path, store_path, {"model": "cpu", "train": {"epochs": 3}})
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    with dg.DagsterInstance.from_config(str(tmp_path / "dagster_home")) as instance:
        event = instance.get_latest_materialization_event(dg.AssetKey("lora_adapter"))
        metadata = event.asset_materialization.metadata
    assert metadata["epochs"].value == 3
    # The fields not set are the CPU preset's.
    assert metadata["batch"].value == "8 × 1 accumulation" and metadata["lr"].value == 2e-3


def test_the_cpu_preset_keeps_its_earlier_names():
    from assets.training import TrainingConfig

    cpu = TrainingConfig(model="cpu").configs()
    assert TrainingConfig(model="tiny").configs() == cpu == TrainingConfig(model="small").configs()
    policy, train = cpu
    assert policy.preset == "grounded" and not policy.lora_enable and train.epochs == 20
    changed, _ = TrainingConfig(model="cpu", policy={"lora_r": 8}).configs()
    assert changed == policy.replace(lora_r=8)


def test_unset_fields_are_the_chosen_models_defaults_and_set_ones_always_apply():
    from assets.training import TrainingConfig
    from vla_pipeline.policy.policy_config import DEFAULT_BACKBONE

    # Nothing set: exactly each model's setup, so the training fingerprints are those of before.
    assert TrainingConfig(model="cpu").configs() == (PolicyConfig.cpu(), TrainConfig.cpu())
    assert TrainingConfig(model=DEFAULT_BACKBONE).configs() == (PolicyConfig(), TrainConfig())
    # Values equal to the other setup's default (the one a launchpad may show) apply all the same.
    policy, train = TrainingConfig(model="cpu", policy={"chunk": 10, "action_head": "regression"},
                                   train={"epochs": 3}).configs()
    assert (policy.chunk, policy.action_head, train.epochs) == (10, "regression", 3)
    assert policy.lstm_hidden == PolicyConfig.cpu().lstm_hidden and train.lr == TrainConfig.cpu().lr
    policy, train = TrainingConfig(model=DEFAULT_BACKBONE, policy={"chunk": 1, "lora_enable": False},
                                   train={"epochs": 20}).configs()
    assert (policy.chunk, policy.lora_enable, train.epochs) == (1, False, 20)
    assert train.max_steps is None and TrainingConfig(model="cpu", train={"max_steps": 5}).configs()[1].max_steps == 5


def test_the_launchpad_shows_each_models_default():
    from assets.training import PolicySettings, TrainSettings

    assert PolicySettings.model_fields["chunk"].description.endswith("(default: 10 full size, 1 CPU preset)")
    assert PolicySettings.model_fields["window"].description.endswith("(default: 8)")
    assert TrainSettings.model_fields["epochs"].description.endswith("(default: 3 full size, 20 CPU preset)")
    assert TrainSettings.model_fields["max_steps"].description.endswith("(default: none)")


def test_a_field_whose_default_is_none_in_one_setup_only_cannot_be_made_optional():
    from pydantic import BaseModel

    from resources.typed import optional_dagster_config

    class Limits(BaseModel):
        max_steps: int | None = None

    # Unset (None) would have to mean both "no limit" and "the other setup's limit".
    with pytest.raises(ValueError, match="Limits.max_steps: its default is None in one setup and not in another"):
        optional_dagster_config(Limits, "LimitSettings", {"a": Limits(), "b": Limits(max_steps=5)})
