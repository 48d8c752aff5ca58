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


def test_the_probe_runs_real_training_steps_and_treats_out_of_memory_as_no():
    import torch

    from vla_pipeline.policy.model import build_policy
    from vla_pipeline.policy.policy_config import PolicyConfig
    from vla_pipeline.training.autobatch import memory_fits
    from vla_pipeline.training.autobatch import synthetic_batch

    config = PolicyConfig.tiny()
    policy = build_policy(config)
    trained = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=0.0, weight_decay=0.0)
    before = [p.detach().clone() for p in trained]
    ran: list[int] = []

    def step(size: int) -> None:
        batch = synthetic_batch(config, size)
        assert batch["images"].shape == (size, config.window, 224, 224, 3)
        loss, _ = policy(batch)
        loss.backward()
        optimizer.step()
        ran.append(size)

    def reset() -> None:
        optimizer.zero_grad(set_to_none=True)

    # A fake card: 100 bytes per window of the last step that ran, 550 usable.
    fits = memory_fits(step, lambda: 100 * ran[-1], reset, limit_bytes=550)
    assert largest_fitting_batch(fits, ceiling=16) == 5
    assert ran and all(size <= 8 for size in ran)
    assert all(torch.equal(a, b) for a, b in zip(before, trained))  # lr 0: the probe trains nothing

    def out_of_memory_above_3(size: int) -> None:
        if size > 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        step(size)

    assert largest_fitting_batch(memory_fits(out_of_memory_above_3, lambda: 0, reset, 10**12), ceiling=16) == 3


def test_batch_size_setting_is_checked():
    from vla_pipeline.training.compute import plan_compute

    assert plan_compute("cpu", "auto", "auto").auto_batch
    assert not plan_compute("cpu", "auto", None).auto_batch
    assert not plan_compute("cpu", "auto", "config").auto_batch
    with pytest.raises(ValueError, match="batch_size: Input should be 'config' or 'auto'"):
        plan_compute("cpu", "auto", "big")
