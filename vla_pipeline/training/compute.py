"""Which device and precision training gets, and why, in one decision used everywhere.

Imports torch only inside the functions that need it: the compute resource, in every Dagster
process, reads `ComputeSettings` from here."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..policy.policy_config import config_error


def half_dtype(precision: str):
    """The torch dtype a half precision ("bf16", "fp16") autocasts to; None for "fp32"."""
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


class ComputeSettings(BaseModel):
    """What a training asks of the machine (the `compute` resource's fields)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    device: Literal["auto", "cuda", "cpu"] = Field("auto", description="auto: the GPU when there is one")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="auto: bf16 on a GPU that has it, else fp16; fp32 on the CPU")
    loader_workers: int = Field(0, ge=0, description="data loader processes")
    batch_size: Literal["config", "auto"] = Field("config", description=(
        "config: the training config's batch_size × grad_accum; auto: the largest per-step batch that "
        "fits the GPU, probed once per card and config, with accumulation keeping the effective batch"))
    processes: int = Field(1, ge=1, description="training processes on this machine, one per GPU (torchrun above 1)")

    @field_validator("batch_size", mode="before")
    @classmethod
    def _unset_is_config(cls, value):  # None: what earlier releases wrote for "the config's"
        return "config" if value is None else value


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


def plan_compute(device: str = "auto", precision: str = "auto", batch_size: str | None = "config") -> ComputePlan:
    """Resolve `auto`, and fall back to the CPU (saying so) when no GPU is usable.
    `batch_size`: "config" (or None) keeps the training config's per-step batch, "auto" probes the GPU."""
    try:
        ComputeSettings(device=device, precision=precision, batch_size=batch_size)
    except ValidationError as error:
        raise ValueError(f"compute: {config_error(error)}") from None
    import torch

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
