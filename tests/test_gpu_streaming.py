"""On a GPU: the CUDA-graph streaming step gives the eager step's actions over a rendered rollout.

Skipped without CUDA (the CPU half of this check, a backbone call that reuses its output buffer
as a captured graph does, is in test_serving.py). `benchmarks/gpu.py` runs the same check on the
full-size bundle."""

from __future__ import annotations

import pytest
import torch

from vla_pipeline.policy.model import build_policy
from vla_pipeline.policy.policy_config import PolicyConfig
from vla_pipeline.policy.serving import COMPILED_TOLERANCE, compiled_vs_eager
from vla_pipeline.sim.rollout import guide_camera_frames

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="no CUDA device: CUDA-graph streaming cannot run here")


@pytest.fixture(scope="module")
def rollout_frames():
    """20 and more camera frames of the scripted guide's rollouts at 720p, as the robot sends them."""
    return guide_camera_frames(20, seed=3)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_streaming_equals_eager_streaming(tiny_backbone_path, rollout_frames, dtype):
    assert sum(len(frames) for frames, _ in rollout_frames) >= 20
    policy = build_policy(PolicyConfig.tiny(backbone=str(tiny_backbone_path), window=4, chunk=2, seed=3),
                          dtype=dtype).cuda().eval()
    assert compiled_vs_eager(policy, rollout_frames) <= COMPILED_TOLERANCE[dtype]
