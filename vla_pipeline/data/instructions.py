"""Instructions worded other ways: the templates training draws paraphrases from, and the ones it
never sees, which the robustness suite words its instructions with.

A template has the fields {side} (the side to pass the obstacle on), {other} (the opposite side,
for wordings such as "keep the box on your right", which means passing it on the left) and
{target}. `parse_instruction` reads side and target back from any known wording, so an
instruction can be paraphrased only where its meaning is known: a robot episode's free-form
instruction is left as it is.
"""
from __future__ import annotations

import re
from functools import lru_cache

import numpy as np

from .schema import INSTRUCTION_TEMPLATE, OTHER_SIDE

# Drawn from in training (TrainConfig.paraphrase_prob); the collector's template is not among them.
TRAINING_PARAPHRASES = (
    "Go around the obstacle on the {side} and reach the {target}",
    "Drive past the obstacle on its {side} side, then go to the {target}",
    "Take the {side} side of the obstacle and move to the {target}",
    "Avoid the obstacle by passing it on the {side}, then stop at the {target}",
    "Steer {side} around the obstacle and drive up to the {target}",
    "Keep the obstacle to your {other} and go to the {target}",
)
# Never shown in training: the robustness suite's wordings (sim condition `paraphrase`, offline
# `paraphrase`). The side word stays, in sentences no training template has.
HELD_OUT_PARAPHRASES = (
    "Pass the obstacle on its {side}, then drive to the {target}",
    "Keep the box on your {other} and reach the {target}",
    "Head for the {target}, going {side} of the obstacle",
    "The {target} is behind the obstacle: go round it on the {side}",
)
TEMPLATES = (INSTRUCTION_TEMPLATE, *TRAINING_PARAPHRASES, *HELD_OUT_PARAPHRASES)
SIDES = ("left", "right")


def fill(template: str, side: str, target: str) -> str:
    return template.format(side=side, other=OTHER_SIDE[side], target=target)


@lru_cache(maxsize=None)
def _pattern(template: str) -> re.Pattern:
    parts = re.split(r"(\{side\}|\{other\}|\{target\})", template)
    groups = {"{side}": r"(?P<side>left|right)", "{other}": r"(?P<other>left|right)", "{target}": r"(?P<target>[\w ]+?)"}
    return re.compile("".join(groups.get(part, re.escape(part)) for part in parts) + r"[.!]?", re.IGNORECASE)


def parse_instruction(text: str) -> tuple[str, str] | None:
    """(side to pass on, target) of an instruction in any known wording, else None."""
    text = " ".join(str(text).split())
    for template in TEMPLATES:
        match = _pattern(template).fullmatch(text)
        if match:
            words = match.groupdict()
            side = words["side"].lower() if words.get("side") else OTHER_SIDE[words["other"].lower()]
            return side, words["target"].lower()
    return None


def paraphrase(text: str, rng: np.random.Generator, templates: tuple[str, ...] = TRAINING_PARAPHRASES) -> str:
    """`text` reworded with a template drawn from `templates`; unchanged where it is in no known wording."""
    parsed = parse_instruction(text)
    if parsed is None:
        return text
    return fill(templates[int(rng.integers(len(templates)))], *parsed)
