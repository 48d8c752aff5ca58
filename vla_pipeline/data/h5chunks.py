"""Fast frame reads from the collector's gzip-chunked HDF5 image datasets.

h5py's automatic chunking splits a 720p episode into ~1,000 small chunks of a few frames
and one colour channel each; going through h5py, per-chunk bookkeeping costs more than
inflating. Here the raw chunks are read by byte offset and inflated with ISA-L (a
zlib-compatible inflater), then placed into the frame block. Anything other than plain
gzip chunks (shuffle, checksums, other codecs, unallocated chunks) is left to h5py.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
from isal import isal_zlib

FRAMES_PER_BLOCK = 16


def frame_blocks(dataset: h5py.Dataset, path: Path) -> Iterator[tuple[int, np.ndarray]]:
    """(first frame, frames) blocks covering the whole dataset, in order."""
    chunks = _plain_gzip_chunks(dataset)
    frames_per_chunk = dataset.chunks[0] if dataset.chunks else 1
    block = max(frames_per_chunk, FRAMES_PER_BLOCK // frames_per_chunk * frames_per_chunk)
    if chunks is None:
        # Blocks aligned to the chunks, so h5py inflates each chunk once.
        for start in range(0, dataset.shape[0], block):
            yield start, dataset[start : start + block]
        return
    by_first_frame = defaultdict(list)
    for chunk in chunks:
        by_first_frame[chunk.chunk_offset[0] // block * block].append(chunk)
    chunk_shape = dataset.chunks
    with open(path, "rb") as raw:
        for start in range(0, dataset.shape[0], block):
            frames = np.empty((min(block, dataset.shape[0] - start), *dataset.shape[1:]), dataset.dtype)
            for chunk in by_first_frame[start]:
                raw.seek(chunk.byte_offset)
                data = raw.read(chunk.size)
                if not chunk.filter_mask & 1:  # bit 0 set: the chunk was stored without gzip
                    data = isal_zlib.decompress(data)
                values = np.frombuffer(data, dataset.dtype).reshape(chunk_shape)
                offset = (chunk.chunk_offset[0] - start, *chunk.chunk_offset[1:])
                # Edge chunks are stored whole; keep the part inside the dataset.
                target = tuple(
                    slice(o, min(o + c, n)) for o, c, n in zip(offset, chunk_shape, frames.shape)
                )
                frames[target] = values[tuple(slice(0, s.stop - s.start) for s in target)]
            yield start, frames


def _plain_gzip_chunks(dataset: h5py.Dataset) -> list | None:
    """The dataset's chunk records when every chunk is allocated and only gzip-filtered."""
    if (
        dataset.chunks is None
        or dataset.compression != "gzip"
        or dataset.shuffle
        or dataset.fletcher32
        or dataset.scaleoffset is not None
        or dataset.dtype.itemsize != 1
        or dataset.id.get_create_plist().get_nfilters() != 1
    ):
        return None
    chunks: list = []
    try:
        dataset.id.chunk_iter(chunks.append)
    except (AttributeError, RuntimeError):  # HDF5 without chunk iteration
        return None
    expected = np.prod([-(-n // c) for n, c in zip(dataset.shape, dataset.chunks)])
    return chunks if len(chunks) == expected else None
