"""BoxNav: the sample episodes' room as a gymnasium environment, one step per key press.

Observation: the camera frame as the collector records it and the instruction.
Action: (linear_x, linear_y) in robot units, applied as one key press: the base moves by
action × PRESS_SECONDS, and the next frame is the one captured at the next press.

Colour orders (also in `BoxNavEnv.metadata`): observations are **BGR**, as the robot's camera
delivers them and the policy takes them; `render()` returns **RGB**, gymnasium's convention
for "rgb_array", for video writers and viewers.

An episode's scenario comes from `reset(options={"scenario": ...})`, else from the seed. Its
scene and camera draw from a generator of their own, seeded from the env's: the env's own
generator advances the same whether the camera renders or not.
"""
from __future__ import annotations

import math
import string
from dataclasses import dataclass, field

import gymnasium
import numpy as np
from gymnasium import spaces

from ..data.schema import ACTION_SCALE, DEAD_BAND, INSTRUCTION_TEMPLATE, Scenario, parse_scenario
from . import perturb, varied
from .geometry import Point, shortest_path, sweep
from .operator import core_goal_x
from .render import Renderer
from .scene import PRESS_SECONDS, TARGETS, WORLD_ID, Scene, build_scene

ENV_ID = WORLD_ID  # v0: the scenes of a scenario are all alike
SIGHT_ENV_ID = varied.WORLD_ID  # v1: only the camera tells the geometry (vla_pipeline/sim/varied.py)
ENV_IDS = (ENV_ID, SIGHT_ENV_ID)
# A core guide ends 0.9 m short of the target along x, and the target stands up to 0.1 m off the
# centre line, so the guide's last pose is at most 0.906 m away; 1.0 m counts it as arrived while
# the pose one press earlier (1.36 m away) does not.
SUCCESS_RADIUS = 1.0
# The arena: the floor has no side walls, so a robot this far sideways or behind its start has
# left the room the sample episodes show (the guide's widest berth is 3 strafes, 1.4 m).
ARENA_HALF_WIDTH = 2.5
ARENA_BEHIND = 1.0
MAX_PRESSES = 30  # an episode is 17 presses, the longest sample 23; 30 leaves room for detours
ACTION_TOLERANCE = 1e-4  # robot units past ±ACTION_SCALE still taken as full scale (float rounding)
INSTRUCTION_CHARSET = string.ascii_letters + string.digits + " " + string.punctuation
SCENARIO_FORM = ("{1box|2box}_{hori|vert}_{left|right}_{core|variant}_{close|medium|far}, "
                 "optionally prefixed basket_ (e.g. 1box_hori_left_core_medium)")
# stopped_away: in v1, a stop press where the robot has not arrived
OUTCOMES = ("success", "collision", "wrong_side", "lost", "stopped_away", "timeout", "invalid_action")


def scenario_from_token(token) -> Scenario:
    """The scenario a reset option names, or a ValueError that shows the accepted form."""
    parsed = parse_scenario(token) if isinstance(token, str) else None
    if parsed is None or parsed.name != token:
        raise ValueError(f"options['scenario'] = {token!r} is not a scenario token: expected {SCENARIO_FORM}")
    return parsed


def episode_generator(rng: np.random.Generator) -> np.random.Generator:
    """The generator one episode's scene and camera draw from, seeded by one draw of `rng`."""
    return np.random.default_rng(int(rng.integers(0, 2**63 - 1)))


def draw_scenario(rng: np.random.Generator) -> Scenario:
    """A scripted scenario of the sample episodes' space, drawn from `rng`."""
    return Scenario(boxes=str(rng.choice(["1box", "2box"])), layout=str(rng.choice(["hori", "vert"])),
                    side=str(rng.choice(["left", "right"])), pattern="core",
                    distance=str(rng.choice(["close", "medium", "far"])))


def action_problem(action) -> str | None:
    """Why `action` cannot be one key press, or None when it can."""
    values = np.asarray(action, dtype=np.float64)
    if values.shape != (2,):
        return f"action has shape {values.shape}, expected (2,) = (linear_x, linear_y)"
    if not np.all(np.isfinite(values)):
        return f"action {values.tolist()} is not finite"
    if np.any(np.abs(values) > ACTION_SCALE + ACTION_TOLERANCE):
        return f"action {values.tolist()} is outside ±{ACTION_SCALE} (robot units per axis)"
    return None


@dataclass
class Episode:
    """Everything one episode holds between presses."""

    scenario: Scenario
    target: str
    scene: Scene
    renderer: Renderer | None  # None: the camera is off (a driver that never looks)
    instruction: str
    frame: np.ndarray
    shortest_path: float
    pose: Point = (0.0, 0.0)
    path: list[Point] = field(default_factory=lambda: [(0.0, 0.0)])
    path_length: float = 0.0
    passed_side: str | None = None  # the side the robot's centre first got past the obstacle's far edge
    outcome: str | None = None
    reason: str | None = None

    @property
    def obstacles(self) -> list[tuple[float, float, float, float]]:
        return [(b.x0, b.x1, b.y0, b.y1) for b in self.scene.boxes]


class BoxNavEnv(gymnasium.Env):
    """Go round the obstacle on the instructed side and reach the target. Reward 1 on success.

    `world` is ENV_ID (v0: success on entering the circle round the target) or SIGHT_ENV_ID (v1: the
    geometry varies per episode; an action within the dead band on both axes is the stop press,
    which ends the episode: success where the robot has arrived, else `stopped_away`).

    `perturbation` (a name of `perturb.CONDITIONS`) changes what the camera sees or how the
    instruction is worded, never the geometry: the robustness suite.

    reset(options={"scenario": token, "target": "cup"|"bottle"|"basket"}); without a scenario
    it is drawn from the seed. A vector env's reset hands one options dict to every sub-env, so
    `scenario` may also map seeds to tokens ({seed: token, ...}): each sub-env takes its own
    seed's entry, and draws from the seed where its seed has none.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 1 / PRESS_SECONDS,
                "observation_colour_order": "BGR", "render_colour_order": "RGB"}

    def __init__(self, render_mode: str | None = None, height: int = 720, width: int = 1280,
                 max_presses: int | None = None, camera: bool = True, world: str = ENV_ID,
                 perturbation: str | None = None):
        if render_mode not in (None, *self.metadata["render_modes"]):
            raise ValueError(f"render_mode={render_mode!r}: expected None or 'rgb_array'")
        if world not in ENV_IDS:
            raise ValueError(f"world={world!r}: expected one of {', '.join(ENV_IDS)}")
        max_presses = max_presses or (MAX_PRESSES if world == ENV_ID else varied.MAX_PRESSES)
        if max_presses < 1:
            raise ValueError(f"max_presses={max_presses}: expected at least 1")
        self.render_mode, self.height, self.width, self.max_presses = render_mode, height, width, max_presses
        self.world = world
        self.perturbation = perturbation or perturb.NOMINAL
        self.look = perturb.condition(perturbation)  # a ValueError naming the conditions
        # camera=False: black frames, nothing rendered, for drivers that never look (the baselines).
        # The scene and every move are the same: rendering only draws the frames' own noise.
        self.black = None if camera else np.zeros((height, width, 3), np.uint8)
        self.observation_space = spaces.Dict({
            "image": spaces.Box(0, 255, (height, width, 3), np.uint8),
            "instruction": spaces.Text(max_length=128, min_length=1, charset=INSTRUCTION_CHARSET),
        })
        self.action_space = spaces.Box(-ACTION_SCALE, ACTION_SCALE, (2,), np.float32)
        self.episode: Episode | None = None

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        options = dict(options or {})
        unknown = sorted(set(options) - {"scenario", "target"})
        if unknown:
            raise ValueError(f"unknown reset options {unknown}: expected 'scenario' and/or 'target'")
        token = options.get("scenario")
        if isinstance(token, dict):  # a vector env's {seed: token}: this sub-env's own entry
            token = token.get(seed)
        scenario = scenario_from_token(token) if token is not None else draw_scenario(self.np_random)
        target = options.get("target", scenario.target)
        if target not in TARGETS:
            raise ValueError(f"options['target'] = {target!r}: expected one of {', '.join(TARGETS)}")
        rng = episode_generator(self.np_random)
        # The scene of an episode of this scenario, drawn as the operator draws it.
        if self.world == ENV_ID:
            scene, goal_radius = build_scene(scenario, target, core_goal_x(scenario.distance), rng), SUCCESS_RADIUS
        else:
            scene, goal_radius = varied.build_varied_scene(scenario, target, rng), varied.ARRIVAL_DISTANCE[1]
        # The condition's own draws: a generator spawned from the episode's, which it leaves as it was.
        look_rng = rng.spawn(1)[0]
        renderer = Renderer(scene, rng, self.height, self.width, self.look, look_rng) if self.black is None else None
        wording = perturb.instruction(self.look, scenario.side, target, INSTRUCTION_TEMPLATE, look_rng)
        self.episode = Episode(scenario, target, scene, renderer, wording,
                               frame=renderer.frame(0.0, 0.0) if renderer else self.black,
                               shortest_path=shortest_path((0.0, 0.0), scene.target_xy, goal_radius,
                                                           scene.footprint, scenario.side))
        return self._observation(), self._info()

    def step(self, action):
        episode = self.episode
        if episode is None:
            raise RuntimeError("step() before reset(): call reset() to start an episode")
        if episode.outcome is not None:  # a finished episode stays as it ended
            return self._observation(), 0.0, self._terminated(), self._truncated(), self._info()
        problem = action_problem(action)
        if problem is not None:
            episode.outcome, episode.reason = "invalid_action", problem
            return self._observation(), 0.0, True, False, self._info()
        # As a recorded key press: float32 command values, the base driven for PRESS_SECONDS.
        command = np.clip(np.asarray(action, dtype=np.float32), self.action_space.low, self.action_space.high)
        command = command.astype(np.float64)
        if self.world != ENV_ID and np.all(np.abs(command) <= DEAD_BAND * ACTION_SCALE):
            episode.outcome, episode.reason = self._judge_stop()
            reward = 1.0 if episode.outcome == "success" else 0.0
            return self._observation(), reward, True, False, self._info()
        move = (float(command[0] * PRESS_SECONDS), float(command[1] * PRESS_SECONDS))
        positions, touched = sweep(episode.pose, move, episode.obstacles)
        _, far_edge_x, low_y, high_y = episode.scene.footprint
        for x, y in positions:
            if episode.passed_side is None and x > far_edge_x:
                episode.passed_side = "left" if y > (low_y + high_y) / 2 else "right"
        episode.path_length += math.dist(episode.pose, positions[-1])
        episode.pose = positions[-1]
        episode.path.append(episode.pose)
        episode.frame = episode.renderer.frame(*episode.pose) if episode.renderer else self.black
        episode.outcome, episode.reason = self._judge(touched)
        reward = 1.0 if episode.outcome == "success" else 0.0
        return self._observation(), reward, self._terminated(), self._truncated(), self._info()

    def _judge(self, touched: str | None) -> tuple[str | None, str | None]:
        episode = self.episode
        (x, y), side = episode.pose, episode.scenario.side
        if touched is not None:
            return "collision", f"the footprint touched {touched}; stopped at ({x:.2f}, {y:.2f})"
        if episode.passed_side not in (None, side):
            return "wrong_side", f"passed the obstacle on the {episode.passed_side}, instructed {side}"
        if abs(y) > ARENA_HALF_WIDTH or x < -ARENA_BEHIND:
            return "lost", (f"left the arena at ({x:.2f}, {y:.2f}): more than {ARENA_HALF_WIDTH} m sideways "
                            f"or {ARENA_BEHIND} m behind the start")
        distance = math.dist(episode.pose, episode.scene.target_xy)
        if self.world == ENV_ID and episode.passed_side == side and distance <= SUCCESS_RADIUS:
            return "success", f"{distance:.2f} m from the {episode.target} after passing on the {side}"
        if len(episode.path) - 1 >= self.max_presses:
            return "timeout", f"{self.max_presses} presses without reaching the {episode.target}"
        return None, None

    def _judge_stop(self) -> tuple[str, str]:
        """A stop press in v1: arrived, or stopped_away with why."""
        episode, side = self.episode, self.episode.scenario.side
        if episode.passed_side != side:
            return "stopped_away", f"stopped at ({episode.pose[0]:.2f}, {episode.pose[1]:.2f}) before passing the obstacle"
        problem = varied.arrival(episode.pose, episode.scene.target_xy)
        if problem is not None:
            return "stopped_away", problem
        distance = math.dist(episode.pose, episode.scene.target_xy)
        return "success", f"stopped {distance:.2f} m before the {episode.target} after passing on the {side}"

    def _terminated(self) -> bool:
        return self.episode.outcome not in (None, "timeout")

    def _truncated(self) -> bool:
        return self.episode.outcome == "timeout"

    def instruction(self) -> str:
        return self.episode.instruction

    def _observation(self) -> dict:
        return {"image": self.episode.frame.copy(), "instruction": self.instruction()}

    def _info(self) -> dict:
        episode = self.episode
        scenario = episode.scenario
        return {
            "scenario": scenario.name, "instruction": self.instruction(), "side": scenario.side,
            "distance": scenario.distance, "boxes": scenario.boxes, "layout": scenario.layout,
            "target": episode.target, "pose": episode.pose, "path": list(episode.path),
            "presses": len(episode.path) - 1, "path_length": float(episode.path_length),
            "shortest_path": float(episode.shortest_path), "outcome": episode.outcome,
            "reason": episode.reason, "obstacles": episode.obstacles,
            "target_xy": tuple(float(v) for v in episode.scene.target_xy), "world": self.world,
            "success_radius": SUCCESS_RADIUS if self.world == ENV_ID else varied.ARRIVAL_DISTANCE[1],
            "perturbation": self.perturbation,
        }

    def render(self):
        if self.render_mode == "rgb_array" and self.episode is not None:
            return np.ascontiguousarray(self.episode.frame[..., ::-1])
        return None
