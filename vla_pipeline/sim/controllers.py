"""Drivers that need no model: the bounds a learned policy's closed-loop score sits between.

Every driver follows one protocol (the policy adapter will too): `reset(instruction, info)` at
the start of a rollout, with the env's reset info; then `act(image_bgr, instruction)` once per
key press, returning (linear_x, linear_y) in robot units.
"""
from __future__ import annotations

from typing import Protocol

import numpy as np

from ..data.schema import KEY_ACTIONS, side_of_instruction
from .operator import CORE_PRESSES, guide_keys


class Controller(Protocol):
    def reset(self, instruction: str, info: dict) -> None: ...

    def act(self, image_bgr: np.ndarray, instruction: str) -> np.ndarray: ...


def key_action(key: str) -> np.ndarray:
    """The (linear_x, linear_y) command of one teleop key."""
    return np.array(KEY_ACTIONS[key][:2], dtype=np.float32)


class KeyScript:
    """Plays a key sequence, one key per press, then holds W (towards the goal) for good."""

    needs_image = False  # it never looks: its rollouts can run with the camera off

    def __init__(self):
        self.keys, self.presses = "", 0

    def reset(self, instruction: str, info: dict) -> None:
        self.keys, self.presses = self.keys_for(instruction, info), 0

    def keys_for(self, instruction: str, info: dict) -> str:
        raise NotImplementedError

    def act(self, image_bgr: np.ndarray, instruction: str) -> np.ndarray:
        key = self.keys[self.presses] if self.presses < len(self.keys) else "w"
        self.presses += 1
        return key_action(key)


class ScriptedGuide(KeyScript):
    """Knows the side and the distance (from the reset info): the operator's core guide. The ceiling."""

    def keys_for(self, instruction: str, info: dict) -> str:
        return guide_keys(info["side"], info["distance"], "core", CORE_PRESSES)


class BlindSideScript(KeyScript):
    """Knows the side from the instruction but not the distance, so plays the core guide for a
    medium one: what a policy that reads the instruction and ignores the image can do."""

    def keys_for(self, instruction: str, info: dict) -> str:
        side = side_of_instruction(instruction)
        if side is None:
            raise ValueError(f"instruction {instruction!r} names no single side (left or right)")
        return guide_keys(side, "medium", "core", CORE_PRESSES)


class AlwaysForward(KeyScript):
    """W on every press. The floor."""

    def keys_for(self, instruction: str, info: dict) -> str:
        return ""


BASELINES = {"scripted_guide": ScriptedGuide, "blind_side_script": BlindSideScript,
             "always_forward": AlwaysForward}
