"""Per-episode action statistics that merge into dataset-wide ones without a rescan."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ActionStats:
    count: int
    mean: np.ndarray  # (D,)
    var: np.ndarray  # (D,) population variance
    min: np.ndarray
    max: np.ndarray

    @classmethod
    def of(cls, actions: np.ndarray) -> ActionStats:
        actions = np.asarray(actions, np.float64)
        return cls(
            count=int(actions.shape[0]),
            mean=actions.mean(axis=0),
            var=actions.var(axis=0),
            min=actions.min(axis=0),
            max=actions.max(axis=0),
        )

    @classmethod
    def merge(cls, parts: Iterable[ActionStats]) -> ActionStats:
        """Count-weighted mean and pooled variance (within- plus between-episode spread)."""
        parts = [part for part in parts if part.count > 0]
        if not parts:
            raise ValueError("no action statistics to merge")
        counts = np.array([part.count for part in parts], np.float64)
        means = np.stack([part.mean for part in parts])
        total = counts.sum()
        mean = (counts[:, None] * means).sum(axis=0) / total
        within = (counts[:, None] * np.stack([part.var for part in parts])).sum(axis=0)
        between = (counts[:, None] * (means - mean) ** 2).sum(axis=0)
        return cls(
            count=int(total),
            mean=mean,
            var=(within + between) / total,
            min=np.min([part.min for part in parts], axis=0),
            max=np.max([part.max for part in parts], axis=0),
        )

    def to_dict(self) -> dict:
        return {
            "count": self.count,
            **{name: np.asarray(getattr(self, name)).tolist() for name in ("mean", "var", "min", "max")},
        }

    @classmethod
    def from_dict(cls, data: dict) -> ActionStats:
        return cls(
            count=int(data["count"]),
            **{name: np.asarray(data[name], np.float64) for name in ("mean", "var", "min", "max")},
        )
