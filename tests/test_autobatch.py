"""batch_size auto: the split of the effective batch and the probe's search, with a fake memory."""

from __future__ import annotations

import pytest

from vla_pipeline.training.autobatch import largest_fitting_batch, plan_batch, split_effective_batch


class FakeCard:
    """A card where a batch of b windows needs `per_window * b + base` bytes."""

    def __init__(self, memory: int, per_window: int, base: int = 0):
        self.memory, self.per_window, self.base, self.tried = memory, per_window, base, []

    def fits(self, batch: int) -> bool:
        self.tried.append(batch)
        return self.base + batch * self.per_window <= self.memory


@pytest.mark.parametrize("memory, expected", [(100, 10), (105, 10), (9, 0), (10, 1), (2_000, 200), (10_000, 256)])
def test_finds_the_largest_batch_that_fits(memory, expected):
    card = FakeCard(memory, per_window=10, base=0)
    assert largest_fitting_batch(card.fits, ceiling=256) == expected
    assert len(card.tried) <= 2 * 9  # doubling, then bisecting: logarithmic in the answer


def test_the_effective_batch_is_kept():
    assert split_effective_batch(8, 64) == (8, 1)  # everything fits: no accumulation
    assert split_effective_batch(8, 3) == (3, 3)  # 9 ≥ 8: the smallest product at or above
    assert split_effective_batch(8, 4) == (4, 2)
    assert split_effective_batch(64, 20) == (16, 4)
    with pytest.raises(ValueError, match="not even one window fits"):
        split_effective_batch(8, 0)


def test_probes_once_per_key_then_uses_the_cache(tmp_path):
    calls = []

    def probe():
        calls.append(1)
        return 6

    first = plan_batch(16, "h100-policyA-bf16", probe, cache=tmp_path / "autobatch.json")
    again = plan_batch(16, "h100-policyA-bf16", probe, cache=tmp_path / "autobatch.json")
    other = plan_batch(16, "h100-policyB-bf16", lambda: 32, cache=tmp_path / "autobatch.json")
    assert calls == [1]
    assert (first.per_step, first.grad_accum) == (again.per_step, again.grad_accum) == (6, 3)
    assert "probed" in first.note and "cached" in again.note
    assert (other.per_step, other.grad_accum) == (16, 1)
