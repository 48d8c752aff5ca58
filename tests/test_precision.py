"""Training memory: frozen weights in the compute precision, fp32 master weights for what trains."""

from __future__ import annotations

import pytest
import torch
from test_model import make_batch, make_policy

from vla_pipeline.policy.model import build_policy
from vla_pipeline.policy.policy_config import PolicyConfig
from vla_pipeline.training.compute import half_dtype
from vla_pipeline.training.train import keep_trained_in_fp32


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_frozen_weights_follow_the_precision_and_trained_ones_stay_fp32(tiny_backbone_path, precision):
    config = PolicyConfig.tiny(backbone=str(tiny_backbone_path), train_decoder_layers=1)
    policy = keep_trained_in_fp32(build_policy(config, dtype=half_dtype(precision)))
    frozen = {p.dtype for p in policy.parameters() if not p.requires_grad}
    trained = {name: p.dtype for name, p in policy.named_parameters() if p.requires_grad}
    assert frozen == {half_dtype(precision)}
    assert set(trained.values()) == {torch.float32}
    assert any("lora_" in name for name in trained) and any(".layers.1." in name and "lora_" not in name
                                                            for name in trained)  # a fully trained layer too
    assert "action_token" in trained and any(name.startswith("head.") for name in trained)


def test_bf16_loss_matches_fp32_within_tolerance(tiny_backbone_path):
    full = make_policy(tiny_backbone_path)
    half = keep_trained_in_fp32(build_policy(full.config, dtype=torch.bfloat16))
    half.load_state_dict({k: v.to(half.state_dict()[k].dtype) for k, v in full.state_dict().items()})
    batch = make_batch()
    reference, _ = full(batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = half(batch)
    assert loss.dtype == torch.float32
    assert float(loss.detach()) == pytest.approx(float(reference.detach()), rel=0.03)
    loss.backward()
    grads = [p.grad for p in half.parameters() if p.requires_grad]
    assert all(g is not None and g.dtype == torch.float32 for g in grads)  # fp32 masters get fp32 grads
