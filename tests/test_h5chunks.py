"""Direct gzip chunk reads give exactly what h5py gives, and defer to h5py otherwise."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from vla_pipeline.data.h5chunks import _plain_gzip_chunks, frame_blocks


@pytest.mark.parametrize(
    "options, direct",
    [
        ({"compression": "gzip", "chunks": True}, True),  # the collector's setting
        ({"compression": "gzip", "compression_opts": 9, "chunks": (4, 16, 16, 3)}, True),
        ({"compression": "gzip", "chunks": (5, 33, 47, 1)}, True),  # edge chunks on every axis
        ({"compression": "gzip", "shuffle": True, "chunks": True}, False),
        ({"compression": "gzip", "fletcher32": True, "chunks": True}, False),
        ({"compression": "lzf", "chunks": True}, False),
        ({"chunks": True}, False),
        ({}, False),  # contiguous
    ],
)
def test_same_frames_as_h5py(tmp_path, options, direct):
    frames = np.random.default_rng(0).integers(0, 256, (37, 70, 130, 3), dtype=np.uint8)
    path = tmp_path / "episode.h5"
    with h5py.File(path, "w") as h5:
        h5.create_dataset("images", data=frames, **options)
    with h5py.File(path) as h5:
        dataset = h5["images"]
        assert (_plain_gzip_chunks(dataset) is not None) is direct
        starts, blocks = zip(*frame_blocks(dataset, path))
    assert starts[0] == 0 and list(starts) == sorted(starts)
    np.testing.assert_array_equal(np.concatenate(blocks), frames)


def test_unallocated_chunks_are_left_to_h5py(tmp_path):
    path = tmp_path / "episode.h5"
    with h5py.File(path, "w") as h5:
        dataset = h5.create_dataset("images", shape=(8, 16, 16, 3), dtype=np.uint8, compression="gzip",
                                    chunks=(2, 16, 16, 3))
        dataset[:2] = 9  # frames 2–7 never written: no chunks on disk, h5py fills them
    with h5py.File(path) as h5:
        assert _plain_gzip_chunks(h5["images"]) is None
        frames = np.concatenate([block for _, block in frame_blocks(h5["images"], path)])
    assert frames[:2].min() == 9 and frames[2:].max() == 0
