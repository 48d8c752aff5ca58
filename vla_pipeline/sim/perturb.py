"""The robustness suite's conditions: what a real room changes about what the camera sees and how
the instruction is worded, with nothing of the geometry changed.

A condition restyles the scene's colours (room, obstacle), adds objects that are drawn but never
collided with (distractors, placed off every path the operator drives), moves the camera on its
mount (height, tilt), degrades the frame (light level, sensor noise, blur), or words the instruction
with a template training never sees (`data.instructions.HELD_OUT_PARAPHRASES`). The obstacles, the
target, the start pose and every move are those of the unperturbed episode of the same seed, so the
scripted guide's outcome is the same under every condition; only the policy's input differs.

Draws a condition makes (distractor places, noise, wording) come from a generator spawned from the
episode's, so the scene and the renderer's own draws are those of the unperturbed episode.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import cv2
import numpy as np

from ..data.instructions import HELD_OUT_PARAPHRASES, fill
from .scene import Box, Scene

NOMINAL = "nominal"
# Distractors stand this far sideways, or more: beyond every pose the operator drives through (at
# most ~1.6 m out: the widest obstacle group at its largest offset, plus the robot's footprint and
# a press), and inside the camera's view from the start (85° wide: ±2.3 m at 2.5 m ahead).
DISTRACTOR_LATERAL = (1.9, 2.4)
DISTRACTOR_AHEAD = (2.0, 5.0)


@dataclass(frozen=True)
class Condition:
    """One way the room differs; the defaults change nothing."""

    description: str
    gain: float = 1.0  # every pixel's intensity times this (the room's light)
    floor_bgr: tuple[int, int, int] | None = None
    floor_tile: float | None = None  # m, the floor pattern's tile
    floor_contrast: float | None = None  # how much darker the odd tiles are
    wall_bgr: tuple[tuple[int, int, int], tuple[int, int, int]] | None = None  # top, bottom
    obstacle_bgr: tuple[int, int, int] | None = None
    distractors: int = 0
    camera_height: float = 0.0  # m added to the camera's height above the floor
    tilt_deg: float = 0.0  # the camera pitched up by this much (negative: down)
    noise_sigma: float = 0.0  # grey levels of Gaussian sensor noise per pixel and frame
    blur: float = 0.0  # Gaussian blur's sigma, as a fraction of the frame width
    paraphrase: bool = False  # the instruction in a wording training never sees


CONDITIONS: dict[str, Condition] = {
    NOMINAL: Condition("the room as the training episodes show it"),
    "dim": Condition("a dimmer room: every pixel at 55% of its intensity", gain=0.55),
    "bright": Condition("a brighter room: every pixel at 150% (clipped at white)", gain=1.5),
    "floor_and_walls": Condition(
        "another floor and walls: dark wooden planks of a third the tile size, pale green walls",
        floor_bgr=(60, 95, 135), floor_tile=0.25, floor_contrast=0.3, wall_bgr=((180, 215, 190), (150, 190, 165))),
    "obstacle_colour": Condition("the obstacle painted purple instead of red", obstacle_bgr=(150, 60, 125)),
    "distractors": Condition("two grey cabinets standing off the path, one on each side", distractors=2),
    "camera_lower": Condition("the camera mounted 8 cm lower", camera_height=-0.08),
    "camera_higher": Condition("the camera mounted 8 cm higher", camera_height=0.08),
    "camera_tilt": Condition("the camera pitched 5° up", tilt_deg=5.0),
    "noise": Condition("a cheap sensor's noise: Gaussian, sigma 10 grey levels", noise_sigma=10.0),
    "blur": Condition("a soft lens: Gaussian blur of sigma 0.3% of the frame width (3.8 px at 720p)", blur=0.003),
    "paraphrase": Condition("the instruction worded as training never words it (data.instructions."
                            "HELD_OUT_PARAPHRASES)", paraphrase=True),
}
PERTURBED = tuple(name for name in CONDITIONS if name != NOMINAL)


def condition(name: str | None) -> Condition:
    """The condition of that name (None: nominal), or a ValueError listing them."""
    if name is None:
        return CONDITIONS[NOMINAL]
    if name not in CONDITIONS:
        raise ValueError(f"perturbation {name!r}: expected one of {', '.join(CONDITIONS)}")
    return CONDITIONS[name]


def parse_conditions(text: str) -> list[str]:
    """`all` or a comma-separated list of names → the perturbed conditions to run, in suite order."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if names == ["all"]:
        return list(PERTURBED)
    unknown = [name for name in names if name not in CONDITIONS]
    if unknown or not names:
        raise ValueError(f"perturbations {', '.join(unknown) or repr(text)}: expected 'all' or a comma-separated "
                         f"list of {', '.join(PERTURBED)}")
    return [name for name in CONDITIONS if name in names]


def restyle(scene: Scene, look: Condition, rng: np.random.Generator) -> tuple[Scene, list[Box]]:
    """What the camera draws: `scene` in the condition's colours, and the distractors (drawn, never
    collided with). The geometry the env judges stays `scene`."""
    styled = scene
    if look.floor_bgr is not None:
        styled = replace(styled, floor_bgr=np.array(look.floor_bgr, np.float32))
    if look.wall_bgr is not None:
        styled = replace(styled, wall_top_bgr=np.array(look.wall_bgr[0]), wall_bottom_bgr=np.array(look.wall_bgr[1]))
    if look.obstacle_bgr is not None:
        styled = replace(styled, boxes=[replace(box, bgr=tuple(int(c * (1 - 0.2 * i)) for c in look.obstacle_bgr))
                                        for i, box in enumerate(scene.boxes)])
    distractors = []
    for i in range(look.distractors):
        side = 1.0 if i % 2 == 0 else -1.0
        y = side * rng.uniform(*DISTRACTOR_LATERAL)
        x = rng.uniform(*DISTRACTOR_AHEAD)
        distractors.append(Box(x, x + 0.35, y - 0.2, y + 0.2, 0.0, rng.uniform(0.5, 0.8), (120, 118, 112)))
    return styled, distractors


def degrade(frame: np.ndarray, look: Condition, rng: np.random.Generator) -> np.ndarray:
    """The frame as the condition's light, lens and sensor deliver it (uint8 BGR)."""
    if look.gain != 1.0:
        frame = cv2.convertScaleAbs(frame, alpha=look.gain)
    if look.blur:
        frame = cv2.GaussianBlur(frame, (0, 0), look.blur * frame.shape[1])
    if look.noise_sigma:
        noise = rng.standard_normal(frame.shape, dtype=np.float32) * look.noise_sigma
        frame = cv2.add(frame, noise, dtype=cv2.CV_8U)  # rounded, saturated at 0 and 255
    return frame


def horizon_shift(look: Condition, focal: float) -> float:
    """Pixels the horizon moves down the frame when the camera pitches up by `tilt_deg`."""
    return focal * math.tan(math.radians(look.tilt_deg))


def instruction(look: Condition, side: str, target: str, template: str, rng: np.random.Generator) -> str:
    """The episode's instruction under the condition: `template` filled, or a held-out wording."""
    if look.paraphrase:
        template = HELD_OUT_PARAPHRASES[int(rng.integers(len(HELD_OUT_PARAPHRASES)))]
    return fill(template, side, target)
