"""The scripted-replay baseline: what replaying the recorded key sequences scores, blind.

At frame index t of a validation episode it predicts the most common recorded action at frame
index t among the training episodes of the same side and distance (from the scenario tokens);
where that group has no episode so long, or the scenario is unknown, the same side; then all
training episodes; past every recorded episode, no motion. It sees neither the image nor the
instruction's wording, only which course the episode runs. Operator variants (an extra W, a
pause, a back-step) cannot be foreseen, so it is strong but not perfect: a vision policy far
below it is not using the image, and one above it sees where the robot really is.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from ..data.schema import parse_scenario
from ..data.store import WindowStore

Key = tuple[str, ...]  # (side, distance), (side,) or (): narrowest first


def _keys(side: str | None, distance: str | None) -> list[Key]:
    keys: list[Key] = []
    if side and distance:
        keys.append((side, distance))
    if side:
        keys.append((side,))
    keys.append(())
    return keys


def _modal_actions(series: Sequence[np.ndarray]) -> np.ndarray:
    """(T_max, 2): at each frame index, the most common action among the episodes that long.

    Actions are compared rounded to 1e-3 (teleop commands are exact multiples of the scale) and
    replayed as recorded; a tie goes to the action seen first, episodes taken in the order given."""
    length = max(len(actions) for actions in series)
    modal = np.zeros((length, 2), np.float32)
    for t in range(length):
        recorded = [actions[t] for actions in series if len(actions) > t]
        votes = Counter(tuple(np.round(action, 3).tolist()) for action in recorded)
        winner = votes.most_common(1)[0][0]
        modal[t] = next(action for action in recorded if tuple(np.round(action, 3).tolist()) == winner)
    return modal


@dataclass(frozen=True)
class ScriptedReplay:
    tables: dict[Key, np.ndarray]  # key -> (T_max, 2) modal action per frame index

    @classmethod
    def from_episodes(cls, episodes: Iterable[tuple[str | None, str | None, np.ndarray]]) -> ScriptedReplay:
        """From (side, distance, (T, 2) actions) of every training episode."""
        groups: dict[Key, list[np.ndarray]] = defaultdict(list)
        for side, distance, actions in episodes:
            for key in _keys(side, distance):
                groups[key].append(np.asarray(actions, np.float32)[:, :2])
        if not groups:
            raise ValueError("scripted replay needs at least one training episode")
        return cls({key: _modal_actions(series) for key, series in groups.items()})

    @classmethod
    def from_store(cls, store: WindowStore, train_ids: Sequence[str]) -> ScriptedReplay:
        return cls.from_episodes(
            (*side_and_distance(store.episode_attrs(episode_id)), np.asarray(store.open_episode(episode_id)["actions"][:]))
            for episode_id in sorted(train_ids))

    def action(self, side: str | None, distance: str | None, t: int) -> np.ndarray:
        for key in _keys(side, distance):
            table = self.tables.get(key)
            if table is not None and t < len(table):
                return table[t]
        return np.zeros(2, np.float32)

    def predict(self, side: str | None, distance: str | None, frames: Sequence[int], chunk: int) -> np.ndarray:
        """(len(frames), chunk, 2): the replayed chunk at each of the given frame indices."""
        return np.stack([[self.action(side, distance, t + c) for c in range(chunk)] for t in frames])


def side_and_distance(attrs) -> tuple[str | None, str | None]:
    """(side, distance) of a stored episode; None where its scenario does not say."""
    scenario = parse_scenario(attrs.get("scenario") or "")
    return attrs.get("side") or (scenario.side if scenario else None), scenario.distance if scenario else None
