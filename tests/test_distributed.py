"""Training in 2 processes through torchrun (gloo on the CPU): one writer, sharded windows,
a policy that loads, and a resume after the whole process group is killed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import asdict

import pytest
import torch

from vla_pipeline.policy.model import load_policy_dir
from vla_pipeline.policy.policy_config import PolicyConfig
from vla_pipeline.training.checkpoint import STATE_JSON
from vla_pipeline.training.launch import RESULT_FILE, launch_command, run_distributed, write_spec
from vla_pipeline.training.train import CHECKPOINT, TrainConfig

# 3 training episodes × (20 - 3 - 2 + 1) tiny windows, batch 1, 2 epochs: each of the 2
# processes takes half of every epoch's windows.
TRAIN_WINDOWS = 3 * 16
CONFIG = TrainConfig(epochs=2, batch_size=1, grad_accum=1, checkpoint_every=2, log_every=4)
STEPS = 2 * TRAIN_WINDOWS // 2


def spec_for(small_store, out):
    store, train_ids, val_ids = small_store
    return write_spec(out, PolicyConfig.tiny().to_dict(), asdict(CONFIG), str(store), train_ids, val_ids,
                      device="cpu")


def test_two_processes_train_one_policy(small_store, tmp_path):
    out = tmp_path / "run"
    lines: list[str] = []
    result = run_distributed(spec_for(small_store, out), 2, log=lines.append)

    assert result.steps == STEPS and result.epochs == 2, lines
    assert any("2 processes" in line for line in lines), lines
    # The main process speaks for both: one line per logged step, not two.
    assert sum(line.startswith(f"step {STEPS}/{STEPS}") for line in lines) == 1, lines
    # One writer: exactly one checkpoint, one policy and one result, and nothing half-written.
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [CHECKPOINT, "policy", "training.json", RESULT_FILE, "launch.json"])
    assert json.loads((out / "training.json").read_text())["processes"] == 2
    assert json.loads((out / CHECKPOINT / STATE_JSON).read_text())["progress"]["step"] == STEPS
    # The validation loss is the same number on every process (gathered), recorded once per epoch.
    assert [record["epoch"] for record in result.history] == [1, 2]

    policy = load_policy_dir(out / "policy")
    images = torch.zeros(1, policy.config.window, 224, 224, 3, dtype=torch.uint8)
    actions = policy.predict(images, ["Navigate around the obstacle on the left side and reach the cup"])
    assert actions.shape == (1, policy.config.chunk, 2) and torch.isfinite(actions).all()


def test_killed_run_resumes_to_the_same_step_count(small_store, tmp_path):
    out = tmp_path / "run"
    spec = spec_for(small_store, out)
    first = subprocess.Popen(launch_command(spec, 2), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    state_file = out / CHECKPOINT / STATE_JSON
    deadline = time.monotonic() + 240
    while not state_file.is_file() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(first.pid, signal.SIGKILL)  # torchrun and both workers, at once
    first.wait()
    assert state_file.is_file(), first.stdout.read()
    killed_at = json.loads(state_file.read_text())["progress"]["step"]
    assert 0 < killed_at < STEPS
    assert not (out / RESULT_FILE).exists()

    lines: list[str] = []
    result = run_distributed(spec, 2, log=lines.append)
    assert any(line.startswith(f"resumed from step {result.resumed_from_step}") for line in lines), lines
    assert result.resumed_from_step >= killed_at
    assert result.steps == STEPS and result.epochs == 2
    assert not list(out.glob(".*.tmp"))
    load_policy_dir(out / "policy")


def test_a_failing_process_is_a_clear_error(small_store, tmp_path):
    store, train_ids, val_ids = small_store
    spec = write_spec(tmp_path / "run", PolicyConfig.tiny().to_dict(), asdict(CONFIG), str(store), [], val_ids,
                      device="cpu")
    with pytest.raises(RuntimeError, match="no training windows"):
        run_distributed(spec, 2, log=lambda line: None)
