"""Whether the data moved enough since the last training to train again.

The last training is described by the episodes it saw and their content hashes (recorded
by `lora_adapter`); the current data by the stored, accepted episodes of the window store.
Rejected episodes never enter the store, so they never count.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ..data.store import WindowStore


@dataclass(frozen=True)
class RetrainDecision:
    retrain: bool
    reason: str
    new: int = 0
    changed: int = 0
    removed: int = 0


def stored_episodes(store: WindowStore) -> dict[str, str]:
    """episode_id -> content hash of every accepted episode in the store."""
    return {episode_id: store.episode_attrs(episode_id)["content_hash"] for episode_id in store.episode_ids()}


def retrain_decision(current: Mapping[str, str], trained: Mapping[str, str] | None, min_changed: int = 1) -> RetrainDecision:
    """Retrain when at least `min_changed` episodes are new, changed or removed since the last training."""
    if not current:
        return RetrainDecision(False, "the window store has no accepted episodes yet")
    if trained is None:
        return RetrainDecision(True, f"no model trained yet; {len(current)} stored episodes", new=len(current))
    new = sum(1 for key in current if key not in trained)
    changed = sum(1 for key in current if key in trained and trained[key] != current[key])
    removed = sum(1 for key in trained if key not in current)
    counts = f"{new} new, {changed} changed, {removed} removed since the last training"
    total = new + changed + removed
    if total == 0:
        return RetrainDecision(False, f"data unchanged since the last training ({len(trained)} episodes)")
    if total < min_changed:
        return RetrainDecision(False, f"{counts}; waiting for {min_changed}", new, changed, removed)
    return RetrainDecision(True, counts, new, changed, removed)
