"""Codec and chunk choice for the store's images: size and random-window read speed, against
the store's layout (no codec, FRAMES_PER_CHUNK frames a chunk, one shard per episode).

    .venv/bin/python benchmarks/store_codecs.py [--episodes DIR] [--n 6] [--reads 300] [--sensor-noise 3]

Frames come from real files when --episodes is given (resized exactly as ingest does), else
from sample episodes. Every figure is a ratio against the uncompressed layout measured in
the same run; "none, 1-frame chunks" is the layout stores had before FRAMES_PER_CHUNK.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BloscCodec, ZstdCodec

from vla_pipeline.data.episodes import EpisodeRejected, inspect_episode, read_frames
from vla_pipeline.data.store import FRAMES_PER_CHUNK
from vla_pipeline.sim.operator import write_sample_episodes

CODECS = {  # name: (codec, frames a chunk)
    "none": (None, FRAMES_PER_CHUNK),
    "none, 1-frame chunks": (None, 1),
    "blosc-lz4-1-bitshuffle": (BloscCodec(cname="lz4", clevel=1, shuffle="bitshuffle"), FRAMES_PER_CHUNK),
    "blosc-zstd-3-shuffle": (BloscCodec(cname="zstd", clevel=3, shuffle="shuffle"), FRAMES_PER_CHUNK),
    "zstd-3": (ZstdCodec(level=3), FRAMES_PER_CHUNK),
}


def load_frames(folder: Path, limit: int) -> list[np.ndarray]:
    episodes = []
    for path in sorted(folder.glob("*.h5")):
        try:
            episodes.append(read_frames(inspect_episode(path)))
        except EpisodeRejected:
            continue
        if len(episodes) == limit:
            break
    return episodes


def measure(episodes, codec, frames_per_chunk: int, root: Path, reads: int, window: int, rng) -> tuple[int, float]:
    group = zarr.open_group(root, mode="w")
    for index, frames in enumerate(episodes):
        shard = -(-len(frames) // frames_per_chunk) * frames_per_chunk
        group.create_array(f"e{index}", data=frames, chunks=(frames_per_chunk, *frames.shape[1:]),
                           shards=(shard, *frames.shape[1:]), compressors=codec)
    size = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
    arrays = [zarr.open_array(root / f"e{i}", mode="r") for i in range(len(episodes))]
    picks = [(int(rng.integers(len(arrays))), 0) for _ in range(reads)]
    picks = [(i, int(rng.integers(arrays[i].shape[0] - window + 1))) for i, _ in picks]
    started = time.perf_counter()
    for index, start in picks:
        arrays[index][start : start + window]
    return size, reads / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--episodes", type=Path)
    parser.add_argument("--n", type=int, default=6)
    parser.add_argument("--reads", type=int, default=300)
    parser.add_argument("--window", type=int, default=8)
    parser.add_argument("--sensor-noise", type=float, default=0.0,
                        help="add Gaussian noise of this std (grey levels), like a real camera's")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        folder = args.episodes or Path(scratch) / "episodes"
        if args.episodes is None:
            write_sample_episodes(folder, args.n, seed=0)
        episodes = load_frames(folder, args.n)
        if args.sensor_noise:
            rng = np.random.default_rng(1)
            episodes = [np.clip(e + rng.normal(0, args.sensor_noise, e.shape), 0, 255).astype(np.uint8)
                        for e in episodes]
        print(f"{len(episodes)} episodes from {'given files' if args.episodes else 'samples'}"
              f"{f' + sensor noise σ={args.sensor_noise:g}' if args.sensor_noise else ''}, "
              f"{args.reads} random windows of {args.window} frames")
        results = {name: measure(episodes, codec, chunk, Path(scratch) / name.replace(" ", "_"), args.reads, args.window,
                                 np.random.default_rng(0))
                   for name, (codec, chunk) in CODECS.items()}
    base_size, base_speed = results["none"]
    print(f"{'codec':<22}{'size':>10}{'windows/s':>12}{'size vs none':>14}{'speed vs none':>15}")
    for name, (size, speed) in results.items():
        print(f"{name:<22}{size / 2**20:>8.1f}MB{speed:>12.0f}{size / base_size:>13.2f}x{speed / base_speed:>14.2f}x")


if __name__ == "__main__":
    main()
