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

DEFAULT_MARGIN = 0.15  # of the card's memory, left for fragmentation and the evaluation pass
MAX_PROBED_BATCH = 256


@dataclass(frozen=True)
class BatchPlan:
    per_step: int  # windows per forward/backward
    grad_accum: int  # steps per optimizer step
    note: str  # one line for the run log

    @property
    def effective(self) -> int:
        return self.per_step * self.grad_accum


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
    root = os.environ.get("VLA_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache",
                                                       "vla_pipeline")
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
