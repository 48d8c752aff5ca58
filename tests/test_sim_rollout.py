"""Closed-loop rollouts: the evaluation plan, the model-free baselines, broken drivers, vector envs."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from vla_pipeline.sim.controllers import BlindSideScript, ScriptedGuide, key_action
from vla_pipeline.sim.operator import CORE_PRESSES, guide_keys
from vla_pipeline.sim.rollout import (CELLS, ROLLOUT_OUTCOMES, RolloutsFailed, plan, run_baselines, run_rollouts,
                                      summarise)

SMALL = {"height": 90, "width": 160}


@pytest.fixture(scope="module")
def baselines():
    return run_baselines(plan(12, 0), envs=1, env_kwargs=SMALL)


def test_the_plan_covers_every_cell_evenly_and_is_fixed_by_its_seed():
    items = plan(24, 0)
    assert items == plan(24, 0) and items != plan(24, 1)
    cells = Counter(tuple(token.split("_")[i] for i in (-3, -1, -5)) for _, token in items)
    assert set(cells) == set(CELLS) and set(cells.values()) == {2}
    assert Counter(token.split("_")[-4] for _, token in items) == {"hori": 12, "vert": 12}
    assert Counter(token.startswith("basket_") for _, token in items) == {True: 12, False: 12}
    assert len({seed for seed, _ in items}) == 24
    assert len(plan(5, 0)) == 5 and plan(5, 0) == items[:5]


def test_the_scripted_guide_succeeds_in_every_cell(baselines):
    results = baselines["scripted_guide"]
    assert [r.outcome for r in results] == ["success"] * 12, [r.reason for r in results]
    assert {r.cell for r in results} == {f"{s}/{d}/{b}" for s, d, b in CELLS}
    assert all(0 < r.spl <= 1 and r.shortest_path < r.path_length for r in results)
    summary = summarise(results)
    assert summary["success_rate"] == 1.0 and summary["collision_rate"] == 0.0
    assert len(summary["per_cell"]) == 12 and summary["spl"] == pytest.approx(np.mean([r.spl for r in results]))


def test_always_forward_collides_everywhere(baselines):
    results = baselines["always_forward"]
    assert {r.outcome for r in results} == {"collision"}
    assert all(r.spl == 0.0 for r in results)
    assert summarise(results)["collision_rate"] == 1.0


def test_the_blind_script_succeeds_only_at_the_distance_it_assumes(baselines):
    for result in baselines["blind_side_script"]:
        assert (result.outcome == "success") == (result.distance == "medium"), result
        assert result.spl > 0 if result.outcome == "success" else result.spl == 0.0


def test_results_are_json_records(baselines):
    record = json.loads(json.dumps(baselines["scripted_guide"][0].to_dict()))
    assert record["outcome"] == "success" and len(record["path"]) == CORE_PRESSES + 1
    assert {"obstacles", "target_xy", "shortest_path", "spl", "seed", "scenario"} <= set(record)


class MirroredGuide(ScriptedGuide):
    """The guide for the other side: right where the instruction says left."""

    def keys_for(self, instruction, info):
        other = "right" if info["side"] == "left" else "left"
        return guide_keys(other, info["distance"], "core", CORE_PRESSES)


def test_a_guide_round_the_other_side_is_wrong_side():
    results = run_rollouts(MirroredGuide, plan(4, 2), env_kwargs=SMALL)
    assert {r.outcome for r in results} == {"wrong_side"}
    assert summarise(results)["wrong_side_rate"] == 1.0


class Broken:
    """Drives two good presses, then does what `failure` says."""

    def __init__(self, failure: str):
        self.failure, self.presses = failure, 0

    def reset(self, instruction, info):
        if self.failure == "reset":
            raise RuntimeError("no model loaded")
        self.presses = 0

    def act(self, image_bgr, instruction):
        self.presses += 1
        if self.presses <= 2:
            return key_action(" ")
        return {"raise": lambda: 1 / 0, "nan": lambda: np.array([np.nan, 0.0]),
                "shape": lambda: np.zeros(3), "range": lambda: np.array([0.0, 9.0]),
                "text": lambda: "forward"}[self.failure]()


@pytest.mark.parametrize("failure, outcome, reason", [
    ("raise", "controller_error", "ZeroDivisionError"), ("reset", "controller_error", "no model loaded"),
    ("nan", "invalid_action", "not finite"), ("shape", "invalid_action", "shape (3,)"),
    ("range", "invalid_action", "outside"), ("text", "invalid_action", "not numbers")])
def test_a_broken_controller_fails_its_rollouts_not_the_run(failure, outcome, reason):
    drivers = iter([Broken(failure), ScriptedGuide(), Broken(failure), ScriptedGuide()])
    results = run_rollouts(lambda: next(drivers), plan(4, 0), env_kwargs=SMALL)
    assert [r.outcome for r in results] == [outcome, "success"] * 2
    assert all(reason in r.reason for r in results[::2])
    assert summarise(results)[f"{outcome}_rate"] == 0.5
    assert [r.presses for r in results[::2]] == [0 if failure == "reset" else 2] * 2


@pytest.mark.parametrize("failure", ["nan", "range"])
def test_bad_actions_in_every_rollout_are_the_policys_and_fail_only_their_rollouts(failure):
    results = run_rollouts(lambda: Broken(failure), plan(3, 0), env_kwargs=SMALL)
    assert summarise(results)["invalid_action_rate"] == 1.0


@pytest.mark.parametrize("failure", ["raise", "reset"])
def test_the_same_exception_in_more_than_half_the_rollouts_fails_the_run(failure):
    drivers = iter([Broken(failure), ScriptedGuide(), Broken(failure), Broken(failure)])
    with pytest.raises(RolloutsFailed, match=r"3 of 4 rollouts failed the same way .*not the policy's choice"):
        run_rollouts(lambda: next(drivers), plan(4, 0), env_kwargs=SMALL)


class OutOfMemoryError(RuntimeError):
    """Named as torch.OutOfMemoryError is (this test imports no torch)."""


@pytest.mark.parametrize("error", [OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                                   RuntimeError("CUDA error: an illegal memory access was encountered"),
                                   MemoryError()])
def test_an_error_of_the_machine_fails_the_run_at_once(error):
    class Failing(ScriptedGuide):
        def act(self, image_bgr, instruction):
            raise error

    drivers = iter([ScriptedGuide(), Failing()] + [ScriptedGuide()] * 10)
    seen = []
    with pytest.raises(RolloutsFailed, match=r"rollout 2 .*the machine failed") as raised:
        run_rollouts(lambda: next(drivers), plan(12, 0), env_kwargs=SMALL, on_result=seen.append)
    assert raised.value.__cause__ is error and [r.outcome for r in seen] == ["success"]


class Stays(ScriptedGuide):
    def keys_for(self, instruction, info):
        return " " * 40


class StrafesAway(ScriptedGuide):
    def keys_for(self, instruction, info):
        return "a" * 40


def test_every_outcome_has_its_own_rate():
    results = (run_rollouts(Stays, plan(2, 0), env_kwargs={**SMALL, "max_presses": 8})
               + run_rollouts(StrafesAway, plan(2, 0), env_kwargs=SMALL))
    assert [r.outcome for r in results] == ["timeout"] * 2 + ["lost"] * 2
    rates = summarise(results)
    assert rates["timeout_rate"] == rates["lost_rate"] == 0.5
    assert set(rates) == {"rollouts", "success_rate", "spl", "per_cell",
                          *(f"{outcome}_rate" for outcome in ROLLOUT_OUTCOMES[1:])}


@pytest.mark.timeout(120)
def test_vector_envs_give_the_serial_results():
    """Rollouts of different lengths end at different times, so sub-envs are refilled out of step."""
    rollouts = plan(7, 5)
    serial = run_rollouts(BlindSideScript, rollouts, envs=1, env_kwargs=SMALL, keep_frames=True)
    finished = []
    parallel = run_rollouts(BlindSideScript, rollouts, envs=2, env_kwargs=SMALL, keep_frames=True,
                            on_result=lambda result: finished.append(result.index))
    assert len({r.presses for r in serial}) > 1  # the refill really happens out of step
    assert [r.to_dict() for r in parallel] == [r.to_dict() for r in serial]
    for a, b in zip(serial, parallel):
        assert len(a.frames) == a.presses + 1 and all(np.array_equal(x, y) for x, y in zip(a.frames, b.frames))
    assert sorted(finished) == list(range(7))


def test_the_baselines_drive_the_same_with_the_camera_off(baselines):
    """run_baselines renders no frame (the drivers never look); a rendered run ends the same."""
    rendered = run_rollouts(ScriptedGuide, plan(12, 0), envs=1, env_kwargs={**SMALL, "camera": True}, keep_frames=True)
    assert [r.to_dict() for r in rendered] == [r.to_dict() for r in baselines["scripted_guide"]]
    assert rendered[0].frames[1].any()  # the rendered run did draw
    dark = run_rollouts(ScriptedGuide, plan(2, 0), envs=1, env_kwargs={**SMALL, "camera": False}, keep_frames=True)
    assert not any(frame.any() for frame in dark[0].frames)
