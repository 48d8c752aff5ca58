"""The simulated room: the obstacle's boxes, the target and the colours of floor and walls.

World frame: x forward from the start pose, y to the left, z up, metres. The robot starts at
(0, 0) facing +x, and its frame stays the world frame (the base never turns).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..data.schema import ACTION_SCALE, Scenario

PRESS_SECONDS = 0.4  # one key press drives the base this long, then it stops by itself
STEP = ACTION_SCALE * PRESS_SECONDS  # metres per full-scale press
# A distance token is how many forward presses the operator needs to reach the obstacle.
APPROACH_PRESSES = {"close": 2, "medium": 3, "far": 4}
WALL_X = 11.0  # back wall, beyond any goal
OBSTACLE_BGR = (40, 40, 200)  # red
TARGETS = ("cup", "bottle", "basket")
# The gymnasium id of the env that drives a robot in these scenes; sample episodes name it in
# their `simulator` attribute, so the pipeline knows where a policy trained on them can drive.
WORLD_ID = "vla_pipeline/BoxNav-v0"


@dataclass
class Box:
    x0: float
    x1: float
    y0: float
    y1: float
    z0: float
    z1: float
    bgr: tuple[int, int, int]


@dataclass
class Scene:
    boxes: list[Box]
    target: str
    target_xy: tuple[float, float]
    floor_bgr: np.ndarray  # (3,) float32
    wall_top_bgr: np.ndarray  # (3,) the wall's colour at the top of the image ...
    wall_bottom_bgr: np.ndarray  # ... and at the bottom; the renderer blends them per row
    door_y: float

    @property
    def footprint(self) -> tuple[float, float, float, float]:
        """(x0, x1, y0, y1) of the rectangle that holds every box's footprint on the floor."""
        return (min(b.x0 for b in self.boxes), max(b.x1 for b in self.boxes),
                min(b.y0 for b in self.boxes), max(b.y1 for b in self.boxes))


def jitter(bgr, rng: np.random.Generator, spread: int = 12) -> tuple[int, int, int]:
    return tuple(int(np.clip(c + rng.integers(-spread, spread + 1), 0, 255)) for c in bgr)


def build_scene(scenario: Scenario, target: str, goal_x: float, rng: np.random.Generator) -> Scene:
    """The room of one episode; `goal_x` is how far forward the operator's keys take the robot.

    The draws from `rng` happen in a fixed order: the sample episodes' bytes depend on it.
    """
    near = STEP * APPROACH_PRESSES[scenario.distance] + 0.45 + rng.uniform(-0.05, 0.05)
    far = near + 0.3
    shift = rng.uniform(-0.05, 0.05)
    if scenario.boxes == "1box":  # hori: long low box across the path; vert: tall narrow box
        half_width, top = (0.35, 0.35) if scenario.layout == "hori" else (0.2, 0.75)
        extents = [(-half_width, half_width, 0.0, top)]
    elif scenario.layout == "hori":  # two boxes side by side
        extents = [(-0.42, -0.02, 0.0, 0.35), (0.02, 0.42, 0.0, 0.35)]
    else:  # two boxes stacked
        extents = [(-0.25, 0.25, 0.0, 0.35), (-0.2, 0.2, 0.35, 0.65)]
    boxes = [Box(near, far, y0 + shift, y1 + shift, z0, z1,
                 jitter(tuple(int(c * (1 - 0.2 * i)) for c in OBSTACLE_BGR), rng))
             for i, (y0, y1, z0, z1) in enumerate(extents)]
    # The episode ends just short of the goal, so the target sits a little past the final pose.
    target_xy = (max(goal_x + 0.9, far + 1.2), rng.uniform(-0.1, 0.1))
    top_bgr, bottom_bgr = np.array(jitter((200, 205, 215), rng)), np.array(jitter((170, 178, 190), rng))
    floor_bgr = np.array(jitter((150, 165, 180), rng), dtype=np.float32)
    return Scene(boxes, target, target_xy, floor_bgr, top_bgr, bottom_bgr, rng.uniform(0.8, 2.5))
