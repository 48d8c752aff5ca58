"""Data contracts on a stored episode: run after every write, shown as asset checks."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from .frames import model_frame
from .schema import EVENT_TYPES, window_starts
from .store import WindowStore


def schema_problems(store: WindowStore, episode_id: str, max_abs_action: float) -> list[str]:
    """Shapes, dtypes, value ranges and window starts of a stored episode; empty when sound."""
    group = store.open_episode(episode_id)
    attrs = dict(group.attrs)
    size = attrs["image_size"]
    images, actions, events = group["images"], group["actions"], group["event_types"]
    num_frames = attrs["num_frames"]
    problems = []
    if images.shape != (num_frames, size, size, 3) or images.dtype != np.uint8:
        problems.append(f"images is {images.shape} {images.dtype}, expected ({num_frames},{size},{size},3) uint8")
    if actions.shape != (num_frames, 2) or actions.dtype != np.float32:
        problems.append(f"actions is {actions.shape} {actions.dtype}, expected ({num_frames},2) float32")
    values = actions[:]
    if not np.isfinite(values).all():
        problems.append("actions has non-finite values")
    elif np.abs(values).max(initial=0) > max_abs_action:
        problems.append(f"actions exceed ±{max_abs_action:g}")
    if events.shape != (num_frames,):
        problems.append(f"event_types has {events.shape[0]} entries for {num_frames} frames")
    unknown = sorted(set(events[:].tolist()) - set(EVENT_TYPES))
    if unknown:
        problems.append(f"unknown event types {unknown}")
    if attrs["window_starts"] != window_starts(num_frames, attrs["window"], attrs["chunk"]):
        problems.append("window_starts do not match the episode length")
    if not attrs["window_starts"]:
        problems.append("no complete training window")
    return problems


def colour_error(store: WindowStore, episode_id: str) -> dict:
    """Compare stored frame 0 with the source frame read back as RGB and as channel-swapped.

    The store holds RGB; a BGR source read as RGB (the old loaders' bug) would match the
    swapped reading better. Returns mean absolute errors of both readings.
    """
    attrs = store.episode_attrs(episode_id)
    source = Path(attrs["source_file"])
    if not source.is_file():
        return {"skipped": f"source {source} is no longer present"}
    with h5py.File(source, "r") as h5:
        frame = h5[attrs["source_layout"]][0]
    size = attrs["image_size"]
    as_rgb = model_frame(frame, attrs["source_colour_order"], size).astype(np.float32)
    stored = store.open_episode(episode_id)["images"][0].astype(np.float32)
    return {
        "error_as_rgb": float(np.abs(stored - as_rgb).mean()),
        "error_channel_swapped": float(np.abs(stored - as_rgb[..., ::-1]).mean()),
    }


def colour_order_ok(errors: dict) -> bool:
    if "skipped" in errors:
        return True
    return errors["error_as_rgb"] < 1.0 and errors["error_as_rgb"] <= errors["error_channel_swapped"]
