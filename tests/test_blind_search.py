"""The best blind driver, found by search: the fast evaluator against the env's own rollouts, v0
solved without looking, v1 not, and the BestBlind driver."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from vla_pipeline.sim import blind_search
from vla_pipeline.sim.blind_search import (ALONGSIDE_PRESSES, FINAL_PRESSES, OUT_PRESSES, SEARCH_SEED, BestBlind,
                                           Candidate, best_blind, best_of, families, left_to_side, outcomes,
                                           scenes_of, score_families)
from vla_pipeline.sim.controllers import KeyScript
from vla_pipeline.sim.env import ENV_ID, SIGHT_ENV_ID
from vla_pipeline.sim.rollout import plan, run_rollouts

BLIND = {"camera": False}
SMALL_BLIND = {"camera": False, "height": 90, "width": 160}
EVALUATION = plan(48, 11)
# Beyond the families, sequences that end every other way: straight on (collision), too far out (lost),
# round the wrong side, dithering (timeout), a stop press mid-way, backward keys.
ODD_KEYS = ["", "aaaaaa", "wwwdddwwww", "ad" * 20, "awwwwwwww wwww", "szcwwq", "qqqwwwwwwwwwwwwww"]


def played(keys: str):
    """A KeyScript class that plays `keys` (left-side form) mirrored for the instruction's side."""

    class Played(KeyScript):
        def keys_for(self, instruction: str, info: dict) -> str:
            return left_to_side(keys, info["side"])

    return Played


def sample_sequences(world: str, count: int) -> list[str]:
    searched = [candidate.keys for candidate in families(world)]
    picks = np.random.default_rng(7).choice(len(searched), count, replace=False)
    return [best_blind(world).keys] + [searched[i] for i in picks] + ODD_KEYS


@pytest.mark.parametrize("world", [ENV_ID, SIGHT_ENV_ID])
def test_the_fast_evaluator_gives_the_env_rollouts_outcomes(world):
    scenes = plan(12, 5)
    sequences = sample_sequences(world, 12)
    fast = outcomes(scenes_of(world, scenes), sequences)
    assert fast.shape == (len(scenes), len(sequences))
    for column, keys in enumerate(sequences):
        results = run_rollouts(played(keys), scenes, env_kwargs=BLIND, env_id=world)
        assert [r.outcome for r in results] == list(fast[:, column]), keys
    seen = Counter(fast.ravel())
    assert {"success", "collision", "lost", "wrong_side", "timeout"} <= set(seen), seen
    assert world == ENV_ID or seen["stopped_away"] > 0


def test_a_sequence_is_scored_in_every_scene_of_its_plan_mirrored_for_the_right():
    scenes = scenes_of(SIGHT_ENV_ID, plan(24, 3))
    keys = best_blind(SIGHT_ENV_ID).keys
    mirrored = outcomes(scenes, [keys, left_to_side(keys, "right")])
    right = scenes.right
    assert right.any() and (~right).any()
    # Played as written in a right-side scene, the mirrored form goes round the wrong side.
    assert set(mirrored[right, 1]) <= {"wrong_side", "collision", "lost", "stopped_away"}
    assert (mirrored[:, 0] == "success").sum() > 0


def test_the_families_span_ranges_that_hold_the_optimum_inside():
    for world in (ENV_ID, SIGHT_ENV_ID):
        searched = families(world)
        assert len({c.keys for c in searched}) == len(searched)
        assert {c.family for c in searched} == {name for name, _, _ in blind_search.FAMILIES}
        best = dict(best_blind(world).params)
        assert best["n"] not in (OUT_PRESSES[0], OUT_PRESSES[-1])
        assert best["m"] not in (ALONGSIDE_PRESSES[0], ALONGSIDE_PRESSES[-1])
        assert world == ENV_ID or best["f"] not in (FINAL_PRESSES[0], FINAL_PRESSES[-1])
    assert all(c.keys.endswith(" ") and c.keys.count(" ") == 1 for c in families(SIGHT_ENV_ID))
    assert not any(" " in c.keys or c.keys.endswith("w") for c in families(ENV_ID))


def test_v0_is_solved_without_looking():
    best = best_blind(ENV_ID)
    assert best.world == ENV_ID and best.seed == SEARCH_SEED not in (0, 11)
    assert best.success >= 0.9 and best.searched > 1000
    scores = score_families(ENV_ID, EVALUATION)
    by_keys = {candidate.keys: rate for candidate, rate in scores.items()}
    assert by_keys[best.keys] >= 0.9
    assert by_keys["aawwwwwwwdd"] == 1.0  # out 2, forward 7, back 2: known to solve v0


def test_in_v1_no_blind_sequence_of_the_families_succeeds_more_than_half_the_time():
    scores = score_families(SIGHT_ENV_ID, EVALUATION)
    best = best_of(scores)
    print(f"v1 on plan(48, 11): best blind {best.keys!r} ({best.family}, {dict(best.params)}) "
          f"{scores[best]:.3f} over {len(scores)} sequences")
    assert 0.0 < scores[best] <= 0.5
    assert scores[best] == max(scores.values())
    assert len(scores) > 10_000


def test_ties_go_to_the_shorter_sequence_then_the_earlier_one():
    a, b, c = (Candidate(keys, "strafe", ()) for keys in ("aawwdd", "aawd", "qqwe"))
    assert best_of({a: 0.5, b: 0.5, c: 0.25}) == b
    assert best_of({a: 0.5, b: 0.25, c: 0.5}) == c
    assert best_of({b: 0.5, c: 0.5}) == b


def test_best_blind_mirrors_for_the_right_and_needs_a_side():
    driver = BestBlind()
    assert BestBlind.needs_image is False
    keys = best_blind(ENV_ID).keys
    assert driver.keys_for("Navigate around the obstacle on the left side and reach the cup", {}) == keys
    right = driver.keys_for("Navigate around the obstacle on the right side and reach the cup", {"world": ENV_ID})
    assert right == keys.translate(str.maketrans("adqe", "daeq")) and right != keys
    sight = driver.keys_for("go round it on the left", {"world": SIGHT_ENV_ID})
    assert sight == best_blind(SIGHT_ENV_ID).keys and sight.endswith(" ")
    with pytest.raises(ValueError, match="names no single side"):
        driver.reset("Navigate around the obstacle and reach the cup", {})
    with pytest.raises(ValueError, match="names no single side"):
        driver.keys_for("left or right, either side", {})


def test_best_blind_in_v1_scores_what_the_fast_evaluator_predicts():
    scenes = plan(24, 11)
    results = run_rollouts(BestBlind, scenes, env_kwargs=SMALL_BLIND, env_id=SIGHT_ENV_ID)
    predicted = outcomes(scenes_of(SIGHT_ENV_ID, scenes), [best_blind(SIGHT_ENV_ID).keys])[:, 0]
    assert [r.outcome for r in results] == list(predicted)
    assert sum(r.outcome == "success" for r in results) == (predicted == "success").sum()
