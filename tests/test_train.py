"""The training loop: it learns, it checkpoints only what trains, and it resumes after a kill, in one
process or two (torchrun, gloo on the CPU)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vla_pipeline.policy.model import load_policy_dir
from vla_pipeline.policy.policy_config import PolicyConfig
from vla_pipeline.training.checkpoint import STATE_JSON
from vla_pipeline.training.launch import launch_command, write_spec
from vla_pipeline.training.train import CHECKPOINT, train
from vla_pipeline.training.train_config import TrainConfig

TRAIN_SCRIPT = """
import json, sys
args = json.loads(sys.argv[1])
if args.get("no_pickle"):  # a resume must not unpickle anything from disk
    import pickle, torch
    def refuse(*a, **k):
        raise AssertionError("pickle loading is disabled")
    pickle.load = pickle.loads = torch.load = refuse
    class NoUnpickler:
        def __init__(self, *a, **k):
            refuse()
    pickle.Unpickler = NoUnpickler
from vla_pipeline.policy.policy_config import PolicyConfig
from vla_pipeline.training.train import train
from vla_pipeline.training.train_config import TrainConfig
result = train(PolicyConfig.tiny(), TrainConfig(**args["train"]), args["store"], args["train_ids"],
               args["val_ids"], args["out"], log=lambda line: print(line, flush=True))
print("RESULT", json.dumps({"steps": result.steps, "resumed_from": result.resumed_from_step}), flush=True)
"""


def test_training_saves_only_what_trains(small_store, tmp_path):
    store, train_ids, val_ids = small_store
    lines = []
    result = train(PolicyConfig.tiny(), TrainConfig(epochs=1, batch_size=2, grad_accum=2, log_every=2),
                   store, train_ids, val_ids, tmp_path, log=lines.append)
    assert result.steps > 0 and result.epochs == 1 and result.best_val_loss < 1.0
    assert any(line.startswith("training on CPU") for line in lines)
    assert any("windows/s" in line and line.startswith("step ") for line in lines)
    saved = {p.name for p in (tmp_path / "policy").iterdir()}
    assert {"adapter", "policy.safetensors", "policy_config.json", "action_stats.json"} <= saved
    stats = json.loads((tmp_path / "policy" / "action_stats.json").read_text())
    assert stats["action_scale"] == 1.15 and stats["count"] == 3 * 20 and len(stats["mean"]) == 2
    assert not list((tmp_path / "policy").rglob("model.safetensors"))  # never the backbone
    history = json.loads((tmp_path / "training.json").read_text())["history"]
    assert [record["epoch"] for record in history] == [1]
    policy = load_policy_dir(tmp_path / "policy")
    assert policy.config == PolicyConfig.tiny().replace(backbone=policy.config.backbone)


def test_no_training_windows_is_a_clear_error(small_store, tmp_path):
    store, _, val_ids = small_store
    with pytest.raises(ValueError, match="no training windows"):
        train(PolicyConfig.tiny(), TrainConfig(epochs=1), store, [], val_ids, tmp_path, log=lambda line: None)


def _start(small_store, out: Path, config: dict, processes: int, no_pickle: bool = False) -> subprocess.Popen:
    """The training in its own process group: this interpreter (one process) or torchrun (two)."""
    store, train_ids, val_ids = small_store
    if processes == 1:
        payload = json.dumps({"store": str(store), "train_ids": train_ids, "val_ids": val_ids, "out": str(out),
                              "train": config, "no_pickle": no_pickle})
        command = [sys.executable, "-c", TRAIN_SCRIPT, payload]
    else:
        spec = write_spec(out, PolicyConfig.tiny().to_dict(), TrainConfig(**config).model_dump(), str(store),
                          train_ids, val_ids, device="cpu")
        command = launch_command(spec, processes)
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}, start_new_session=True)


def _still_running(out: Path) -> list[int]:
    """The live (not zombie) processes whose command line names `out` (the spec or the payload)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if str(out) in (proc / "cmdline").read_bytes().decode(errors="replace") and \
                    (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                pids.append(int(proc.name))
        except (OSError, ValueError, IndexError):
            continue
    return pids


@pytest.mark.timeout(600)
@pytest.mark.parametrize("processes", [1, 2])
def test_resumes_after_kill(small_store, tmp_path, processes):
    """Killed (every process at once) after its first checkpoint, the training started again
    resumes there — without unpickling anything — and ends at the same step count."""
    config = {"epochs": 2, "batch_size": 1, "grad_accum": 1, "checkpoint_every": 2, "log_every": 1}
    out = tmp_path / "run"
    first = _start(small_store, out, config, processes)
    state_file = out / CHECKPOINT / STATE_JSON
    deadline = time.monotonic() + 240
    while not state_file.is_file() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    # A crash, not a clean stop. torchrun puts its workers in sessions of their own: only the
    # launcher is killed here, and its workers must die with it rather than train on.
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    deadline = time.monotonic() + 60
    while _still_running(out) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _still_running(out), "training processes outlived their killed launcher"
    assert state_file.is_file(), first.stdout.read()
    killed_at = json.loads(state_file.read_text())["progress"]["step"]
    if (out / "policy").exists():  # what a kill left visible is whole
        load_policy_dir(out / "policy")
    load_policy_dir(out / CHECKPOINT / "policy")

    second = _start(small_store, out, config, processes, no_pickle=True)
    output, _ = second.communicate(timeout=300)
    assert second.returncode == 0, output
    lines = [line.removeprefix("[rank0] ") for line in output.splitlines()]
    record = json.loads((out / "training.json").read_text())
    total = 2 * 3 * 18 // processes  # 2 epochs × 3 episodes × (20 - 3 + 1) tiny training windows, batch 1, sharded
    assert 0 < killed_at < total
    resumed = next(int(line.split()[3]) for line in lines if line.startswith("resumed from step "))
    assert resumed >= killed_at and record["steps"] == total and record["processes"] == processes
    assert not any(line.startswith(f"step {killed_at - 1}/") for line in lines)
    assert not list(out.glob(".*.tmp")), "a killed write's leftovers outlived the next run"


def test_steady_state_rate_and_auto_batch_on_the_cpu(small_store, tmp_path):
    from vla_pipeline.training.compute import plan_compute

    store, train_ids, val_ids = small_store
    lines = []
    result = train(PolicyConfig.tiny(), TrainConfig(epochs=1, batch_size=2, grad_accum=2, log_every=1),
                   store, train_ids, val_ids, tmp_path, compute=plan_compute("cpu", "auto", "auto"),
                   log=lines.append)
    # No GPU to probe: the configured split is kept, and the log says so.
    assert "batch auto: no GPU to probe, keeping 2 × 2 accumulation" in lines
    assert (result.batch_size, result.grad_accum) == (2, 2)
    steps = [line for line in lines if line.startswith("step ")]
    # The first steps are warm-up (allocation, first kernels); the rate after them is steady state.
    assert all("(warming up)" in line for line in steps[:3]), steps
    assert not any("(warming up)" in line for line in steps[3:]), steps
    assert result.steady_windows_per_s > 0 and result.peak_memory_gib != result.peak_memory_gib  # NaN off CUDA
    recorded = json.loads((tmp_path / "training.json").read_text())
    assert recorded["batch"] == [2, 2] and recorded["steady_windows_per_s"] > 0


# ---------------------------------------------------------------- batching "episodes"


@pytest.fixture(scope="module")
def uneven_store(tmp_path_factory):
    """(store, ids): three episodes of 18, 20 and 24 frames, so a batch of them is padded."""
    from conftest import write_episode_file

    from vla_pipeline.data.ingest import ingest_episodes

    folder = tmp_path_factory.mktemp("uneven")
    paths = [write_episode_file(folder / f"episode_2025061{i}_101502_1box_hori_{side}_core_far.h5",
                                frames=frames, height=48, width=64, seed=10 + i)
             for i, (frames, side) in enumerate([(18, "left"), (20, "right"), (24, "left")])]
    store = tmp_path_factory.mktemp("store") / "store.zarr"
    ingest_episodes(paths, store)
    return store, [p.stem for p in paths]


@pytest.mark.parametrize("head", ["regression", "classification", "joint"])
def test_an_episode_batch_has_the_loss_of_all_its_windows(uneven_store, head):
    """Whole episodes, padded to the longest, give the loss (actions, stops ×6, side probe) of all
    their windows in one batch: the same targets, in one backbone pass per frame instead of one
    per window it is in."""
    import torch

    from vla_pipeline.policy.model import build_policy
    from vla_pipeline.training.windows import EpisodeDataset, WindowDataset, collate_episodes, collate_windows

    store, ids = uneven_store
    config = PolicyConfig.tiny(window=3, chunk=2, action_head=head, stop_loss_weight=6.0, side_loss_weight=0.5)
    policy = build_policy(config).eval()
    episodes = EpisodeDataset(store, ids, config.window, config.chunk, config.action_scale)
    assert len(episodes) == 3
    whole = collate_episodes([episodes[i] for i in range(len(episodes))])
    assert whole["images"].shape[:2] == (3, 24) and whole["lengths"].tolist() == [18, 20, 24]
    assert not whole["action_mask"][0, 18:].any() and not whole["action_mask"][1, 20:].any()  # padding
    windows = WindowDataset(store, ids, config.window, config.chunk, config.action_scale)
    cut = collate_windows([windows[i] for i in range(len(windows))])
    assert len(cut["instruction"]) == (18 - 2) + (20 - 2) + (24 - 2)

    def loss(batch):
        with torch.no_grad():
            return policy({"images": batch["images"], "instructions": list(batch["instruction"]),
                           "actions": batch["actions"], "action_mask": batch["action_mask"],
                           "sides": list(batch["side"]), "lengths": batch.get("lengths")})

    (episode_loss, episode_info), (window_loss, window_info) = loss(whole), loss(cut)
    assert episode_info["valid_steps"] == window_info["valid_steps"]  # the same targets, stops weighted ×6
    assert episode_info["side_loss"] == pytest.approx(window_info["side_loss"], rel=1e-5)
    assert float(episode_loss) == pytest.approx(float(window_loss), rel=1e-5)


def test_training_on_whole_episodes(small_store, tmp_path):
    store, train_ids, val_ids = small_store
    lines = []
    result = train(PolicyConfig.tiny(side_loss_weight=0.5), TrainConfig(epochs=2, batch_size=2, grad_accum=1,
                                                                       log_every=1, batching="episodes"),
                   store, train_ids, val_ids, tmp_path, log=lines.append)
    assert result.steps == 2 * 2  # 3 episodes in batches of 2, twice
    assert result.best_val_loss < 10 and all(r["train_loss"] > 0 for r in result.history)
    # windows/s counts the windows of the episodes (3 × (20 - 3 + 1) an epoch), as the windows batching does
    assert any(line.startswith("step ") and "windows/s" in line for line in lines)
    assert (tmp_path / "policy" / "policy_config.json").is_file()
