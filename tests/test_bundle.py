"""The deploy bundle: LoRA merged in fp32, loaded with torch and transformers alone, same actions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from vla_pipeline.policy.bundle import export_bundle
from vla_pipeline.policy.model import build_policy, load_policy_dir, save_policy
from vla_pipeline.policy.policy_config import PolicyConfig
from vla_pipeline.policy.serving import StreamingPolicy, load_bundle

BIN = Path(sys.executable).parent
LEFT = "Navigate around the obstacle on the left side and reach the cup"


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory, tiny_backbone_path) -> Path:
    """A LoRA policy whose adapter changes the backbone's output (trained LoRA, not the zero init)."""
    policy = build_policy(PolicyConfig.tiny(backbone=str(tiny_backbone_path), train_decoder_layers=1))
    with torch.no_grad():
        generator = torch.Generator().manual_seed(1)
        for name, param in policy.named_parameters():
            if "lora_B" in name or name.startswith("head."):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    return save_policy(policy, tmp_path_factory.mktemp("trained") / "policy")


@pytest.fixture(scope="module")
def frames() -> list[np.ndarray]:
    return list(np.random.default_rng(0).integers(0, 256, (5, 72, 128, 3), dtype=np.uint8))


def run(policy: StreamingPolicy, frames) -> np.ndarray:
    policy.reset()
    return np.stack([policy.step(frame, LEFT) for frame in frames])


def test_merged_bundle_acts_as_the_unmerged_policy(trained_dir, frames, tmp_path):
    unmerged = run(StreamingPolicy(load_policy_dir(trained_dir)), frames)
    bundle = export_bundle(trained_dir, tmp_path / "bundle", dtype="fp32")
    assert {"config.json", "model.safetensors", "policy.safetensors", "policy_config.json", "bundle.json",
            "tokenizer.json"} <= {p.name for p in bundle.iterdir()}
    assert not (bundle / "adapter").exists()
    config = json.loads((bundle / "policy_config.json").read_text())
    assert config["lora_enable"] is False and config["freeze_backbone"] is True
    merged = run(load_bundle(bundle), frames)
    assert np.abs(unmerged).max() > 0.05  # the adapter and head matter: nothing trivially equal
    np.testing.assert_allclose(merged, unmerged, atol=1e-4)


def test_half_precision_bundle_stays_close(trained_dir, frames, tmp_path):
    unmerged = run(StreamingPolicy(load_policy_dir(trained_dir)), frames)
    bundle = export_bundle(trained_dir, tmp_path / "bundle-bf16", dtype="bf16")
    policy = load_bundle(bundle)
    assert {p.dtype for p in policy.policy.kosmos.parameters()} == {torch.bfloat16}
    np.testing.assert_allclose(run(policy, frames), unmerged, atol=0.05)


ROBOT_NEVER_IMPORTS = ("h5py", "zarr", "mlflow", "peft", "dagster", "isal", "xxhash")
LOAD_ON_THE_ROBOT = """
import sys, json
import numpy as np
for name in %r:
    sys.modules[name] = None  # importing any of them now fails
from vla_pipeline.policy.serving import load_bundle
policy = load_bundle(sys.argv[1])
policy.reset()
actions = np.stack([policy.step(np.full((72, 128, 3), i * 40, np.uint8), "go left") for i in range(3)])
print(json.dumps({"shape": list(actions.shape), "finite": bool(np.isfinite(actions).all())}))
""" % (ROBOT_NEVER_IMPORTS,)


def test_bundle_loads_where_the_data_and_registry_libraries_cannot_be_imported(trained_dir, tmp_path):
    bundle = export_bundle(trained_dir, tmp_path / "bundle", dtype="fp32")
    result = subprocess.run([sys.executable, "-c", LOAD_ON_THE_ROBOT, str(bundle)], capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {"shape": [3, 2, 2], "finite": True}


def test_export_command(trained_dir, tmp_path):
    out = tmp_path / "exported"
    done = subprocess.run([str(BIN / "vla-pipeline"), "export", str(trained_dir), str(out), "--dtype", "fp32"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert f"→ {out} (fp32" in done.stdout and "load_bundle" in done.stdout
    assert json.loads((out / "bundle.json").read_text())["merged_lora"] is True
    missing = subprocess.run([str(BIN / "vla-pipeline"), "export", str(tmp_path / "nowhere"), str(tmp_path / "b")],
                             capture_output=True, text=True)
    assert missing.returncode == 2 and "no such folder" in missing.stderr
