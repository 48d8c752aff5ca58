"""Reads a LeRobotDataset v3.0 with LeRobot's own loader, to prove the project's export with a tool it did not write.

Run by tests/test_lerobot.py with the interpreter of .venv-lerobot (LeRobot 0.4.4 on CPU torch, with the
torchvision stand-in of tests/lerobot_env; `make install` makes it):

    .venv-lerobot/bin/python tests/lerobot_load.py DATASET_DIR OUT.npz

Opens DATASET_DIR with `LeRobotDataset(repo_id=..., root=DATASET_DIR, video_backend="pyav")`, offline, with
LeRobot's defaults otherwise (its timestamp tolerance included), and reads every item, every frame of every
episode, through `dataset[i]`. Writes OUT.npz, one row per item in the dataset's order:
    frames uint8 (N, H, W, 3)   the dataset's one video key, LeRobot's float CHW in [0, 1] back to uint8 HWC
    actions float32 (N, 2), episode_index int64 (N,), frame_index int64 (N,), timestamp float32 (N,),
    tasks str (N,)
and prints one JSON line to stdout: {"episodes", "frames", "fps", "features" (feature keys), "episode_meta"
(per episode, the columns of LeRobot's episode metadata except "stats/...")}. Exits 2 unless the dataset
has exactly one video key.
"""

import contextlib
import json
import os
import sys
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"  # a local dataset only: never fall back to the Hub
# Dataset.from_parquet keeps an Arrow copy of the frame table in the datasets cache: a throwaway one.
_CACHE = tempfile.TemporaryDirectory(prefix="lerobot-load-")
os.environ.setdefault("HF_DATASETS_CACHE", _CACHE.name)

import numpy as np  # noqa: E402
from lerobot.datasets.lerobot_dataset import LeRobotDataset  # noqa: E402


def json_safe(value):
    if hasattr(value, "tolist"):  # NumPy arrays and scalars, torch tensors
        return value.tolist()
    if isinstance(value, dict):
        return {str(key): json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    root, out = sys.argv[1:3]
    # Whatever LeRobot or its libraries print goes to stderr: stdout carries the one JSON line.
    with contextlib.redirect_stdout(sys.stderr):
        dataset = LeRobotDataset(repo_id="local/vla-pipeline-export", root=root, video_backend="pyav")
        video_keys = list(dataset.meta.video_keys)
        if len(video_keys) != 1:
            print(f"lerobot_load.py: expected exactly one video key in {root}, found {video_keys}", file=sys.stderr)
            sys.exit(2)
        image_key = video_keys[0]
        columns = {name: [] for name in ("frames", "actions", "episode_index", "frame_index", "timestamp", "tasks")}
        for index in range(len(dataset)):
            item = dataset[index]
            chw = item[image_key]  # float32 (3, H, W) in [0, 1]
            columns["frames"].append((chw * 255).round().clamp(0, 255).byte().permute(1, 2, 0).numpy())
            columns["actions"].append(item["action"].numpy())
            columns["episode_index"].append(item["episode_index"].item())
            columns["frame_index"].append(item["frame_index"].item())
            columns["timestamp"].append(item["timestamp"].item())
            columns["tasks"].append(item["task"])
        episode_meta = [
            {key: json_safe(value) for key, value in dataset.meta.episodes[episode].items()
             if not key.startswith("stats/")}
            for episode in range(dataset.meta.total_episodes)
        ]
    np.savez(
        out,
        frames=np.stack(columns["frames"]).astype(np.uint8),
        actions=np.stack(columns["actions"]).astype(np.float32),
        episode_index=np.asarray(columns["episode_index"], dtype=np.int64),
        frame_index=np.asarray(columns["frame_index"], dtype=np.int64),
        timestamp=np.asarray(columns["timestamp"], dtype=np.float32),
        tasks=np.asarray(columns["tasks"], dtype=str),
    )
    print(json.dumps({
        "episodes": dataset.num_episodes,
        "frames": len(dataset),
        "fps": json_safe(dataset.fps),
        "features": list(dataset.features),
        "episode_meta": episode_meta,
    }))


if __name__ == "__main__":
    main()
