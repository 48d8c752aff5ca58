"""Facts about the robot and its episodes, each stated once and used everywhere."""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

# Teleop keys publish only 0 or ±ACTION_SCALE per axis (raw command units).
ACTION_SCALE = 1.15
# The fraction of ACTION_SCALE below which an action component counts as 0: evaluation's direction
# classes, and the stop press of the simulated world where stopping ends an episode.
DEAD_BAND = 0.3
KEY_ACTIONS: dict[str, tuple[float, float, float]] = {
    "w": (+ACTION_SCALE, 0.0, 0.0),
    "s": (-ACTION_SCALE, 0.0, 0.0),
    "a": (0.0, +ACTION_SCALE, 0.0),
    "d": (0.0, -ACTION_SCALE, 0.0),
    "q": (+ACTION_SCALE, +ACTION_SCALE, 0.0),
    "e": (+ACTION_SCALE, -ACTION_SCALE, 0.0),
    "z": (-ACTION_SCALE, +ACTION_SCALE, 0.0),
    "c": (-ACTION_SCALE, -ACTION_SCALE, 0.0),
    " ": (0.0, 0.0, 0.0),
}
# The policy predicts (linear_x, linear_y); angular_z is always 0 on this robot.
ACTION_DIMS = ("linear_x", "linear_y")

EVENT_TYPES = ("episode_start", "start_action", "stop_action")

IMAGE_SIZE = 224

INSTRUCTION_TEMPLATE = "Navigate around the obstacle on the {side} side and reach the {target}"
DEFAULT_TARGET = "cup"

_SCENARIO = re.compile(
    r"(?:^|_)(?P<basket>basket_)?"
    r"(?P<boxes>1box|2box)_(?P<layout>hori|vert)_(?P<side>left|right)_"
    r"(?P<pattern>core|variant)_(?P<distance>close|medium|far)(?:_|$)"
)
_SIDE_WORD = re.compile(r"\b(left|right)\b", re.IGNORECASE)
OTHER_SIDE = {"left": "right", "right": "left"}


@dataclass(frozen=True)
class Scenario:
    """The scenario tokens in a collector file name."""

    boxes: str
    layout: str
    side: str
    pattern: str
    distance: str
    basket: bool = False

    @property
    def group(self) -> str:
        """Boxes, layout and side: the obstacle course itself. Pattern, distance and basket vary
        the same course, and grouping by them would leave most groups too small."""
        return f"{self.boxes}_{self.layout}_{self.side}"

    @property
    def name(self) -> str:
        tokens = f"{self.boxes}_{self.layout}_{self.side}_{self.pattern}_{self.distance}"
        return f"basket_{tokens}" if self.basket else tokens

    @property
    def target(self) -> str:
        return "basket" if self.basket else DEFAULT_TARGET

    def instruction(self) -> str:
        return INSTRUCTION_TEMPLATE.format(side=self.side, target=self.target)


def parse_scenario(text: str) -> Scenario | None:
    """Scenario tokens from a file stem or a `scenario` attr, or None if there are none."""
    match = _SCENARIO.search(text)
    if match is None:
        return None
    return Scenario(
        boxes=match["boxes"],
        layout=match["layout"],
        side=match["side"],
        pattern=match["pattern"],
        distance=match["distance"],
        basket=match["basket"] is not None or text.startswith("basket_"),
    )


def side_of_instruction(instruction: str) -> str | None:
    """'left' or 'right' when the instruction names exactly one side."""
    sides = {word.lower() for word in _SIDE_WORD.findall(instruction)}
    return sides.pop() if len(sides) == 1 else None


def scenario_group(scenario_name: str | None) -> str | None:
    """The course (boxes, layout, side) of a scenario token, or None without one."""
    scenario = parse_scenario(scenario_name) if scenario_name else None
    return scenario.group if scenario else None


def mirror_instruction(text: str) -> str:
    """Swap the whole words 'left' and 'right', keeping their case ('Left' → 'Right')."""

    def swap(match: re.Match) -> str:
        word = match.group(0)
        other = OTHER_SIDE[word.lower()]
        if word.isupper():
            return other.upper()
        return other.capitalize() if word[0].isupper() else other

    return _SIDE_WORD.sub(swap, text)


def commanded(event_types) -> np.ndarray:
    """Which recorded steps are commands: all but the `episode_start` frame, whose zero action
    is no key press (its image is the one the first key press is taken from)."""
    return np.array([str(event) != "episode_start" for event in event_types], bool)


def window_starts(num_frames: int, window: int, chunk: int) -> list[int]:
    """First frames of every full window whose last frame still has a whole action chunk.

    A window covers frames [s, s + window); the chunk predicted at its last frame covers
    actions [s + window - 1, s + window - 1 + chunk). Requiring s + window + chunk <= T
    keeps the minimum episode length at window + chunk, the rule validation enforces.
    """
    return list(range(max(0, num_frames - window - chunk + 1)))


def training_starts(num_frames: int, window: int, chunk: int) -> list[int]:
    """First frames of every window the trainer uses: the complete windows of `window_starts`,
    then the tail windows whose frames are all recorded but whose chunks run past the last action
    (those steps are masked). Without the tail, an episode's last frame would never be an input
    and its last action never a target: a recorded stop would never be learned.
    """
    if not window_starts(num_frames, window, chunk):
        return []
    return list(range(num_frames - window + 1))
