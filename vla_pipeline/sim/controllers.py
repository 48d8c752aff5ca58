"""Drivers that need no model: the bounds a learned policy's closed-loop score sits between.

Every driver follows one protocol (the policy adapter will too): `reset(instruction, info)` at
the start of a rollout, with the env's reset info; then `act(image_bgr, instruction)` once per
key press, returning (linear_x, linear_y) in robot units.
"""
from __future__ import annotations

from typing import Protocol

import numpy as np

from ..data.schema import KEY_ACTIONS, side_of_instruction
from . import varied
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


def _v1(info: dict) -> bool:
    return info.get("world") == varied.WORLD_ID


class ScriptedGuide(KeyScript):
    """Knows the scene from the reset info: in BoxNav-v0 the side and the distance (the operator's
    core guide); in BoxNav-v1 the obstacles and the target (the operator's own driving,
    `varied.operator_keys`). The ceiling."""

    def keys_for(self, instruction: str, info: dict) -> str:
        if _v1(info):
            return varied.operator_keys(info["obstacles"], info["target_xy"], info["side"])
        return guide_keys(info["side"], info["distance"], "core", CORE_PRESSES)


class BlindSideScript(KeyScript):
    """Knows the side from the instruction but nothing of the scene, so plays the operator's keys
    for a middling one (v0: the core guide at medium distance; v1: `varied.nominal_keys`): what
    a policy that reads the instruction and ignores the image might do. The best such driver is
    found by search (`blind_search.BestBlind`)."""

    def keys_for(self, instruction: str, info: dict) -> str:
        side = side_of_instruction(instruction)
        if side is None:
            raise ValueError(f"instruction {instruction!r} names no single side (left or right)")
        return varied.nominal_keys(side) if _v1(info) else guide_keys(side, "medium", "core", CORE_PRESSES)


class AlwaysForward(KeyScript):
    """W on every press. The floor."""

    def keys_for(self, instruction: str, info: dict) -> str:
        return ""

