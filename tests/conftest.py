"""Small episode files in the collector's layouts, written by the tests themselves."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

GOOD_NAME = "episode_20250614_101502_1box_hori_left_core_medium"


def write_episode_file(
    path: Path,
    *,
    frames: int = 18,
    height: int = 72,
    width: int = 128,
    layout: str = "legacy",
    images: np.ndarray | None = None,
    actions: np.ndarray | None = None,
    instruction: str | None = None,
    seed: int = 0,
    extra=None,
) -> Path:
    """A valid episode unless overridden; `extra(h5)` may add or damage anything."""
    rng = np.random.default_rng(seed)
    if actions is not None:
        frames = len(actions)
    if images is None:
        images = rng.integers(0, 256, (frames, height, width, 3), dtype=np.uint8)
    if actions is None:
        keys = rng.choice([0, 1, 2], size=frames)
        actions = np.zeros((frames, 3), np.float32)
        actions[keys == 1, 0] = 1.15
        actions[keys == 2, 1] = -1.15
        actions[0] = 0
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as h5:
        name = "images" if layout == "legacy" else "observations/images"
        h5.create_dataset(name, data=images, compression="gzip", chunks=True)
        h5.create_dataset("actions", data=actions)
        if layout == "legacy":
            events = ["episode_start"] + ["start_action"] * (len(actions) - 1)
            h5.create_dataset("action_event_types", data=events, dtype=h5py.string_dtype("utf-8"))
            h5.attrs["num_frames"] = len(actions)
            h5.attrs["action_chunk_size"] = 8
        else:
            h5.attrs["scenario"] = "1box_hori_left_core_medium"
        if instruction is not None:
            h5.create_dataset("language_instruction", data=np.array([instruction.encode()]))
        if extra is not None:
            extra(h5)
    return path


@pytest.fixture
def episode_dir(tmp_path) -> Path:
    folder = tmp_path / "episodes"
    folder.mkdir()
    return folder


@pytest.fixture(scope="session")
def tiny_backbone_path(tmp_path_factory) -> Path:
    """A tiny Kosmos-2 written with save_pretrained, loaded back through from_pretrained."""
    from vla_pipeline.policy.model import save_tiny_backbone

    return save_tiny_backbone(tmp_path_factory.mktemp("kosmos2-tiny"))


def scripted_actions(side: str = "left", frames: int = 18) -> np.ndarray:
    """The collector's key guide for going around an obstacle on `side`: W W W, A A, W W, D D, then W."""
    x, y = 1.15, 1.15 if side == "left" else -1.15
    keys = [(0, 0), (x, 0), (x, 0), (x, 0), (0, y), (0, y), (x, 0), (x, 0), (0, -y), (0, -y)]
    keys += [(x, 0)] * (frames - len(keys))
    actions = np.zeros((frames, 3), np.float32)
    actions[:, :2] = keys[:frames]
    return actions
