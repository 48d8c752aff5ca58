"""Where the robot may drive: its round footprint against the boxes and the back wall, and the
shortest way round the obstacle on a given side. Top-down, world frame, metres."""
from __future__ import annotations

import math

from .scene import WALL_X

Rect = tuple[float, float, float, float]  # (x0, x1, y0, y1) of a box's footprint
Point = tuple[float, float]

# The scripted guide strafes back 0.17 m past the box's far edge (0.12-0.22 m with the scene's
# ±0.05 m jitter), so any footprint wider than 0.12 m would clip the box's back corner on some
# guided runs; 0.1 m leaves 2 cm to spare. The sample scenes are a scaled-down room, not the robot.
ROBOT_RADIUS = 0.1
SWEEP_STEP = 0.01  # m between footprint checks along a press: where a collision stops the robot


def contact(point: Point, rects: list[Rect], radius: float = ROBOT_RADIUS) -> str | None:
    """What a footprint of `radius` centred at `point` touches: "a box", "the back wall" or None."""
    x, y = point
    if x + radius >= WALL_X:
        return "the back wall"
    for x0, x1, y0, y1 in rects:
        dx, dy = max(x0 - x, 0.0, x - x1), max(y0 - y, 0.0, y - y1)
        if dx * dx + dy * dy < radius * radius:
            return "a box"
    return None


def sweep(start: Point, move: tuple[float, float], rects: list[Rect],
          radius: float = ROBOT_RADIUS) -> tuple[list[Point], str | None]:
    """The free positions along the straight move from `start` (checked every SWEEP_STEP, the
    last one where the robot stops) and what stopped it, or None when the whole move was free."""
    steps = max(1, math.ceil(math.hypot(*move) / SWEEP_STEP))
    positions = [start]
    for k in range(1, steps + 1):
        # k / steps is exactly 1.0 at the end, so a free press ends at start + move to the last bit.
        point = (start[0] + move[0] * (k / steps), start[1] + move[1] * (k / steps))
        touched = contact(point, rects, radius)
        if touched is not None:
            return positions, touched
        positions.append(point)
    return positions, None


def _turn(o: Point, a: Point, b: Point) -> float:
    """> 0 when o → a → b turns left (counter-clockwise)."""
    return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])


def taut_path(start: Point, goal: Point, footprint: Rect, side: str,
              clearance: float = ROBOT_RADIUS) -> list[Point]:
    """The shortest path from `start` to `goal` that passes the obstacle `footprint` on `side`
    ("left" = +y) keeping `clearance` to its sides: a string pulled taut round the corners of the
    footprint grown by `clearance`. Expects the obstacle between start and goal along x."""
    x0, x1, y0, y1 = footprint
    edge_y = y1 + clearance if side == "left" else y0 - clearance
    corners = [(x0 - clearance, edge_y), (x1 + clearance, edge_y)]
    bulge = 1.0 if side == "left" else -1.0
    chain = [start]
    for point in corners + [goal]:  # the hull of start, corners and goal on that side
        while len(chain) >= 2 and bulge * _turn(chain[-2], chain[-1], point) >= 0:
            chain.pop()
        chain.append(point)
    return chain


def path_length(points: list[Point]) -> float:
    return float(sum(math.dist(a, b) for a, b in zip(points, points[1:])))


def shortest_path(start: Point, goal: Point, goal_radius: float, footprint: Rect, side: str,
                  clearance: float = ROBOT_RADIUS) -> float:
    """Length of the shortest path from `start` into the circle of `goal_radius` round `goal`,
    passing the obstacle on `side`: the taut path to the goal, less the radius its last straight
    stretch runs inside the circle."""
    return max(0.0, path_length(taut_path(start, goal, footprint, side, clearance)) - goal_radius)
