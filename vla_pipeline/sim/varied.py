"""BoxNav-v1: the room where only the camera tells the geometry, and the operator who drives it.

In BoxNav-v0 every scene of a scenario is the same up to ±5 cm, so a key sequence that never
looks solves it. Here, per episode:
- the obstacle group's lateral offset, its boxes' widths and depth, and its distance (continuous
  over the close..far range; the distance token names the third it falls in) vary;
- the target stands at a lateral offset of its own, independent of the side the instruction names,
  and far enough along that the operator's episode has at least the collector's typical 17
  presses, plus 0–2 presses more.

The operator knows the geometry and drives as a teleop operator would: the same keys and press
length; forward while the next press keeps the footprint short of the obstacle; strafe out until
the footprint clears it; forward until past it; strafe toward the target's lateral offset; forward
until the target is 0.8–1.0 m ahead; then a stop press. The target is placed so that a press ends
there (the robot moves on a lattice of whole presses).

An episode ends when the driver stops (a zero action): it succeeded where the robot stands
ARRIVAL_DISTANCE from the target with the target near the image centre (ARRIVAL_BEARING), after
passing the obstacle on the instructed side. Entering a circle round the target is not enough: a
sideways sweep at one distance passes near every target at that distance.
"""
from __future__ import annotations

import math

import numpy as np

from ..data.schema import Scenario
from .geometry import ROBOT_RADIUS
from .scene import OBSTACLE_BGR, STEP, Box, Scene, jitter

WORLD_ID = "vla_pipeline/BoxNav-v1"
# The near edge of the obstacle, by distance token: today's close..far range (v0's near edges
# 1.37 / 1.83 / 2.29 m ± 0.05), cut in thirds and drawn continuously within each.
NEAR_EDGE = {"close": (1.25, 1.60), "medium": (1.60, 1.95), "far": (1.95, 2.35)}
GROUP_OFFSET = 0.35  # m: the obstacle group's centre, up to this far either side of the start line
WIDTH_SCALE = (0.75, 1.4)  # the boxes' widths, relative to v0's
DEPTH = (0.25, 0.45)  # m along x
TARGET_OFFSET = 0.7  # m: the target's lateral offset, uniform within ±this
MIN_PRESSES = 17  # the collector's typical episode: the episode_start frame and 17 presses
EXTRA_PRESSES = 3  # the target is 0 … 2 presses' travel farther than MIN_PRESSES needs
STOP_SHORT = (0.8, 1.0)  # m: how far short of the target the operator stops
CLEARANCE = 0.06  # m the operator keeps between the footprint and a box
# Where a stop counts as arrived: within this distance, the target within this angle of straight
# ahead. The operator's stops are 0.8–1.03 m and at most 16° off; one press earlier is 1.26 m away.
ARRIVAL_DISTANCE = (0.6, 1.15)
ARRIVAL_BEARING = math.radians(20.0)
MAX_PRESSES = 40  # the operator's longest episodes take ~22 presses


def _lattice_after(x: float) -> float:
    """The first press-end position along x (a whole number of presses from the start) beyond `x`."""
    return (math.floor(x / STEP + 1e-9) + 1) * STEP


def build_varied_scene(scenario: Scenario, target: str, rng: np.random.Generator) -> Scene:
    """One episode's room: `scenario` gives boxes, layout and the distance's third; the rest is drawn."""
    low, high = NEAR_EDGE[scenario.distance]
    near = rng.uniform(low, high)
    far = near + rng.uniform(*DEPTH)
    shift = rng.uniform(-GROUP_OFFSET, GROUP_OFFSET)
    width = rng.uniform(*WIDTH_SCALE)
    height = rng.uniform(0.85, 1.25)
    if scenario.boxes == "1box":
        half, top = (0.35, 0.35) if scenario.layout == "hori" else (0.2, 0.75)
        extents = [(-half * width, half * width, 0.0, top * height)]
    elif scenario.layout == "hori":
        extents = [(-0.42 * width, -0.02 * width, 0.0, 0.35 * height), (0.02 * width, 0.42 * width, 0.0, 0.35 * height)]
    else:
        extents = [(-0.25 * width, 0.25 * width, 0.0, 0.35 * height),
                   (-0.2 * width, 0.2 * width, 0.35 * height, 0.65 * height)]
    boxes = [Box(near, far, y0 + shift, y1 + shift, z0, z1, jitter(tuple(int(c * (1 - 0.2 * i)) for c in OBSTACLE_BGR), rng))
             for i, (y0, y1, z0, z1) in enumerate(extents)]
    target_y = rng.uniform(-TARGET_OFFSET, TARGET_OFFSET)
    keys, lined_up_x = _line_up([(b.x0, b.x1, b.y0, b.y1) for b in boxes], target_y, scenario.side)
    forward = max(0, MIN_PRESSES - len(keys) - 1) + int(rng.integers(0, EXTRA_PRESSES))
    target_xy = (lined_up_x + STEP * forward + rng.uniform(*STOP_SHORT), target_y)
    top_bgr, bottom_bgr = np.array(jitter((200, 205, 215), rng)), np.array(jitter((170, 178, 190), rng))
    floor_bgr = np.array(jitter((150, 165, 180), rng), dtype=np.float32)
    return Scene(boxes, target, target_xy, floor_bgr, top_bgr, bottom_bgr, rng.uniform(0.8, 2.5))


def _line_up(obstacles: list[tuple[float, float, float, float]], target_y: float, side: str,
             wider: bool = False) -> tuple[str, float]:
    """The operator's presses up to standing past the obstacle in line with the target (forward
    while the next press keeps the footprint short of it, strafe out until clear, forward until
    past, strafe toward `target_y`), and the x they end at."""
    x0, x1 = min(r[0] for r in obstacles), max(r[1] for r in obstacles)
    y0, y1 = min(r[2] for r in obstacles), max(r[3] for r in obstacles)
    sign, out = (1.0, "a") if side == "left" else (-1.0, "d")
    x = y = 0.0
    keys = []
    while x + STEP + ROBOT_RADIUS + CLEARANCE <= x0:
        keys.append("w")
        x += STEP
    edge = y1 + ROBOT_RADIUS + CLEARANCE if side == "left" else -(y0 - ROBOT_RADIUS - CLEARANCE)
    while sign * y < edge:
        keys.append(out)
        y += sign * STEP
    if wider:
        keys.append(out)
        y += sign * STEP
    while x - ROBOT_RADIUS - CLEARANCE <= x1:
        keys.append("w")
        x += STEP
    while abs(y - target_y) > STEP / 2:
        keys.append("a" if target_y > y else "d")
        y += STEP if target_y > y else -STEP
    return "".join(keys), x


def operator_keys(obstacles: list[tuple[float, float, float, float]], target_xy: tuple[float, float], side: str,
                  wider: bool = False) -> str:
    """The operator's presses (one key each, ' ' = the final stop) round `obstacles` ((x0, x1, y0, y1)
    rectangles) on `side` to `target_xy`: lined up with the target, forward until it is
    STOP_SHORT ahead, stop. `wider` strafes out one press more than needed."""
    keys, x = _line_up(obstacles, target_xy[1], side, wider)
    forward = max(0, math.ceil((target_xy[0] - x - STOP_SHORT[1]) / STEP - 1e-9))
    return keys + "w" * forward + " "


def nominal_keys(side: str) -> str:
    """The operator's keys for the middling scene: one box of v0's width centred on the start
    line at the middle of the medium third, the target straight ahead 17 presses away."""
    near = sum(NEAR_EDGE["medium"]) / 2
    far = near + sum(DEPTH) / 2
    obstacles = [(near, far, -0.35, 0.35)]
    keys, x = _line_up(obstacles, 0.0, side)
    forward = max(0, MIN_PRESSES - len(keys) - 1)
    return operator_keys(obstacles, (x + STEP * forward + sum(STOP_SHORT) / 2, 0.0), side)


def arrival(pose: tuple[float, float], target_xy: tuple[float, float]) -> str | None:
    """Why a stop at `pose` is not an arrival at the target, or None when it is."""
    dx, dy = target_xy[0] - pose[0], target_xy[1] - pose[1]
    distance, bearing = math.hypot(dx, dy), abs(math.atan2(dy, dx))
    if not ARRIVAL_DISTANCE[0] <= distance <= ARRIVAL_DISTANCE[1]:
        return f"stopped {distance:.2f} m from the target (arrived: {ARRIVAL_DISTANCE[0]}–{ARRIVAL_DISTANCE[1]} m)"
    if bearing > ARRIVAL_BEARING:
        return (f"stopped with the target {math.degrees(bearing):.0f}° off straight ahead "
                f"(arrived: within {math.degrees(ARRIVAL_BEARING):.0f}°)")
    return None
