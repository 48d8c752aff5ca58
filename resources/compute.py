"""Compute for training: device, precision, batch, processes and loader workers, as a Dagster
resource whose fields are `vla_pipeline.training.compute.ComputeSettings`'s."""

import dagster as dg

from resources.typed import dagster_config
from vla_pipeline.training.compute import ComputeSettings


class _ComputeMethods(dg.ConfigurableResource):
    """Where training runs. `auto` takes a GPU when there is one (bf16 if it supports it,
    else fp16) and the CPU otherwise (fp32); the run log says what was granted."""

    def settings(self) -> ComputeSettings:
        return ComputeSettings(**{name: getattr(self, name) for name in ComputeSettings.model_fields})

    def plan(self):
        """The ComputePlan (imports torch, so only when a run asks for it)."""
        from vla_pipeline.training.compute import plan_compute

        return plan_compute(self.device, self.precision, self.batch_size)


ComputeResource = dagster_config(ComputeSettings, "ComputeResource", base=_ComputeMethods)
