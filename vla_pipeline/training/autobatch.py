"""`batch_size: auto`: the largest per-step batch of windows that fits the GPU, found once.

The effective batch (per-step batch × gradient accumulation) stays what the training config
asks for; only how it is split changes. The probe runs real training steps (forward, backward,
optimizer) on synthetic windows at growing batch sizes until one runs out of memory or passes
`1 - margin` of the card's memory, then bisects; the answer is cached per card, policy and
precision, so later runs start at once.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..data.atomic import write_text
from ..data.schema import ACTION_DIMS, IMAGE_SIZE, INSTRUCTION_TEMPLATE
from ..settings import settings

DEFAULT_MARGIN = 0.15  # of the card's memory, left for fragmentation and the evaluation pass
MAX_PROBED_BATCH = 256


@dataclass(frozen=True)
class BatchPlan:
    per_step: int  # windows per forward/backward
    grad_accum: int  # steps per optimizer step
    note: str  # one line for the run log


def split_effective_batch(effective: int, largest_fitting: int) -> tuple[int, int]:
    """(per-step batch, accumulation) with per-step ≤ `largest_fitting` and their product as
    close to `effective` as possible (never below it)."""
    if largest_fitting < 1:
        raise ValueError("not even one window fits: lower the window, the chunk or the precision")
    accumulation = math.ceil(effective / min(effective, largest_fitting))
    return math.ceil(effective / accumulation), accumulation


def largest_fitting_batch(fits: Callable[[int], bool], ceiling: int = MAX_PROBED_BATCH) -> int:
    """The largest batch b ≤ `ceiling` for which `fits(b)` holds, assuming fitting is monotone:
    doubling from 1, then bisecting between the last fit and the first failure. 0 if 1 fails."""
    if not fits(1):
        return 0
    good, bad = 1, None
    while good < ceiling:
        trial = min(good * 2, ceiling)
        if fits(trial):
            good = trial
        else:
            bad = trial
            break
    if bad is None:
        return good
    while bad - good > 1:
        middle = (good + bad) // 2
        good, bad = (middle, bad) if fits(middle) else (good, middle)
    return good


def cache_key(device_name: str, total_memory: int, policy_config: dict, precision: str, margin: float) -> str:
    payload = json.dumps([device_name, total_memory, policy_config, precision, margin], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def cache_file() -> Path:
    root = settings().cache or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vla_pipeline"
    return Path(root) / "autobatch.json"


def plan_batch(effective: int, key: str, probe: Callable[[], int], cache: Path | None = None) -> BatchPlan:
    """Split `effective` windows per optimizer step using the cached or freshly probed
    largest fitting batch (`probe()` returns it)."""
    cache = cache or cache_file()
    known = json.loads(cache.read_text()) if cache.is_file() else {}
    if key in known:
        largest, source = int(known[key]), "cached"
    else:
        largest, source = probe(), "probed"
        cache.parent.mkdir(parents=True, exist_ok=True)
        write_text(cache, json.dumps({**known, key: largest}, indent=1))
    per_step, accumulation = split_effective_batch(effective, largest)
    return BatchPlan(per_step, accumulation, f"batch auto: {largest} windows fit per step ({source}); "
                                             f"{per_step} × {accumulation} accumulation = {per_step * accumulation}")


def memory_fits(step: Callable[[int], None], peak_bytes: Callable[[], int], reset: Callable[[], None],
                limit_bytes: int) -> Callable[[int], bool]:
    """`fits(batch)` for `largest_fitting_batch`: run one real training `step(batch)` and say
    whether its peak memory stayed within `limit_bytes`; running out of memory is a no."""
    import torch

    def fits(batch: int) -> bool:
        reset()
        try:
            step(batch)
            return peak_bytes() <= limit_bytes
        except torch.OutOfMemoryError:
            return False
        finally:
            reset()

    return fits


def batch_split(policy, policy_config, train_config, compute) -> tuple[int, int, str | None]:
    """(per-step batch, accumulation, a line for the run log or None) for a training: the
    training config's split, or with `compute.batch_size: auto` on a GPU the probed one."""
    per_step, accumulation = train_config.batch_size, train_config.grad_accum
    if not compute.auto_batch:
        return per_step, accumulation, None
    if compute.device != "cuda":
        return per_step, accumulation, f"batch auto: no GPU to probe, keeping {per_step} × {accumulation} accumulation"
    if train_config.batching == "episodes":  # the probe measures windows, not whole episodes
        return per_step, accumulation, (f"batch auto: the probe sizes windows, not episodes; keeping "
                                        f"{per_step} episodes × {accumulation} accumulation")
    import torch

    key = cache_key(torch.cuda.get_device_name(), torch.cuda.get_device_properties(0).total_memory,
                    policy_config.to_dict(), compute.precision, DEFAULT_MARGIN)
    plan = plan_batch(per_step * accumulation, key, lambda: probe_largest_batch(policy, policy_config, compute.precision))
    return plan.per_step, plan.grad_accum, plan.note


def synthetic_batch(policy_config, size: int,
                    instruction: str = INSTRUCTION_TEMPLATE.format(side="left", target="cup")) -> dict:
    """`size` windows of random frames and actions, shaped as the loader's."""
    import torch

    generator = torch.Generator().manual_seed(size)
    shape = (size, policy_config.window, IMAGE_SIZE, IMAGE_SIZE, 3)
    return {
        "images": torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator),
        "instructions": [instruction] * size,
        "actions": torch.randint(-1, 2, (size, policy_config.window, policy_config.chunk, len(ACTION_DIMS)),
                                 generator=generator).float(),
        "action_mask": torch.ones(size, policy_config.window, policy_config.chunk, dtype=torch.bool),
        "sides": ["left"] * size,
    }


def probe_largest_batch(policy, policy_config, precision: str, margin: float = DEFAULT_MARGIN) -> int:
    """The largest per-step batch of windows whose training step (forward, backward, AdamW) on
    this GPU peaks below `1 - margin` of its memory. Changes no weight (lr 0)."""
    import torch

    from .compute import half_dtype

    device = torch.device("cuda", torch.cuda.current_device())
    policy.to(device)
    trained = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=0.0, weight_decay=0.0, fused=True)

    def step(size: int) -> None:
        with torch.autocast("cuda", dtype=half_dtype(precision) or torch.float32, enabled=half_dtype(precision) is not None):
            loss, _ = policy(synthetic_batch(policy_config, size))
        loss.backward()
        optimizer.step()

    def reset() -> None:
        optimizer.zero_grad(set_to_none=True)
        optimizer.state.clear()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)

    total = torch.cuda.get_device_properties(device).total_memory
    fits = memory_fits(step, lambda: torch.cuda.max_memory_allocated(device), reset, int((1 - margin) * total))
    try:
        return largest_fitting_batch(fits)
    finally:
        reset()
