"""Which device and precision training gets, and why, in one decision used everywhere."""

from __future__ import annotations

from dataclasses import dataclass

import torch

DEVICES = ("auto", "cuda", "cpu")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")


@dataclass(frozen=True)
class ComputePlan:
    device: str  # "cuda" or "cpu"
    precision: str  # "bf16", "fp16" or "fp32"
    note: str  # one line for the run log: what was asked, what was granted
    # Find the largest per-step batch that fits the GPU (autobatch.py) instead of the training
    # config's; the effective batch stays the config's. The CPU keeps the configured split.
    auto_batch: bool = False

    @property
    def mixed_precision(self) -> str:
        """The value accelerate's `mixed_precision` takes."""
        return {"bf16": "bf16", "fp16": "fp16", "fp32": "no"}[self.precision]


def plan_compute(device: str = "auto", precision: str = "auto", batch_size: str | None = None) -> ComputePlan:
    """Resolve `auto`, and fall back to the CPU (saying so) when no GPU is usable.
    `batch_size`: None keeps the training config's per-step batch, "auto" probes the GPU."""
    if batch_size not in (None, "auto"):
        raise ValueError(f"batch_size must be 'auto' or unset (the training config's), not {batch_size!r}")
    if device not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, not {device!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    cuda = torch.cuda.is_available()
    notes = []
    if device == "cuda" and not cuda:
        notes.append("CUDA was requested but no GPU is visible: falling back to the CPU")
    chosen = "cuda" if cuda and device in ("auto", "cuda") else "cpu"
    if precision == "auto":
        if chosen == "cuda":
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            precision = "fp32"
    elif chosen == "cpu" and precision == "fp16":
        notes.append("fp16 autocast is not supported on the CPU: using fp32")
        precision = "fp32"
    elif chosen == "cuda" and precision == "bf16" and not torch.cuda.is_bf16_supported():
        notes.append("this GPU has no bf16: using fp16")
        precision = "fp16"
    where = torch.cuda.get_device_name(0) if chosen == "cuda" else "CPU"
    granted = f"training on {where} ({chosen}) with {precision}"
    return ComputePlan(chosen, precision, "; ".join([*notes, granted]), auto_batch=batch_size == "auto")
