"""Compute for training: device, precision, batch, processes and loader workers, as a Dagster resource."""

from typing import Optional

import dagster as dg


class ComputeResource(dg.ConfigurableResource):
    """Where training runs. `auto` takes a GPU when there is one (bf16 if it supports it,
    else fp16) and the CPU otherwise (fp32); the run log says what was granted."""

    device: str = "auto"  # auto | cuda | cpu
    precision: str = "auto"  # auto | bf16 | fp16 | fp32
    loader_workers: int = 0
    # "auto": the largest per-step batch that fits the GPU (probed once per card and config,
    # then cached), with accumulation keeping the training config's effective batch. Unset:
    # the training config's batch_size × grad_accum.
    batch_size: Optional[str] = None
    # Training processes on this machine (one per GPU): above 1, lora_adapter launches the
    # training through torchrun and streams its log into the run.
    processes: int = 1

    def plan(self):
        """The ComputePlan (imports torch, so only when a run asks for it)."""
        from vla_pipeline.training.compute import plan_compute

        return plan_compute(self.device, self.precision, self.batch_size)
