"""Closed-loop evaluation: the policy drives the simulated robot (`vla_pipeline.sim`), and so do
the drivers that need no model, in the same scenes; then the policy drives again with its camera
frozen on the first frame and blanked to mid-grey (the sight ablations).

Offline scores judge one recorded frame at a time; here the policy's own mistakes put the robot
where no operator ever was. `closed_loop` runs an evaluation plan (the same seeds and scenarios
for everyone), and returns every rollout with a summary: success rate, SPL, collision, wrong-side
and timeout rates, overall and per side × distance × boxes cell.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import gymnasium
import numpy as np

from ..policy.serving import StreamingPolicy
from ..sim.env import ENV_ID, SIGHT_ENV_ID, scenario_from_token
from ..sim.report import write_video
from ..sim.rollout import RolloutResult, plan, run_baselines, run_rollouts, summarise

DEFAULT_EPISODES = 48  # 4 rollouts in each of the 12 side × distance × boxes cells
# The env's camera by name: the collector's 1280×720 frames, or small ones for quick looks.
CAMERAS: dict[str, dict] = {"720p": {"height": 720, "width": 1280}, "small": {"height": 180, "width": 320}}
# Where the store's episodes name this world as theirs (the `simulator` attribute the sample
# episodes carry), the policy can be driven in it; other episodes (the robot's) have no world.
WORLDS = (ENV_ID, SIGHT_ENV_ID)
BLANK_GREY = 128  # the blank camera's frame: mid-grey on every channel
# The sight ablations: how the policy drives when its camera tells it nothing new. Each name's
# headline metric is closed_loop_<name>_success.
ABLATIONS = ("frozen", "blank")


class PolicyDriver:
    """A StreamingPolicy as a sim controller (`reset(instruction, info)`, `act(image, instruction)`).

    The recordings hold two frames at the start pose: the `episode_start` frame, which no key press
    follows, and the first press's. The env shows the start pose once, so the driver feeds that
    first frame twice, as the policy saw it in training, and sends the second answer's first step.
    """

    needs_image = True

    def __init__(self, policy: StreamingPolicy):
        # Each driver keeps its own window (a StreamingPolicy's fork, or a new session on a policy
        # server); the network and its compiled backbone (the CUDA graphs captured once per policy,
        # not once per rollout) are shared.
        self.stream = policy.fork("BGR")
        self.started = False

    def reset(self, instruction: str, info: dict) -> None:
        self.stream.reset()
        self.started = False

    def act(self, image_bgr: np.ndarray, instruction: str) -> np.ndarray:
        if not self.started:
            self.stream.step(image_bgr, instruction)
            self.started = True
        return self.stream.step(image_bgr, instruction)[0]


class FrozenCameraDriver(PolicyDriver):
    """The policy shown its rollout's first frame at every press: what it does from the
    instruction and one look, never seeing where it went."""

    def reset(self, instruction: str, info: dict) -> None:
        super().reset(instruction, info)
        self.first: np.ndarray | None = None

    def act(self, image_bgr: np.ndarray, instruction: str) -> np.ndarray:
        if self.first is None:
            self.first = image_bgr.copy()
        return super().act(self.first, instruction)


class BlankCameraDriver(PolicyDriver):
    """The policy shown a mid-grey frame at every press: the instruction alone."""

    needs_image = False  # its env renders nothing: the frame is replaced anyway

    def act(self, image_bgr: np.ndarray, instruction: str) -> np.ndarray:
        return super().act(np.full(image_bgr.shape, BLANK_GREY, np.uint8), instruction)


ABLATION_DRIVERS = {"frozen": FrozenCameraDriver, "blank": BlankCameraDriver}


@dataclass
class ClosedLoopReport:
    env: str
    episodes: int
    seed: int
    camera: str  # a name of CAMERAS
    envs: int
    policy: list[RolloutResult]
    baselines: dict[str, list[RolloutResult]]
    videos: dict[str, Path] = field(default_factory=dict)  # "success" / "failure" → a policy rollout's video
    ablations: dict[str, list[RolloutResult]] = field(default_factory=dict)  # name of ABLATIONS → rollouts

    @property
    def summary(self) -> dict:
        """{"policy": rates, "baselines": {name: rates}, "ablations": {name: rates}}, the rates of
        `sim.rollout.summarise`."""
        return {"policy": summarise(self.policy),
                "baselines": {name: summarise(results) for name, results in self.baselines.items()},
                "ablations": {name: summarise(results) for name, results in self.ablations.items()}}

    def headline(self) -> dict[str, float]:
        """Flat numbers for MLflow and registry tags."""
        summary = self.summary
        numbers = {f"closed_loop_{key}": float(value) for key, value in summary["policy"].items()
                   if key != "per_cell"}
        for name, rates in summary["baselines"].items():
            numbers[f"closed_loop_{name}_success_rate"] = float(rates["success_rate"])
        for name, rates in summary["ablations"].items():
            numbers[f"closed_loop_{name}_success"] = float(rates["success_rate"])
        return numbers

    def conditions(self) -> dict:
        """What the rollouts ran under: env id and version, camera, environments, seed, count."""
        return {"env": self.env, "env_version": gymnasium.spec(self.env).version,
                "camera": {"name": self.camera, **CAMERAS[self.camera]}, "envs": self.envs, "seed": self.seed,
                "episodes": self.episodes}

    def record(self) -> dict:
        """closed_loop.json: the conditions, the summary and every policy rollout."""
        return {**self.conditions(), "summary": self.summary,
                "rollouts": [result.to_dict() for result in self.policy],
                "baseline_rollouts": {name: [result.to_dict() for result in results]
                                      for name, results in self.baselines.items()},
                "ablation_rollouts": {name: [result.to_dict() for result in results]
                                      for name, results in self.ablations.items()}}


def driver_rows(summary: dict) -> list[tuple[str, dict]]:
    """(driver, rates) of a `ClosedLoopReport.summary` in the order tables show them: the policy,
    the baselines, then the policy under each sight ablation ("policy, frozen camera")."""
    return [("policy", summary["policy"]), *summary["baselines"].items(),
            *((f"policy, {name} camera", rates) for name, rates in summary.get("ablations", {}).items())]


def closed_loop(policy: StreamingPolicy, episodes: int = DEFAULT_EPISODES, seed: int = 0, envs: int = 2,
                camera: str = "720p", env_id: str = ENV_ID, video_dir: Path | None = None,
                videos: str = "one_each", baselines: bool = True, log: Callable[[str], None] = print,
                on_result: Callable[[str, RolloutResult], None] | None = None,
                scenario: str | None = None, ablations: bool = True) -> ClosedLoopReport:
    """Drive `policy` over the plan of `episodes` rollouts from `seed` in `env_id`, then the baselines.

    `scenario` (a token such as 1box_hori_left_core_far) drives every rollout in that scenario,
    each with its own seed; a token that is not one, or an env that is not one of WORLDS, raises
    ValueError. `on_result(driver, result)` hears of every rollout, the baselines' and the
    ablations' too (driver "frozen" / "blank"). `ablations=False` skips the sight ablations.

    `video_dir` with `videos="one_each"` keeps the first success and the first failure as MP4
    videos; `videos="all"` writes every policy rollout's. Frames are dropped once written.
    Raises `RolloutsFailed` where the machine fails or the driver raises alike in most rollouts.
    """
    if env_id not in WORLDS:
        raise ValueError(f"env {env_id!r}: no such simulated world (known: {', '.join(WORLDS)})")
    if camera not in CAMERAS:
        raise ValueError(f"camera {camera!r}: expected one of {', '.join(CAMERAS)}")
    env_kwargs = dict(CAMERAS[camera])
    rollouts = plan(episodes, seed)
    if scenario is not None:
        scenario_from_token(scenario)
        rollouts = [(rollout_seed, scenario) for rollout_seed, _ in rollouts]
    written: dict[str, Path] = {}

    def keep(result: RolloutResult) -> None:
        kind = "success" if result.outcome == "success" else "failure"
        if video_dir is not None and result.frames and (videos == "all" or kind not in written):
            path = write_video(result.frames, Path(video_dir) / f"rollout_{result.index:03d}_{result.scenario}_"
                                                                 f"{result.outcome}.mp4")
            written.setdefault(kind, path)
        result.frames = None
        if on_result is not None:
            on_result("policy", result)

    log(f"closed loop: driving the policy in {env_id} over {len(rollouts)} scenes ({envs} environments at once)")
    results = run_rollouts(lambda: PolicyDriver(policy), rollouts, envs=envs, env_kwargs=env_kwargs,
                           keep_frames=video_dir is not None, on_result=keep, env_id=env_id)
    rates = summarise(results)
    log(f"closed loop: policy success {rates['success_rate']:.2f}, SPL {rates['spl']:.2f}, "
        f"collisions {rates['collision_rate']:.2f}, wrong side {rates['wrong_side_rate']:.2f}")
    # The baselines never look, so their envs render nothing: stepping them here, in this process,
    # costs less than starting worker processes for them.
    others = run_baselines(rollouts, envs=1, env_kwargs=env_kwargs, on_result=on_result,
                           env_id=env_id) if baselines else {}
    if others:
        log("closed loop, same scenes: " + ", ".join(f"{name} {summarise(found)['success_rate']:.2f}"
                                                     for name, found in others.items()))
    blinded = {}
    for name in ABLATIONS if ablations else ():
        driver = ABLATION_DRIVERS[name]
        blinded[name] = run_rollouts(
            lambda driver=driver: driver(policy), rollouts, envs=envs if driver.needs_image else 1,
            env_kwargs={**env_kwargs, "camera": driver.needs_image}, env_id=env_id,
            on_result=None if on_result is None else (lambda result, name=name: on_result(name, result)))
    if blinded:
        log("closed loop, sight ablations (same scenes): " + ", ".join(
            f"{name} camera {summarise(found)['success_rate']:.2f}" for name, found in blinded.items()))
    return ClosedLoopReport(env_id, len(rollouts), seed, camera, envs, results, others, written, blinded)


def world_of_episodes(attrs: list[dict]) -> tuple[str | None, str]:
    """(the simulated world every episode was rendered in, or None; why) from stored episode attrs."""
    worlds = {episode.get("simulator") for episode in attrs}
    if not attrs:
        return None, "no stored episodes"
    if len(worlds) == 1 and next(iter(worlds)) in WORLDS:
        return next(iter(worlds)), f"all {len(attrs)} episodes were rendered in {next(iter(worlds))}"
    simulated = sum(episode.get("simulator") in WORLDS for episode in attrs)
    if simulated == 0:
        return None, (f"none of the {len(attrs)} episodes comes from a simulated world the pipeline has "
                      "(robot episodes): there is no world to drive the policy in")
    if simulated == len(attrs):
        return None, (f"the episodes come from {len(worlds)} simulated worlds ({', '.join(sorted(worlds))}): "
                      "name one in the config's env to drive there")
    return None, (f"{simulated} of {len(attrs)} episodes come from a simulated world, the rest from elsewhere: "
                  "a closed-loop score in that world would not say how the policy drives where the rest was recorded")
