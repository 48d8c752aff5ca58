"""The sample generator writes the collector's exact layouts, deterministically."""

from __future__ import annotations

import hashlib

import h5py
import numpy as np

from vla_pipeline.data.episodes import inspect_episode, read_frames
from vla_pipeline.data.schema import ACTION_SCALE, parse_scenario
from vla_pipeline.sim.operator import write_sample_episodes
from vla_pipeline.sim import varied
from vla_pipeline.sim.scene import WORLD_ID


def test_layouts_names_and_values(tmp_path):
    paths = write_sample_episodes(tmp_path, 6, seed=4, height=96, width=128)
    assert [p.name for p in paths] == sorted(p.name for p in paths)
    sides = [parse_scenario(p.stem).side for p in paths]
    assert sides.count("left") == sides.count("right") == 3
    layouts = set()
    for path in paths:
        with h5py.File(path) as h5:
            layout = "images" if "images" in h5 else "observations/images"
            layouts.add(layout)
            images = h5[layout]
            assert images.dtype == np.uint8 and images.shape[1:] == (96, 128, 3)
            assert images.compression == "gzip"
            actions = h5["actions"][()]
            assert actions.dtype == np.float32 and actions.shape == (images.shape[0], 3)
            magnitudes = np.abs(actions.astype(np.float64))
            assert np.all(np.isclose(magnitudes, 0) | np.isclose(magnitudes, ACTION_SCALE))
            assert not actions[0].any()
            if layout == "images":
                events = [e.decode() for e in h5["action_event_types"][()]]
                assert events[0] == "episode_start" and set(events[1:]) <= {"start_action", "stop_action"}
                for attr in ("episode_name", "total_duration", "num_frames", "action_chunk_size",
                             "obstacle_layout_type", "time_period", "collection_datetime"):
                    assert attr in h5.attrs
                assert "fps" not in h5.attrs
            else:
                assert "basket_" in path.name and {"scenario", "pattern", "distance"} <= set(h5.attrs)
                assert h5["language_instruction"].dtype.kind == "S"
    assert layouts == {"images", "observations/images"}


def test_deterministic_for_a_seed(tmp_path):
    first = write_sample_episodes(tmp_path / "a", 2, seed=7, height=64, width=96)
    second = write_sample_episodes(tmp_path / "b", 2, seed=7, height=64, width=96)
    other = write_sample_episodes(tmp_path / "c", 2, seed=8, height=64, width=96)
    for a, b, c in zip(first, second, other):
        assert a.name == b.name
        with h5py.File(a) as ha, h5py.File(b) as hb, h5py.File(c) as hc:
            assert np.array_equal(ha["images"][()], hb["images"][()])
            assert np.array_equal(ha["actions"][()], hb["actions"][()])
            assert not np.array_equal(ha["images"][()], hc["images"][()])


def test_obstacle_is_red_after_conversion(tmp_path):
    """The obstacle is drawn red; in the store (RGB) red must dominate where it stands."""
    path = write_sample_episodes(tmp_path, 1, seed=0, height=180, width=320)[0]
    frames = read_frames(inspect_episode(path)).astype(int)
    red = (frames[..., 0] > 150) & (frames[..., 1] < 80) & (frames[..., 2] < 80)
    blue = (frames[..., 2] > 150) & (frames[..., 0] < 80) & (frames[..., 1] < 80)
    assert red.sum() > 10 * max(blue.sum(), 1)


def contents_digest(paths) -> str:
    """sha256 over every file's name, datasets and attrs; h5py's file bytes embed timestamps."""
    digest = hashlib.sha256()

    def add(name, obj):
        if isinstance(obj, h5py.Dataset):
            data = obj[()]
            digest.update(f"{name} {obj.dtype} {obj.shape}".encode())
            # Variable-length strings come back as an object array, whose raw bytes are pointers.
            digest.update(b"\0".join(data.tolist()) if data.dtype.kind == "O" else data.tobytes())

    for path in sorted(paths):
        digest.update(path.name.encode())
        with h5py.File(path) as h5:
            h5.visititems(add)
            for key in sorted(set(h5.attrs) - {"simulator"}):  # the one attr added since (checked below)
                value = h5.attrs[key]
                digest.update(key.encode())
                digest.update(value.encode() if isinstance(value, str) else np.asarray(value).tobytes())
    return digest.hexdigest()


# Computed on the generator before it moved into the sim stage: moving or reusing its code must
# leave every pixel, action and attr of the sample episodes as it was.
GOLDEN_SAMPLES_SHA256 = "6acf0a622cf804daeaa05efda2c17d9c6bcf9f80b3aa428badd88041c5c76d8b"


def test_samples_match_the_golden_digest(tmp_path):
    """BoxNav-v0's samples, which stores written before BoxNav-v1 hold, are still written alike."""
    paths = write_sample_episodes(tmp_path, 7, seed=3, height=90, width=160, world=WORLD_ID)
    assert contents_digest(paths) == GOLDEN_SAMPLES_SHA256
    for path in paths:  # every sample names the world that rendered it, where a policy can be driven
        with h5py.File(path) as h5:
            assert h5.attrs["simulator"] == WORLD_ID


def test_samples_come_from_the_world_that_needs_sight(tmp_path):
    """By default the operator drives BoxNav-v1: each episode at least the collector's 18 frames,
    ending with its stop press (a zero action) and no stop before it; the keys move the robot by
    whole presses."""
    paths = write_sample_episodes(tmp_path, 12, seed=2, height=48, width=64)
    lengths = []
    for path in paths:
        with h5py.File(path) as h5:
            assert h5.attrs["simulator"] == varied.WORLD_ID
            actions = h5["actions"][()]
            lengths.append(len(actions))
            assert not actions[-1].any() and np.abs(actions[1:-1, :2]).max(axis=1).min() > 0
            if "action_event_types" in h5:
                events = [e.decode() for e in h5["action_event_types"][()]]
                assert events[-1] == "stop_action" and "stop_action" not in events[:-1]
    assert min(lengths) >= 18 and max(lengths) > 18  # longer where the scene asks for it
