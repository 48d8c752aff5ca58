"""A training run's checkpoint: what trains, the optimizer, the schedule and where the run stands.

Tensors go to safetensors and everything else to JSON: nothing is unpickled when a run
resumes. A checkpoint, like the best policy, is written whole under a temporary name and then
swapped in, so a run killed at any moment leaves the last complete one in place.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..data.atomic import replace_directory
from ..policy.model import load_policy_dir, save_policy

STATE_TENSORS = "trainer_state.safetensors"
STATE_JSON = "trainer_state.json"
PICKLED_STATE = "trainer_state.pt"  # what earlier releases wrote; never loaded


def staging_for(final: Path) -> Path:
    return final.parent / f".{final.name}.{uuid.uuid4().hex}.tmp"


def publish_policy(policy, final: Path, extra_files: dict[str, str] | None = None) -> Path:
    """`save_policy`, whole or not at all: written aside, then swapped in."""
    staging = staging_for(final)
    save_policy(policy, staging)
    for name, text in (extra_files or {}).items():
        (staging / name).write_text(text)
    replace_directory(staging, final)
    return final


def save_checkpoint(directory: Path, policy, optimizer, scheduler, progress: dict) -> None:
    """The checkpoint in `directory`, replacing the previous one only once complete."""
    staging = staging_for(directory)
    save_policy(policy, staging / "policy")
    tensors: dict[str, torch.Tensor] = {"torch_rng": torch.get_rng_state()}
    state = {
        "optimizer": _encode(optimizer.state_dict(), "optimizer", tensors),
        "scheduler": _encode(scheduler.state_dict(), "scheduler", tensors),
        "progress": progress,
    }
    save_file(tensors, str(staging / STATE_TENSORS))
    (staging / STATE_JSON).write_text(json.dumps(state))
    replace_directory(staging, directory)


def has_checkpoint(directory: Path) -> bool:
    return (directory / STATE_JSON).is_file() and (directory / STATE_TENSORS).is_file()


def load_checkpoint(directory: Path, policy, optimizer, scheduler) -> dict:
    """Restore weights, optimizer, schedule and RNG from `directory`; returns the progress record."""
    tensors = load_file(str(directory / STATE_TENSORS))
    state = json.loads((directory / STATE_JSON).read_text())
    load_policy_dir(directory / "policy", into=policy)
    optimizer.load_state_dict(_decode(state["optimizer"], tensors))
    scheduler.load_state_dict(_decode(state["scheduler"], tensors))
    torch.set_rng_state(tensors["torch_rng"])
    return state["progress"]


def _encode(value, name: str, tensors: dict[str, torch.Tensor]):
    """JSON for `value`, its tensors moved into `tensors` under dotted names."""
    if isinstance(value, torch.Tensor):
        tensors[name] = value.detach().cpu().contiguous()
        return {"__tensor__": name}
    if isinstance(value, dict):
        if all(isinstance(key, str) for key in value):
            return {key: _encode(item, f"{name}.{key}", tensors) for key, item in value.items()}
        return {"__items__": [[key, _encode(item, f"{name}.{key}", tensors)] for key, item in value.items()]}
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(item, f"{name}.{i}", tensors) for i, item in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(item, f"{name}.{i}", tensors) for i, item in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"{name}: a {type(value).__name__} cannot be checkpointed without pickle")


def _decode(value, tensors: dict[str, torch.Tensor]):
    if isinstance(value, dict):
        if "__tensor__" in value:
            return tensors[value["__tensor__"]]
        if "__items__" in value:
            return {key: _decode(item, tensors) for key, item in value["__items__"]}
        if "__tuple__" in value:
            return tuple(_decode(item, tensors) for item in value["__tuple__"])
        return {key: _decode(item, tensors) for key, item in value.items()}
    if isinstance(value, list):
        return [_decode(item, tensors) for item in value]
    return value
