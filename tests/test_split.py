"""Train/val split: by episode, deterministic, stable as episodes arrive, stratified."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from collections import defaultdict

import numpy as np
import pytest
import xxhash

from vla_pipeline.training.split import (
    EpisodeEntry,
    Split,
    assign_split,
    split_from_store,
    train_action_stats,
)
from vla_pipeline.data.stats import ActionStats
from vla_pipeline.data.store import WindowStore

SCENARIOS = [
    "1box_hori_left_core_medium",
    "basket_1box_hori_left_variant_far",
    "2box_vert_left_core_close",
    "1box_hori_right_core_medium",
    "2box_vert_right_variant_far",
    "basket_2box_hori_right_core_close",
]


def make_entries(count: int, start: int = 0, seed: int = 0) -> list[EpisodeEntry]:
    """Mostly scenario-named episodes, a few with only a side, a few with neither."""
    rng = random.Random(seed)
    entries = []
    for number in range(start, start + count):
        kind = rng.random()
        if kind < 0.1:
            entries.append(EpisodeEntry(f"ep{number:04d}", None, None))
        elif kind < 0.2:
            entries.append(EpisodeEntry(f"ep{number:04d}", rng.choice(["left", "right"]), None))
        else:
            scenario = rng.choice(SCENARIOS)
            side = "left" if "_left_" in scenario else "right"
            entries.append(EpisodeEntry(f"ep{number:04d}", side, scenario))
    return entries


def val_count(split: Split, entries) -> int:
    val = set(split.val)
    return sum(entry.episode_id in val for entry in entries)


def strata(entries, min_size: int) -> dict:
    """Sides, and scenario groups with at least `min_size` episodes."""
    groups = defaultdict(list)
    for entry in entries:
        groups[("side", entry.side)].append(entry)
        if entry.scenario_group:
            groups[("scenario", entry.scenario_group)].append(entry)
    return {key: members for key, members in groups.items() if key[0] == "side" or len(members) >= min_size}


def test_split_is_by_episode_and_covers_all():
    entries = make_entries(40)
    split = assign_split(entries)
    assert not set(split.train) & set(split.val)
    assert set(split.train) | set(split.val) == {entry.episode_id for entry in entries}
    assert split.train == sorted(split.train) and split.val == sorted(split.val)
    assert len(split.val) == pytest.approx(0.2 * len(entries), abs=2)


@pytest.mark.parametrize("order_seed", [1, 2, 3])
def test_earlier_assignments_never_move_as_episodes_arrive(order_seed):
    rng = random.Random(order_seed)
    entries = make_entries(20)
    split = assign_split(entries)
    for batch in range(3):
        entries = entries + make_entries(15, start=100 * (batch + 1), seed=batch + order_seed)
        rng.shuffle(entries)
        before = split.assignments()
        # The previous split arrives as it was persisted: through JSON.
        split = assign_split(entries, json.loads(json.dumps(split.to_dict())))
        after = split.assignments()
        assert {episode_id: after[episode_id] for episode_id in before} == before
        assert set(after) == {entry.episode_id for entry in entries}

    for key, members in strata(entries, min_size=5).items():
        assert abs(val_count(split, members) - 0.2 * len(members)) <= 1, key


def test_same_episodes_in_any_order_give_the_same_split():
    entries = make_entries(50)
    previous = assign_split(entries[:30])
    expected = assign_split(entries, previous).to_dict()
    for seed in range(5):
        shuffled = entries[:]
        random.Random(seed).shuffle(shuffled)
        assert assign_split(shuffled, previous).to_dict() == expected


def test_split_does_not_depend_on_python_hash_seed():
    script = (
        "from vla_pipeline.training.split import EpisodeEntry, assign_split;"
        "print(assign_split([EpisodeEntry(f'ep{i}', 'left', None) for i in range(30)]).val)"
    )
    runs = [
        subprocess.Popen(
            [sys.executable, "-c", script],
            env={**os.environ, "PYTHONHASHSEED": hash_seed},
            stdout=subprocess.PIPE,
            text=True,
        )
        for hash_seed in ("1", "2")
    ]
    outputs = {run.communicate(timeout=60)[0] for run in runs}
    assert all(run.returncode == 0 for run in runs)
    assert len(outputs) == 1


def test_both_sides_in_both_sets():
    entries = [EpisodeEntry(f"L{i}", "left", None) for i in range(2)]
    entries += [EpisodeEntry(f"R{i}", "right", None) for i in range(9)]
    entries += [EpisodeEntry(f"U{i}", None, None) for i in range(2)]
    split = assign_split(entries)
    for prefix in "LRU":
        members = [entry for entry in entries if entry.episode_id.startswith(prefix)]
        assert 0 < val_count(split, members) < len(members), prefix


def test_sides_are_strata_even_when_hash_order_favours_one():
    ids = sorted((f"ep{i}" for i in range(16)), key=lambda i: xxhash.xxh3_64_intdigest(i.encode()))
    left = [EpisodeEntry(i, "left", None) for i in ids[:8]]
    right = [EpisodeEntry(i, "right", None) for i in ids[8:]]
    split = assign_split(left + right)
    assert (val_count(split, left), val_count(split, right)) == (2, 2)


def test_scenario_groups_are_stratified_when_large_enough():
    # The 10 ids that come first in hash order all belong to one scenario group, so a split
    # by side alone would put all of the side's 4 val episodes in that group.
    ids = sorted((f"ep{i}" for i in range(20)), key=lambda i: xxhash.xxh3_64_intdigest(i.encode()))
    first = [EpisodeEntry(i, "left", "1box_hori_left_core_medium") for i in ids[:10]]
    second = [EpisodeEntry(i, "left", "2box_vert_left_variant_far") for i in ids[10:]]
    split = assign_split(first + second)
    assert (val_count(split, first), val_count(split, second)) == (2, 2)
    # Below ~1/val_fraction episodes a scenario is no stratum of its own.
    split = assign_split(first + second, min_stratum_for_scenario=11)
    assert (val_count(split, first), val_count(split, second)) == (4, 0)


def test_new_scenario_stratum_gets_a_val_episode_even_past_its_sides_share():
    small = [EpisodeEntry(f"a{i}", "left", "1box_hori_left_core_far") for i in range(4)]
    large = [EpisodeEntry(f"b{i}", "left", "2box_vert_left_core_far") for i in range(10)]
    # The side already holds its 3 val episodes (0.2 of 15), all from the large group.
    train = [entry.episode_id for entry in small + large[3:]]
    previous = Split(train=train, val=["b0", "b1", "b2"], val_fraction=0.2)
    newcomer = EpisodeEntry("a4", "left", "1box_hori_left_variant_close")
    split = assign_split(small + large + [newcomer], previous)
    assert "a4" in split.val


def test_scenario_group_ignores_pattern_distance_and_basket():
    groups = {
        EpisodeEntry("a", "left", name).scenario_group
        for name in ("1box_hori_left_core_medium", "basket_1box_hori_left_variant_far")
    }
    assert groups == {"1box_hori_left"}
    assert EpisodeEntry("b", "right", None).scenario_group is None


def test_removed_episodes_drop_out_without_moving_others():
    entries = make_entries(30)
    split = assign_split(entries)
    removed = set(split.val[:2] + split.train[:3])
    kept = [entry for entry in entries if entry.episode_id not in removed]
    again = assign_split(kept, split)
    assert again.train == [i for i in split.train if i not in removed]
    assert again.val == [i for i in split.val if i not in removed]


@pytest.mark.parametrize("fraction", [0, 1, -0.2, 1.5])
def test_val_fraction_must_be_between_0_and_1(fraction):
    with pytest.raises(ValueError, match="val_fraction must be strictly between 0 and 1"):
        assign_split(make_entries(5), val_fraction=fraction)


def test_other_val_fractions():
    entries = make_entries(60)
    split = assign_split(entries, val_fraction=0.5)
    assert len(split.val) == pytest.approx(30, abs=2)
    assert split.val_fraction == 0.5


def test_split_round_trips_and_rejects_overlap():
    split = assign_split(make_entries(12))
    assert Split.from_dict(json.loads(json.dumps(split.to_dict()))) == split
    with pytest.raises(ValueError, match="both train and val"):
        Split.from_dict({"train": ["a", "b"], "val": ["b"], "val_fraction": 0.2})
    with pytest.raises(ValueError, match="duplicate"):
        assign_split([EpisodeEntry("a", "left", None)] * 2)


# --- through the store ---------------------------------------------------------------


def write_fake_episode(store: WindowStore, episode_id: str, side, scenario, frames: int, seed: int):
    actions = np.random.default_rng(seed).choice([-1.15, 0.0, 1.15], size=(frames, 2)).astype(np.float32)
    starts = list(range(frames - 4))
    store.write_episode(
        episode_id,
        images=np.zeros((frames, 8, 8, 3), np.uint8),
        actions=actions,
        event_types=["episode_start"] + ["start_action"] * (frames - 1),
        attrs={"side": side, "scenario": scenario, "num_frames": frames, "window_starts": starts},
    )
    return actions


def test_split_from_store(tmp_path):
    store = WindowStore(tmp_path / "store.zarr").create(224)
    actions = {}
    for number in range(12):
        scenario = SCENARIOS[number % len(SCENARIOS)]
        side = "left" if "_left_" in scenario else "right"
        episode_id = f"ep{number:02d}"
        actions[episode_id] = write_fake_episode(store, episode_id, side, scenario, 6 + number, number)
    write_fake_episode(store, "bad", "left", None, 6, 99)
    store.quarantine("bad", {"reason": "too short"})

    split = split_from_store(store, None, 0.25)
    assert split.excluded == {"bad": "too short"}
    assert set(split.train) | set(split.val) == set(actions)
    assert split_from_store(store, split.to_dict(), 0.25) == split

    attrs = {episode_id: store.episode_attrs(episode_id) for episode_id in store.episode_ids()}
    summary = split.summary(attrs)
    for name, ids in (("train", split.train), ("val", split.val)):
        assert summary[name]["episodes"] == len(ids)
        assert summary[name]["frames"] == sum(len(actions[i]) for i in ids)
        assert summary[name]["windows"] == sum(len(actions[i]) - 4 for i in ids)
        sides = {"left": 0, "right": 0}
        for i in ids:
            sides[attrs[i]["side"]] += 1
        assert summary[name]["sides"] == {side: n for side, n in sides.items() if n}
        assert sum(summary[name]["scenarios"].values()) == len(ids)
        assert set(summary[name]["scenarios"]) == {attrs[i]["scenario"] for i in ids}
    assert summary["val"]["sides"] == {"left": 2, "right": 2}  # 0.25 of 6 per side, rounded

    stats = train_action_stats(store, split)
    expected = ActionStats.of(np.concatenate([actions[i] for i in split.train]))
    assert stats.count == expected.count
    for field in ("mean", "var", "min", "max"):
        np.testing.assert_allclose(getattr(stats, field), getattr(expected, field), rtol=1e-9, atol=1e-12)
    # The val episodes are left out.
    everything = ActionStats.of(np.concatenate(list(actions.values())))
    assert stats.count < everything.count and math.isfinite(float(stats.mean[0]))
