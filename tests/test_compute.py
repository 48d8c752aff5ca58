from __future__ import annotations

import pytest
import torch

from vla_pipeline.training.compute import plan_compute


def test_auto_on_a_cpu_machine(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    plan = plan_compute()
    assert (plan.device, plan.precision, plan.mixed_precision) == ("cpu", "fp32", "no")
    assert "CPU" in plan.note


def test_cuda_requested_without_gpu_falls_back_and_says_so(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    plan = plan_compute("cuda", "fp16")
    assert plan.device == "cpu" and plan.precision == "fp32"
    assert "no GPU is visible" in plan.note and "fp16" in plan.note


def test_gpu_prefers_bf16_when_supported(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: "Test GPU")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert plan_compute().precision == "bf16"
    assert plan_compute("auto", "fp32").mixed_precision == "no"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert plan_compute().precision == "fp16"
    assert "no bf16" in plan_compute("cuda", "bf16").note


def test_bad_values_are_named():
    with pytest.raises(ValueError, match="^compute: device: Input should be 'auto', 'cuda' or 'cpu'$"):
        plan_compute("tpu")
    with pytest.raises(ValueError, match="precision: Input should be 'auto', 'bf16', 'fp16' or 'fp32'"):
        plan_compute("auto", "int8")
