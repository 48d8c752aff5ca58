"""Closed-loop rollouts: drivers steering the BoxNav env over an evaluation plan, scored.

With envs > 1 the environments step in worker processes through gymnasium's AsyncVectorEnv;
the drivers always run here, in the calling process. Autoreset is off: when a rollout ends,
its sub-env alone is reset (reset_mask) with the plan's next seed, and its scenario reaches it
in the reset's options as {seed: scenario} (a vector reset hands the same options to every
sub-env; each takes its own seed's). Every rollout is fixed by its seed and scenario, so the
results do not depend on `envs`.

A driver that returns a bad action (not finite, out of range) fails its own rollout: that is
the policy's choice. An error of the machine (out of memory, a device error) fails the whole
run at once, and so does the same exception raised in more than half of the plan's rollouts:
a fault of the code, not of the policy (`RolloutsFailed`).
"""
from __future__ import annotations

import multiprocessing
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Callable

import gymnasium
import numpy as np
from gymnasium.vector import AsyncVectorEnv, AutoresetMode, SyncVectorEnv

from ..data.schema import INSTRUCTION_TEMPLATE
from .blind_search import BestBlind
from .controllers import AlwaysForward, BlindSideScript, Controller, ScriptedGuide
from .env import ENV_ID, OUTCOMES, action_problem

# The drivers that need no model, from the ceiling to the floor: the operator's own driving (it
# knows the scene), the best open-loop key sequence that depends only on the instruction (found by
# search: the ceiling of every driver that ignores the camera), a naive side-aware script, and W.
BASELINES = {"scripted_guide": ScriptedGuide, "best_blind": BestBlind, "blind_side_script": BlindSideScript,
             "always_forward": AlwaysForward}

SIDES, DISTANCES, BOX_COUNTS, LAYOUTS = ("left", "right"), ("close", "medium", "far"), ("1box", "2box"), ("hori", "vert")
CELLS = [(side, distance, boxes) for side in SIDES for distance in DISTANCES for boxes in BOX_COUNTS]
# Never plain fork: OpenCV's thread pool deadlocks in forked children.
START_METHOD = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
# Every way a rollout ends, each reported as its own rate: the env's outcomes, and an exception
# raised by the driver.
ROLLOUT_OUTCOMES = (*OUTCOMES, "controller_error")
# Errors of the machine, not of the policy, known by name (this stage imports no torch) or message.
MACHINE_ERRORS = {"MemoryError", "OutOfMemoryError", "AcceleratorError"}
MACHINE_MESSAGES = ("out of memory", "CUDA error", "device-side assert", "CUBLAS_STATUS", "cuDNN error")


class RolloutsFailed(RuntimeError):
    """The rollouts cannot say how the policy drives: the machine failed, or the driver's code
    raised the same error in more than half of them."""


def machine_error(error: BaseException) -> bool:
    names = {cls.__name__ for cls in type(error).__mro__}
    return bool(names & MACHINE_ERRORS) or any(text in str(error) for text in MACHINE_MESSAGES)


@dataclass
class RolloutResult:
    index: int  # position in the plan
    seed: int
    scenario: str
    side: str
    distance: str
    boxes: str
    target: str
    outcome: str  # one of ROLLOUT_OUTCOMES
    reason: str | None
    presses: int
    path: list[tuple[float, float]]  # the start pose, then the pose after each press
    path_length: float  # metres travelled
    shortest_path: float  # metres from the start into the success circle on the instructed side
    spl: float  # success weighted by path length: shortest / max(travelled, shortest), 0 on failure
    obstacles: list[tuple[float, float, float, float]]  # (x0, x1, y0, y1) per box, for plotting
    target_xy: tuple[float, float]
    success_radius: float
    frames: list[np.ndarray] | None = field(default=None, repr=False)  # BGR, with keep_frames

    @property
    def cell(self) -> str:
        return f"{self.side}/{self.distance}/{self.boxes}"

    def to_dict(self) -> dict:
        """Everything but the frames, as JSON types."""
        record = asdict(self)
        del record["frames"]
        record["path"] = [list(pose) for pose in self.path]
        record["obstacles"] = [list(rect) for rect in self.obstacles]
        record["target_xy"] = list(self.target_xy)
        return record


def plan(episodes: int, seed: int) -> list[tuple[int, str]]:
    """(env seed, scenario token) per rollout: each run of 12 covers every side × distance × boxes
    cell once, in a seeded order; layouts (hori, vert) and targets (cup, basket) alternate."""
    rng = np.random.default_rng(seed)
    items, seeds = [], set()
    while len(items) < episodes:
        for cell in rng.permutation(len(CELLS))[: episodes - len(items)]:
            side, distance, boxes = CELLS[cell]
            i = len(items)
            token = f"{boxes}_{LAYOUTS[i % 2]}_{side}_core_{distance}"
            env_seed = int(rng.integers(0, 2**31 - 1))
            while env_seed in seeds:  # each seed names one rollout's scenario in a vector reset
                env_seed = int(rng.integers(0, 2**31 - 1))
            seeds.add(env_seed)
            items.append((env_seed, f"basket_{token}" if i // 2 % 2 else token))
    return items


def _make_env(env_id: str, env_kwargs: dict):
    # Module level, so a worker unpickles it by name: importing this module registers the env.
    limit = {"max_episode_steps": env_kwargs["max_presses"]} if env_kwargs.get("max_presses") else {}
    return gymnasium.make(env_id, **limit, **env_kwargs)


def open_envs(envs: int, env_kwargs: dict | None = None, env_id: str = ENV_ID) -> gymnasium.vector.VectorEnv:
    """`envs` BoxNav envs without autoreset: in this process for 1, in worker processes beyond."""
    factories = [partial(_make_env, env_id, dict(env_kwargs or {})) for _ in range(envs)]
    if envs == 1:
        return SyncVectorEnv(factories, autoreset_mode=AutoresetMode.DISABLED)
    # shared_memory=False: gymnasium 1.4 reads a Text observation out of shared memory once, when the
    # vector env is built, so every instruction would come back as that first all-zero string.
    return AsyncVectorEnv(factories, context=START_METHOD, autoreset_mode=AutoresetMode.DISABLED,
                          shared_memory=False)


def _slot_info(infos: dict, slot: int) -> dict:
    """One sub-env's info out of the vector env's batched infos, as plain Python values."""
    return {key: value[slot].item() if isinstance(value[slot], np.generic) else value[slot]
            for key, value in infos.items() if not key.startswith("_") and infos[f"_{key}"][slot]}


@dataclass
class _Rollout:
    index: int
    seed: int
    controller: Controller
    info: dict
    frames: list[np.ndarray] | None

    def result(self, outcome: str, reason: str | None) -> RolloutResult:
        info = self.info
        success = outcome == "success"
        shortest, travelled = info["shortest_path"], info["path_length"]
        return RolloutResult(
            index=self.index, seed=self.seed, scenario=info["scenario"], side=info["side"],
            distance=info["distance"], boxes=info["boxes"], target=info["target"], outcome=outcome,
            reason=reason, presses=info["presses"], path=list(info["path"]), path_length=travelled,
            shortest_path=shortest, spl=shortest / max(travelled, shortest) if success else 0.0,
            obstacles=list(info["obstacles"]), target_xy=info["target_xy"],
            success_radius=info["success_radius"], frames=self.frames)


def _raised(rollout: _Rollout, call: str, error: Exception) -> str:
    """The reason of a rollout whose driver raised; RolloutsFailed where the machine failed."""
    reason = f"{call} raised {type(error).__name__}: {error}"
    if machine_error(error):
        raise RolloutsFailed(f"rollout {rollout.index + 1} ({rollout.info['scenario']}): {reason}: the machine "
                             "failed, not the policy; nothing is scored") from error
    return reason


def _next_action(rollout: _Rollout, image: np.ndarray, instruction: str) -> tuple[np.ndarray | None, str, str]:
    """The controller's action, or None with the outcome and reason that end its rollout."""
    try:
        returned = rollout.controller.act(image, instruction)
    except Exception as error:  # a broken controller ends its rollout, not the run (but see _raised)
        return None, "controller_error", _raised(rollout, "act()", error)
    try:
        action = np.asarray(returned, dtype=np.float64)
    except (TypeError, ValueError):
        return None, "invalid_action", f"act() returned {type(returned).__name__}, not numbers"
    problem = action_problem(action)
    return (None, "invalid_action", problem) if problem else (action, "", "")


def _start(vector_env, free: list[int], pending: deque, live: list, make_controller, keep_frames: bool,
           finish: Callable[[int, str, str], None]) -> dict:
    """Reset the `free` sub-envs with the plan's next rollouts and give each a fresh controller."""
    mask, seeds, scenarios, starting = np.zeros(len(live), dtype=bool), [None] * len(live), {}, {}
    for slot in free:
        index, (seed, scenario) = pending.popleft()
        mask[slot], seeds[slot], scenarios[seed] = True, seed, scenario
        starting[slot] = (index, seed)
    observations, infos = vector_env.reset(seed=seeds, options={"reset_mask": mask, "scenario": scenarios})
    for slot, (index, seed) in starting.items():
        image, instruction = observations["image"][slot], observations["instruction"][slot]
        live[slot] = _Rollout(index, seed, make_controller(), _slot_info(infos, slot),
                              [image.copy()] if keep_frames else None)
        try:
            live[slot].controller.reset(instruction, dict(live[slot].info))
        except Exception as error:  # as in act(): the rollout fails, the run goes on
            finish(slot, "controller_error", _raised(live[slot], "reset()", error))
    return observations


def run_rollouts(make_controller: Callable[[], Controller], plan: list[tuple[int, str]], envs: int = 1,
                 env_kwargs: dict | None = None, keep_frames: bool = False,
                 on_result: Callable[[RolloutResult], None] | None = None,
                 env_id: str = ENV_ID) -> list[RolloutResult]:
    """Drive one controller from `make_controller()` per rollout of `plan`; results in plan order.
    Raises RolloutsFailed where the machine fails or more than half the plan fails the same way."""
    if envs < 1:
        raise ValueError(f"envs={envs}: expected at least 1")
    if not plan:
        return []
    pending = deque(enumerate(plan))
    envs = max(1, min(envs, len(plan)))  # a sub-env never reset could not be stepped
    live: list[_Rollout | None] = [None] * envs
    results: list[RolloutResult] = []
    raised: Counter = Counter()  # exception name -> rollouts it ended

    def finish(slot: int, outcome: str, reason: str | None) -> None:
        results.append(live[slot].result(outcome, reason))
        live[slot] = None
        if on_result is not None:
            on_result(results[-1])
        if outcome == "controller_error":
            error = reason.split(" raised ", 1)[1].split(":", 1)[0]
            raised[error] += 1
            if raised[error] > len(plan) / 2:
                raise RolloutsFailed(f"{raised[error]} of {len(plan)} rollouts failed the same way ({reason}): "
                                     "a fault of the driver's code, not the policy's choice")

    vector_env = open_envs(envs, env_kwargs, env_id)
    try:
        while pending or any(live):
            free = [slot for slot in range(envs) if live[slot] is None][: len(pending)]
            if free:
                # A masked reset returns every sub-env's observation: the others' latest ones.
                observations = _start(vector_env, free, pending, live, make_controller, keep_frames, finish)
            actions = np.zeros((envs, 2), dtype=np.float32)
            for slot, rollout in enumerate(live):
                if rollout is None:
                    continue
                action, outcome, reason = _next_action(rollout, observations["image"][slot],
                                                       observations["instruction"][slot])
                if action is None:
                    finish(slot, outcome, reason)
                else:
                    actions[slot] = action
            if not any(live):
                continue
            # Idle or just-failed sub-envs step too (a vector env steps all): with a zero action
            # a running one stays put, a finished one returns its last step unchanged.
            observations, _, terminated, truncated, infos = vector_env.step(actions)
            for slot, rollout in enumerate(live):
                if rollout is None:
                    continue
                rollout.info = _slot_info(infos, slot)
                if keep_frames:
                    rollout.frames.append(observations["image"][slot].copy())
                if terminated[slot] or truncated[slot]:
                    finish(slot, rollout.info["outcome"], rollout.info["reason"])
    finally:
        vector_env.close()
    return sorted(results, key=lambda result: result.index)


def summarise(results: list[RolloutResult]) -> dict:
    """Rates over all rollouts and per side/distance/boxes cell."""
    cells: dict[str, list[RolloutResult]] = {}
    for result in results:
        cells.setdefault(result.cell, []).append(result)
    return {**_rates(results), "per_cell": {cell: _rates(rs) for cell, rs in sorted(cells.items())}}


def _rates(results: list[RolloutResult]) -> dict:
    """The success rate, SPL and the rate of every other way a rollout ends, each on its own."""
    count = max(len(results), 1)
    outcomes = Counter(result.outcome for result in results)
    return {"rollouts": len(results), "success_rate": outcomes["success"] / count,
            "spl": sum(result.spl for result in results) / count,
            **{f"{outcome}_rate": outcomes[outcome] / count for outcome in ROLLOUT_OUTCOMES[1:]}}


def run_baselines(plan: list[tuple[int, str]], envs: int = 1, env_kwargs: dict | None = None,
                  on_result: Callable[[str, RolloutResult], None] | None = None,
                  env_id: str = ENV_ID) -> dict[str, list[RolloutResult]]:
    """The model-free drivers over one plan (BASELINES): the ceiling, image-blind, and the floor. None of them
    looks at the image, so their envs render no frame: the outcomes are the same, in a fraction of
    the time. `on_result(name, result)` hears of each rollout as it ends."""
    return {name: run_rollouts(driver, plan, envs=envs, env_id=env_id,
                               env_kwargs={**(env_kwargs or {}), "camera": getattr(driver, "needs_image", True)},
                               on_result=None if on_result is None else partial(on_result, name))
            for name, driver in BASELINES.items()}


def guide_camera_frames(frames: int, seed: int = 0, env_kwargs: dict | None = None,
                        env_id: str = ENV_ID) -> list[tuple[list[np.ndarray], str]]:
    """At least `frames` camera frames (BGR) of the scripted guide's rollouts over `plan(.., seed)`, as
    (one rollout's frames, its instruction) pairs: real-looking input for comparing two ways of
    running a policy."""
    rollouts: list[tuple[list[np.ndarray], str]] = []
    scenes = plan(max(1, frames // 10 + 1), seed)
    for result in run_rollouts(ScriptedGuide, scenes, env_kwargs={**(env_kwargs or {}), "camera": True},
                               keep_frames=True, env_id=env_id):
        if sum(len(shown) for shown, _ in rollouts) >= frames:
            break
        side, target = result.side, result.target
        rollouts.append((result.frames, INSTRUCTION_TEMPLATE.format(side=side, target=target)))
    return rollouts
