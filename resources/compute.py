"""Compute for training: device, precision and loader workers, as a Dagster resource."""

import dagster as dg


class ComputeResource(dg.ConfigurableResource):
    """Where training runs. `auto` takes a GPU when there is one (bf16 if it supports it,
    else fp16) and the CPU otherwise (fp32); the run log says what was granted."""

    device: str = "auto"  # auto | cuda | cpu
    precision: str = "auto"  # auto | bf16 | fp16 | fp32
    loader_workers: int = 0

    def plan(self):
        """The ComputePlan (imports torch, so only when a run asks for it)."""
        from vla_pipeline.training.compute import plan_compute

        return plan_compute(self.device, self.precision)
