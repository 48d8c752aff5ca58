"""Train/validation split by episode: stratified, deterministic and stable as episodes arrive.

Episodes are stratified by side (left, right, unknown) and, inside a side, by scenario group
once a group is large enough to hold a val share; smaller groups share one "other" group.
Episodes split before keep their set. New ones are taken in stable-hash order and put in val,
group with the largest val shortfall first, while their group is below its val share rounded
down, or their side is below its rounded val share and the group below its share rounded up.
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

import xxhash

from ..data.schema import scenario_group
from ..data.stats import ActionStats
from ..data.store import WindowStore

TRAIN, VAL = "train", "val"
UNKNOWN = "unknown"
SPLIT_FILE = "split.json"  # beside the episodes in the store; zarr ignores it
SMALL_GROUPS = ""  # where a side's episodes go whose scenario group is too small to stratify


@dataclass(frozen=True)
class EpisodeEntry:
    episode_id: str
    side: str | None
    scenario: str | None

    @classmethod
    def from_attrs(cls, episode_id: str, attrs: Mapping) -> EpisodeEntry:
        return cls(episode_id, attrs.get("side"), attrs.get("scenario"))

    @property
    def scenario_group(self) -> str | None:
        return scenario_group(self.scenario)


@dataclass
class Split:
    train: list[str]
    val: list[str]
    val_fraction: float
    excluded: dict[str, str] = field(default_factory=dict)  # quarantined id -> reason

    def __post_init__(self):
        self.train, self.val = sorted(self.train), sorted(self.val)
        both = set(self.train) & set(self.val)
        if both:
            raise ValueError(f"episodes in both train and val: {sorted(both)}")

    def assignments(self) -> dict[str, str]:
        return {**dict.fromkeys(self.train, TRAIN), **dict.fromkeys(self.val, VAL)}

    def to_dict(self) -> dict:
        return {
            "train": list(self.train),
            "val": list(self.val),
            "val_fraction": self.val_fraction,
            "excluded": dict(sorted(self.excluded.items())),
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> Split:
        return cls(
            train=list(data["train"]),
            val=list(data["val"]),
            val_fraction=float(data["val_fraction"]),
            excluded=dict(data.get("excluded", {})),
        )

    def summary(self, attrs_by_id: Mapping[str, Mapping]) -> dict:
        """Per set: episode, window and frame counts, and episodes per side and per scenario."""
        return {name: _set_summary(ids, attrs_by_id) for name, ids in ((TRAIN, self.train), (VAL, self.val))}


def _set_summary(episode_ids: list[str], attrs_by_id: Mapping[str, Mapping]) -> dict:
    attrs = [attrs_by_id[episode_id] for episode_id in episode_ids]
    return {
        "episodes": len(attrs),
        "windows": sum(len(a["window_starts"]) for a in attrs),
        "frames": sum(int(a["num_frames"]) for a in attrs),
        "sides": dict(sorted(Counter(a.get("side") or UNKNOWN for a in attrs).items())),
        "scenarios": dict(sorted(Counter(a.get("scenario") or UNKNOWN for a in attrs).items())),
    }


def assign_split(
    episodes: Iterable[EpisodeEntry],
    previous: Split | Mapping | None = None,
    val_fraction: float = 0.2,
    min_stratum_for_scenario: int | None = None,
) -> Split:
    """Split episodes into train and val, keeping every assignment `previous` already made.

    A scenario group becomes its own stratum at `min_stratum_for_scenario` episodes
    (default: enough for one val episode, ceil(1 / val_fraction)).
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be strictly between 0 and 1, got {val_fraction!r}")
    entries = list(episodes)
    duplicates = sorted(i for i, n in Counter(e.episode_id for e in entries).items() if n > 1)
    if duplicates:
        raise ValueError(f"duplicate episode ids: {duplicates}")
    if isinstance(previous, Mapping):
        previous = Split.from_dict(previous)
    current = {e.episode_id for e in entries}
    earlier = previous.assignments() if previous else {}
    assigned = {episode_id: s for episode_id, s in earlier.items() if episode_id in current}

    min_stratum = min_stratum_for_scenario or math.ceil(round(1 / val_fraction, 9))
    by_side: dict[str, list[EpisodeEntry]] = defaultdict(list)
    for entry in entries:
        by_side[entry.side or UNKNOWN].append(entry)
    for side_entries in by_side.values():
        # A one-episode group could only ever be all train or all val, so groups start at 2.
        assigned.update(_assign_side(side_entries, assigned, val_fraction, max(2, min_stratum)))
    return Split(
        train=[i for i, s in assigned.items() if s == TRAIN],
        val=[i for i, s in assigned.items() if s == VAL],
        val_fraction=val_fraction,
    )


def _assign_side(
    entries: list[EpisodeEntry], assigned: dict[str, str], val_fraction: float, min_stratum: int
) -> dict[str, str]:
    """Train or val for this side's unassigned episodes."""
    group_sizes = Counter(e.scenario_group for e in entries)
    groups: dict[str, list[str]] = defaultdict(list)
    for entry in entries:
        large = entry.scenario_group is not None and group_sizes[entry.scenario_group] >= min_stratum
        groups[entry.scenario_group if large else SMALL_GROUPS].append(entry.episode_id)

    share = {key: round(val_fraction * len(ids), 9) for key, ids in groups.items()}  # 9: float noise
    # A group of 2 or more always keeps one episode for train.
    ceiling = {key: min(math.ceil(share[key]), max(len(ids) - 1, 1)) for key, ids in groups.items()}
    val_count = {key: sum(assigned.get(i) == VAL for i in ids) for key, ids in groups.items()}
    # Reversed so that pop() hands out the lowest stable hash first.
    waiting = {
        key: sorted((i for i in ids if i not in assigned), key=_stable_rank, reverse=True)
        for key, ids in groups.items()
    }
    side_target, side_val = _val_target(len(entries), val_fraction), sum(val_count.values())

    def takes_val(key: str) -> bool:
        # A group gets its share rounded down even past the side target (which only earlier
        # assignments can cause); the rounding remainders go by the side target.
        if val_count[key] < math.floor(share[key]):
            return True
        return side_val < side_target and val_count[key] < ceiling[key]

    decided: dict[str, str] = {}
    while open_groups := [key for key in groups if waiting[key] and takes_val(key)]:
        key = max(open_groups, key=lambda k: (share[k] - val_count[k], k))
        decided[waiting[key].pop()] = VAL
        val_count[key] += 1
        side_val += 1
    for ids in waiting.values():
        decided.update(dict.fromkeys(ids, TRAIN))
    return decided


def _val_target(size: int, val_fraction: float) -> int:
    """Val episodes a side should have: its share rounded, and one in each set from 2 up."""
    target = math.floor(round(val_fraction * size, 9) + 0.5)
    return min(max(target, 1), size - 1) if size >= 2 else target


def _stable_rank(episode_id: str) -> tuple[int, str]:
    # Python's hash() is salted per process; xxh3 gives the same order on every run.
    return xxhash.xxh3_64_intdigest(episode_id.encode()), episode_id


def split_from_store(
    store: WindowStore, previous: Split | Mapping | None = None, val_fraction: float = 0.2
) -> Split:
    """Split the store's episodes; quarantined ones are never among them, and go in `excluded`."""
    entries = [EpisodeEntry.from_attrs(i, store.episode_attrs(i)) for i in store.episode_ids()]
    excluded = {
        episode_id: (store.quarantine_record(episode_id) or {}).get("reason", UNKNOWN)
        for episode_id in store.quarantined_ids()
    }
    return replace(assign_split(entries, previous, val_fraction), excluded=excluded)


def train_action_stats(store: WindowStore, split: Split) -> ActionStats:
    """Action statistics of the training episodes only, so val never leaks into normalisation."""
    return store.action_stats(split.train)


def split_location(store: WindowStore) -> str:
    return f"{store.location}/{SPLIT_FILE}"


def load_split(store: WindowStore) -> Split | None:
    """The split last saved in the store, the `previous` of the next one."""
    text = store.read_text(SPLIT_FILE)
    return Split.from_dict(json.loads(text)) if text is not None else None


def save_split(store: WindowStore, split: Split) -> None:
    """Atomically: a reader sees the old split or the new one, also with two savers at once."""
    store.write_text(SPLIT_FILE, json.dumps(split.to_dict(), indent=1))
