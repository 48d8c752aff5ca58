"""LeRobotDataset v3.0: the window store's episodes out as a dataset, and a dataset's episodes in.

Written with pyarrow and PyAV, not with the `lerobot` package: lerobot 0.4.x pins torch < 2.11 and
imports torchvision, which does not install beside this project's torch. The layout is the one
LeRobot 0.4.4 writes and reads (`codebase_version` "v3.0"); the tests load every export with
LeRobot's own `LeRobotDataset` and check it with `lerobot-doctor` (docs/data.md).

    OUT_DIR/
      meta/info.json                                  features, fps, paths, totals
      meta/stats.json                                 per-feature min/max/mean/std/count/quantiles
      meta/tasks.parquet                              task strings (the pandas index) -> task_index
      meta/episodes/chunk-000/file-NNN.parquet        one row per episode: lengths, file spans, stats, vla/*
      data/chunk-000/file-NNN.parquet                 one row per frame: action, timestamp, indices
      videos/observation.images.front/chunk-000/file-NNN.mp4   the frames, AV1, episodes back to back

`export_lerobot` writes a store's episodes: `observation.images.front` (video, the stored 224×224
or a chosen size), `action` float32 (linear_x, linear_y) in robot units, the instruction as the
task, and per episode its id, scenario, side and source file (`vla/*` columns of meta/episodes).
Each export adds a `file-NNN` of its own, so new episodes are appended without rewriting earlier
files; a changed or removed episode rewrites the dataset. It is built beside OUT_DIR and renamed
into place: a failure part-way leaves OUT_DIR as it was.

Timing: the robot captures one frame per key press (event-driven), so an episode's frames are
spaced by its own recorded duration over its frame count (`total_duration`, kept at ingest), or by
the nominal press of 0.4 s where the file did not record it. Timestamps are those spacings,
rounded to the millisecond; the video's timestamps are the same (a variable frame rate), and
info.json's `fps` is the median episode's rate (2.5 for the robot's 0.4 s presses: not a whole number).

`import_lerobot` reads a v3.0 dataset whose action holds a planar base velocity and writes each
episode as a collector file (the `observations/images` layout: RGB frames, `actions` (T, 3),
`language_instruction`), which the usual ingest then validates, resizes and stores.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import cv2
import h5py
import numpy as np

from .atomic import replace_directory
from .store import WindowStore

CODEBASE_VERSION = "v3.0"
VIDEO_KEY = "observation.images.front"
ACTION_NAMES = ["linear_x", "linear_y"]
NOMINAL_PRESS_S = 0.4  # the robot moves this long per key press, then stops by itself
VCODEC = "libsvtav1"  # LeRobot's own default; decoded by libdav1d
QUANTILES = {"q01": 0.01, "q10": 0.10, "q50": 0.50, "q90": 0.90, "q99": 0.99}
CHUNKS_SIZE = 1000
DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
VIDEO_PATH = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
EPISODES_PATH = "meta/episodes/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
INDEX_FEATURES = {
    "timestamp": {"dtype": "float32", "shape": [1], "names": None},
    "frame_index": {"dtype": "int64", "shape": [1], "names": None},
    "episode_index": {"dtype": "int64", "shape": [1], "names": None},
    "index": {"dtype": "int64", "shape": [1], "names": None},
    "task_index": {"dtype": "int64", "shape": [1], "names": None},
}
# Per-episode columns of meta/episodes that this project writes and reads back.
META_COLUMNS = ("episode_id", "scenario", "side", "source_file", "content_hash", "timing", "instruction_source",
                "simulator")


class LeRobotError(ValueError):
    """A dataset that cannot be written or read as asked; the text says why, in one line."""


@dataclass
class ExportReport:
    out_dir: Path
    mode: str  # "new", "append", "unchanged" or "rewrite"
    written: list[str] = field(default_factory=list)  # episode ids written by this export
    kept: int = 0  # episodes already in the dataset, left as they were
    frames: int = 0  # frames written by this export
    total_episodes: int = 0
    total_frames: int = 0
    fps: float = 0.0
    seconds: float = 0.0
    reason: str = ""  # why a rewrite


# --- export -------------------------------------------------------------------------------------

def _timestamps(num_frames: int, duration_s: float | None) -> tuple[np.ndarray, str]:
    """Frame times (s, millisecond-rounded, strictly increasing) and where the spacing came from."""
    period, timing = (duration_s / num_frames, "recorded") if duration_s else (NOMINAL_PRESS_S, "nominal")
    period = max(period, 0.001)
    return np.round(np.arange(num_frames) * period, 3), timing


def _feature_stats(values: np.ndarray, image: bool) -> dict[str, np.ndarray]:
    """LeRobot's per-episode statistics: vectors (T, D) -> (D,); images (T, H, W, 3) uint8 -> (3, 1, 1)
    in [0, 1] over at most 100 frames; count (1,)."""
    if image:
        picks = np.round(np.linspace(0, len(values) - 1, min(len(values), 100))).astype(int)
        flat, shape = (values[picks].astype(np.float64) / 255.0).reshape(-1, 3), (3, 1, 1)
    else:
        flat = values.reshape(len(values), -1).astype(np.float64)
        shape = (flat.shape[1],)
    stats = {"min": flat.min(0), "max": flat.max(0), "mean": flat.mean(0), "std": flat.std(0)}
    stats.update({name: np.quantile(flat, q, axis=0) for name, q in QUANTILES.items()})
    return {**{name: value.reshape(shape) for name, value in stats.items()}, "count": np.array([len(values)])}


def _aggregate(per_episode: list[dict[str, np.ndarray]]) -> dict[str, list]:
    """LeRobot's aggregation: count-weighted mean and quantiles, pooled variance."""
    means = np.stack([s["mean"] for s in per_episode])
    counts = np.stack([np.asarray(s["count"], np.float64) for s in per_episode])
    total = counts.sum(0)
    weights = counts.reshape(counts.shape[0], *([1] * (means.ndim - 1)))
    mean = (means * weights).sum(0) / total
    variance = np.stack([np.asarray(s["std"]) ** 2 for s in per_episode])
    out = {"min": np.min(np.stack([s["min"] for s in per_episode]), 0),
           "max": np.max(np.stack([s["max"] for s in per_episode]), 0), "mean": mean,
           "std": np.sqrt(((variance + (means - mean) ** 2) * weights).sum(0) / total),
           "count": total.astype(np.int64)}
    out.update({name: (np.stack([s[name] for s in per_episode]) * weights).sum(0) / total for name in QUANTILES})
    return {name: np.asarray(value).tolist() for name, value in out.items()}


def _write_video(path: Path, episodes: list[np.ndarray], times: list[np.ndarray]) -> list[tuple[float, float]]:
    """All `episodes` (RGB uint8 (T, H, W, 3)) back to back in one AV1 mp4 whose frame times are the episodes'
    own (millisecond time base). Returns each episode's (from, to) span in the file, seconds."""
    import av

    os.environ.setdefault("SVT_LOG", "1")  # the encoder's own banner and warnings: errors only
    path.parent.mkdir(parents=True, exist_ok=True)
    height, width = episodes[0].shape[1:3]
    base = Fraction(1, 1000)
    spans, offset_ms = [], 0
    gaps = np.concatenate([np.diff(stamps) for stamps in times if len(stamps) > 1] or [[NOMINAL_PRESS_S]])
    rate = int(np.clip(round(1 / max(float(np.median(gaps)), 1e-3)), 1, 240))  # the encoder's rate control only
    with av.open(str(path), "w", options={"movflags": "faststart"}) as container:
        stream = container.add_stream(VCODEC, rate=rate, options={"g": "2", "crf": "30", "preset": "11",
                                                                  "svtav1-params": "lp=1"})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.time_base = stream.codec_context.time_base = base
        for frames, stamps in zip(episodes, times):
            stamps_ms = np.round(stamps * 1000).astype(np.int64)
            last_ms = int(stamps_ms[-1]) + (int(stamps_ms[-1] - stamps_ms[-2]) if len(stamps_ms) > 1
                                            else round(NOMINAL_PRESS_S * 1000))
            for frame, stamp in zip(frames, stamps_ms):
                picture = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
                picture.pts, picture.time_base = offset_ms + int(stamp), base
                for packet in stream.encode(picture):
                    container.mux(packet)
            spans.append((offset_ms / 1000, (offset_ms + last_ms) / 1000))
            offset_ms += last_ms
        for packet in stream.encode():
            container.mux(packet)
    return spans


def _write_tasks(path: Path, tasks: list[str]) -> None:
    """meta/tasks.parquet: LeRobot reads it with pandas and looks tasks up by the index (the task strings)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pandas_meta = {
        "index_columns": ["__index_level_0__"],
        "column_indexes": [{"name": None, "field_name": None, "pandas_type": "unicode", "numpy_type": "object",
                            "metadata": {"encoding": "UTF-8"}}],
        "columns": [{"name": "task_index", "field_name": "task_index", "pandas_type": "int64", "numpy_type": "int64",
                     "metadata": None},
                    {"name": None, "field_name": "__index_level_0__", "pandas_type": "unicode",
                     "numpy_type": "object", "metadata": None}],
        "creator": {"library": "pyarrow", "version": pa.__version__}, "pandas_version": "2.2.0"}
    schema = pa.schema([("task_index", pa.int64()), ("__index_level_0__", pa.string())],
                       metadata={b"pandas": json.dumps(pandas_meta).encode()})
    pq.write_table(pa.table({"task_index": list(range(len(tasks))), "__index_level_0__": tasks}, schema=schema), path)


def _read_tasks(root: Path) -> list[str]:
    import pyarrow.parquet as pq

    table = pq.read_table(root / "meta" / "tasks.parquet").to_pydict()
    names = table.get("__index_level_0__") or table.get("task")
    if names is None:
        raise LeRobotError(f"{root}/meta/tasks.parquet holds no task strings")
    return [name for _, name in sorted(zip(table["task_index"], names))]


def _read_episodes(root: Path) -> list[dict]:
    import pyarrow.parquet as pq

    files = sorted((root / "meta" / "episodes").glob("chunk-*/file-*.parquet"))
    rows = [row for path in files for row in pq.read_table(path).to_pylist()]
    return sorted(rows, key=lambda row: row["episode_index"])


def _episode_row(record: dict, index: int, first: int, file_index: int, span, stats: dict) -> dict:
    row = {"episode_index": index, "tasks": [record["instruction"]], "length": record["num_frames"],
           "data/chunk_index": 0, "data/file_index": file_index,
           "dataset_from_index": first, "dataset_to_index": first + record["num_frames"],
           f"videos/{VIDEO_KEY}/chunk_index": 0, f"videos/{VIDEO_KEY}/file_index": file_index,
           f"videos/{VIDEO_KEY}/from_timestamp": float(span[0]), f"videos/{VIDEO_KEY}/to_timestamp": float(span[1])}
    for feature, values in stats.items():
        for name, value in values.items():
            row[f"stats/{feature}/{name}"] = np.asarray(value).tolist()
    row["meta/episodes/chunk_index"], row["meta/episodes/file_index"] = 0, file_index
    row.update({f"vla/{name}": (None if record.get(name) is None else str(record[name])) for name in META_COLUMNS})
    return row


def _plan(store: WindowStore, out_dir: Path, episode_ids: list[str]) -> tuple[str, list[dict], str, dict]:
    """('new' | 'append' | 'unchanged' | 'rewrite', the dataset's episode rows to keep, why a rewrite, the dataset's
    info.json as it is: empty for a new one)."""
    if not (out_dir / "meta" / "info.json").is_file():
        if out_dir.exists() and any(out_dir.iterdir()):
            raise LeRobotError(f"{out_dir} exists and is not a LeRobot dataset: choose an empty or new folder")
        return "new", [], "", {}
    try:
        info = json.loads((out_dir / "meta" / "info.json").read_text())
        rows = _read_episodes(out_dir)
    except (OSError, ValueError) as error:
        raise LeRobotError(f"{out_dir} holds an unreadable dataset ({error}); remove it or choose another folder")
    if info.get("codebase_version") != CODEBASE_VERSION or any("vla/episode_id" not in row for row in rows):
        raise LeRobotError(f"{out_dir} is a dataset this project did not write: choose an empty or new folder")
    wanted = set(episode_ids)
    for row in rows:
        if row["vla/episode_id"] not in wanted:
            return "rewrite", [], f"episode {row['vla/episode_id']} is no longer among those exported", info
        attrs = store.episode_attrs(row["vla/episode_id"])
        if attrs is None or attrs.get("content_hash") != row["vla/content_hash"]:
            return "rewrite", [], f"episode {row['vla/episode_id']} changed since it was exported", info
    if {row["vla/episode_id"] for row in rows} == wanted:
        return "unchanged", rows, "", info
    return "append", rows, "", info


def export_lerobot(store: WindowStore, out_dir: Path | str, episode_ids: list[str] | None = None,
                   size: int | None = None, robot_type: str = "omnidirectional_base",
                   progress: Callable[[str], None] | None = None) -> ExportReport:
    """Write (or extend) a LeRobotDataset v3.0 at `out_dir` from the store's episodes (all of them by default);
    see the module docstring. `size`: frames resized to size×size (default: as stored)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    started, say = time.perf_counter(), progress or (lambda line: None)
    out_dir = Path(out_dir)
    stored = store.episode_ids()
    episode_ids = list(stored if episode_ids is None else episode_ids)
    if missing := sorted(set(episode_ids) - set(stored)):
        raise LeRobotError(f"not in the store {store.path}: {', '.join(missing[:5])}"
                           + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    if not episode_ids:
        raise LeRobotError(f"no episodes to export: the store {store.path} holds none")
    if size is not None and not 16 <= size <= 4096:
        raise LeRobotError(f"size must be within 16–4096 pixels, not {size}")
    mode, kept_rows, reason, info = _plan(store, out_dir, episode_ids)
    if kept_rows and size is not None and info["features"][VIDEO_KEY]["shape"][0] != size:
        mode, kept_rows, reason = "rewrite", [], f"the frame size changes to {size}"
    report = ExportReport(out_dir, mode, reason=reason, kept=len(kept_rows))
    if mode == "unchanged":
        report.total_episodes, report.total_frames, report.fps = info["total_episodes"], info["total_frames"], info["fps"]
        report.seconds = time.perf_counter() - started
        return report
    if mode == "rewrite":
        say(f"rewriting {out_dir}: {reason}")
    done = {row["vla/episode_id"] for row in kept_rows}
    new_ids = [episode_id for episode_id in episode_ids if episode_id not in done]

    records, frames, times = [], [], []
    for number, episode_id in enumerate(new_ids, 1):
        attrs = store.episode_attrs(episode_id)
        group = store.open_episode(episode_id)
        images = np.asarray(group["images"][:])
        if size is not None and images.shape[1:3] != (size, size):
            images = np.stack([cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA) for image in images])
        stamps, timing = _timestamps(len(images), attrs.get("duration_s"))
        records.append({**attrs, "num_frames": len(images), "actions": np.asarray(group["actions"][:], np.float32),
                        "timing": timing})
        frames.append(images)
        times.append(stamps)
        if number % 50 == 0 or number == len(new_ids):
            say(f"read {number}/{len(new_ids)} episodes from the store")

    staging = out_dir.parent / f".{out_dir.name}.staging-{uuid.uuid4().hex[:8]}"
    try:
        if kept_rows:  # the earlier files, linked (never rewritten: each export writes files of its own)
            shutil.copytree(out_dir, staging, copy_function=os.link)
        (staging / "meta").mkdir(parents=True, exist_ok=True)
        file_index = 1 + max((row["data/file_index"] for row in kept_rows), default=-1)
        if file_index >= CHUNKS_SIZE:
            raise LeRobotError(f"{out_dir} has {file_index} exports appended; rewrite it (remove the folder)")
        first_episode = len(kept_rows)
        first_frame = sum(row["length"] for row in kept_rows)
        tasks = _read_tasks(out_dir) if kept_rows else []
        tasks += [task for task in dict.fromkeys(record["instruction"] for record in records) if task not in tasks]

        say(f"encoding {sum(len(f) for f in frames)} frames of {len(records)} episodes ({VCODEC})")
        video = staging / VIDEO_PATH.format(video_key=VIDEO_KEY, chunk_index=0, file_index=file_index)
        spans = _write_video(video, frames, times)

        rows, columns, position = [], {name: [] for name in ("action", "timestamp", "frame_index", "episode_index",
                                                             "index", "task_index")}, first_frame
        for offset, (record, images, stamps, span) in enumerate(zip(records, frames, times, spans)):
            count, index = record["num_frames"], first_episode + offset
            per_frame = {"timestamp": stamps.astype(np.float32), "frame_index": np.arange(count),
                         "episode_index": np.full(count, index), "index": np.arange(position, position + count),
                         "task_index": np.full(count, tasks.index(record["instruction"]))}
            columns["action"].append(record["actions"])
            for name, values in per_frame.items():
                columns[name].append(values)
            stats = {VIDEO_KEY: _feature_stats(images, True), "action": _feature_stats(record["actions"], False),
                     **{name: _feature_stats(values, False) for name, values in per_frame.items()}}
            rows.append(_episode_row(record, index, position, file_index, span, stats))
            position += count
        data = pa.table({
            "action": pa.FixedSizeListArray.from_arrays(pa.array(np.concatenate(columns["action"]).ravel(),
                                                                 pa.float32()), 2),
            "timestamp": pa.array(np.concatenate(columns["timestamp"]), pa.float32()),
            **{name: pa.array(np.concatenate(columns[name]).astype(np.int64), pa.int64())
               for name in ("frame_index", "episode_index", "index", "task_index")}})
        data_path = staging / DATA_PATH.format(chunk_index=0, file_index=file_index)
        data_path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(data, data_path, compression="snappy")
        episodes_path = staging / EPISODES_PATH.format(chunk_index=0, file_index=file_index)
        episodes_path.parent.mkdir(parents=True, exist_ok=True)
        table = pa.Table.from_pylist(rows)
        if kept_rows:  # one schema across the meta/episodes files
            schema = pq.read_schema(next((out_dir / "meta" / "episodes").glob("chunk-*/file-*.parquet")))
            table = table.select(schema.names).cast(schema)
        pq.write_table(table, episodes_path, compression="snappy")

        all_rows = kept_rows + rows
        for name in ("tasks.parquet", "stats.json", "info.json"):  # rewritten: unlink the linked copies first
            (staging / "meta" / name).unlink(missing_ok=True)
        _write_tasks(staging / "meta" / "tasks.parquet", tasks)
        stat_names = sorted({key.split("/")[1] for key in all_rows[0] if key.startswith("stats/")})
        stats = {feature: _aggregate([{name: np.asarray(row[f"stats/{feature}/{name}"])
                                       for name in [*QUANTILES, "min", "max", "mean", "std", "count"]}
                                      for row in all_rows]) for feature in stat_names}
        (staging / "meta" / "stats.json").write_text(json.dumps(stats, indent=2))
        rates = [row["length"] / (row[f"videos/{VIDEO_KEY}/to_timestamp"] - row[f"videos/{VIDEO_KEY}/from_timestamp"])
                 for row in all_rows]
        # the median episode's rate: 2.5 for the robot's 0.4 s presses (LeRobot's loader and lerobot-doctor take a
        # rate that is not a whole number; rounded to 2 or 3, every episode's interval would be 20% off it)
        fps = round(float(np.median(rates)), 2)
        fps = int(fps) if fps == int(fps) else fps
        height, width = frames[0].shape[1:3]
        info = {"codebase_version": CODEBASE_VERSION, "robot_type": robot_type,
                "total_episodes": len(all_rows), "total_frames": position, "total_tasks": len(tasks),
                "chunks_size": CHUNKS_SIZE, "data_files_size_in_mb": 100, "video_files_size_in_mb": 200, "fps": fps,
                "splits": {"train": f"0:{len(all_rows)}"}, "data_path": DATA_PATH, "video_path": VIDEO_PATH,
                "features": {
                    VIDEO_KEY: {"dtype": "video", "shape": [height, width, 3], "names": ["height", "width", "channels"],
                                "info": {"video.height": height, "video.width": width, "video.codec": "av1",
                                         "video.pix_fmt": "yuv420p", "video.is_depth_map": False, "video.fps": fps,
                                         "video.channels": 3, "has_audio": False}},
                    "action": {"dtype": "float32", "shape": [2], "names": ACTION_NAMES},
                    **INDEX_FEATURES}}
        (staging / "meta" / "info.json").write_text(json.dumps(info, indent=2))
        replace_directory(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    report.written = [record["episode_id"] for record in records]
    report.frames = sum(record["num_frames"] for record in records)
    report.total_episodes, report.total_frames, report.fps = len(all_rows), position, fps
    report.seconds = time.perf_counter() - started
    return report


# --- import -------------------------------------------------------------------------------------

@dataclass
class ImportReport:
    source: str
    camera: str
    action_keys: list[str]
    files: list[Path] = field(default_factory=list)  # the collector files written
    frames: int = 0
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)


def resolve_dataset(source: str) -> Path:
    """A local dataset folder, or a hub repo id looked up in the Hugging Face cache (or downloaded where the hub
    can be reached); LeRobotError saying which it could not find."""
    path = Path(source).expanduser()
    if path.exists():
        if not (path / "meta" / "info.json").is_file():
            raise LeRobotError(f"{path}: no meta/info.json, so not a LeRobot dataset folder")
        return path
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", source):
        raise LeRobotError(f"{source}: no such folder, and not a hub repo id (owner/name)")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=source, repo_type="dataset"))
    except Exception as error:  # offline, unknown repo, no access: one line, whatever the hub library raised
        raise LeRobotError(f"{source}: not a folder here, and the hub could not provide it "
                           f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})") from None


def _decode_episode(video: Path, start: float, stamps: np.ndarray) -> np.ndarray:
    """The frames shown at `start + stamps` (s) in `video`: each the frame whose time is nearest, which must be
    within half a millisecond (LeRobot's loader allows 0.1 ms), RGB uint8."""
    import av

    wanted = start + np.asarray(stamps, np.float64)
    found: list[tuple[float, np.ndarray]] = []
    with av.open(str(video)) as container:
        stream = container.streams.video[0]
        container.seek(int(max(0.0, wanted[0] - 0.001) / stream.time_base), stream=stream, backward=True)
        for frame in container.decode(stream):
            if frame.time is None or frame.time < wanted[0] - 0.0005:
                continue
            if frame.time > wanted[-1] + 0.0005:
                break
            found.append((frame.time, frame.to_ndarray(format="rgb24")))
    if not found:
        raise LeRobotError(f"{video.name}: no frames at {wanted[0]:.3f}–{wanted[-1]:.3f} s")
    found_times = np.array([t for t, _ in found])
    nearest = np.abs(found_times[None, :] - wanted[:, None]).argmin(1)
    gap = float(np.abs(found_times[nearest] - wanted).max())
    if gap > 0.0005:
        raise LeRobotError(f"{video.name}: no frame within 0.5 ms of every timestamp (off by {gap * 1000:.1f} ms)")
    return np.stack([found[i][1] for i in nearest])


def _file_name(row: dict, dataset: str) -> str:
    own = row.get("vla/episode_id")
    if own and re.fullmatch(r"[\w.-]+", own):
        return own
    return f"lerobot_{re.sub(r'[^A-Za-z0-9]+', '-', dataset).strip('-')}_{row['episode_index']:06d}"


def import_lerobot(source: str, out_dir: Path | str, action_keys: list[str], camera: str | None = None,
                   action_scale: float = 1.0, progress: Callable[[str], None] | None = None) -> ImportReport:
    """Each episode of the v3.0 dataset at `source` as a collector file in `out_dir` (see the module docstring).
    LeRobotError, before any file is written, for a missing key, a non-planar action or a missing camera."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    started, say = time.perf_counter(), progress or (lambda line: None)
    root = resolve_dataset(source)
    try:
        info = json.loads((root / "meta" / "info.json").read_text())
    except (OSError, ValueError) as error:
        raise LeRobotError(f"{root}/meta/info.json: unreadable ({error})") from None
    version = str(info.get("codebase_version", "?"))
    if not version.startswith("v3"):
        raise LeRobotError(f"{root} is a LeRobotDataset {version}; only v3.0 is read (LeRobot's "
                           "convert_dataset_v21_to_v30 converts older ones)")
    features = info.get("features", {})
    action = features.get("action")
    if action is None:
        raise LeRobotError(f"{root} has no 'action' feature (it has: {', '.join(sorted(features))})")
    names = action.get("names")
    if isinstance(names, dict):  # older datasets name the axes in a dict of lists
        names = next(iter(names.values()), None)
    shape = list(action.get("shape") or [])
    if len(shape) != 1 or not str(action.get("dtype", "")).startswith("float") or not names:
        raise LeRobotError(f"{root}: the action is {action.get('dtype')} {shape} without axis names; a planar "
                           "base velocity is a float vector whose axes are named")
    if len(action_keys) != 2:
        raise LeRobotError(f"--action-keys names {len(action_keys)} axes ({','.join(action_keys)}); a planar base "
                           "velocity is two: forward, then left (e.g. x.vel,y.vel)")
    if missing := [key for key in action_keys if key not in names]:
        raise LeRobotError(f"the action has no axis {', '.join(missing)} (its axes: {', '.join(map(str, names))})")
    columns = [names.index(key) for key in action_keys]
    cameras = sorted(key for key, value in features.items() if value.get("dtype") == "video")
    if camera is None:
        if len(cameras) != 1:
            raise LeRobotError(f"{root} has {len(cameras)} cameras ({', '.join(cameras) or 'none stored as video'}): "
                               "name one with --camera")
        camera = cameras[0]
    elif camera not in cameras:
        stored = features.get(camera, {}).get("dtype")
        raise LeRobotError(f"{root} has no camera {camera}" + (f" stored as video (it is {stored})" if stored else "")
                           + f"; its cameras: {', '.join(cameras) or 'none'}")
    rotation = [i for i, name in enumerate(names) if re.search(r"theta|yaw|angular|omega", str(name))]
    report = ImportReport(source, camera, list(action_keys))

    tasks = _read_tasks(root)
    episodes = _read_episodes(root)
    if not episodes:
        raise LeRobotError(f"{root} holds no episodes")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data_cache: dict[str, object] = {}
    dataset_name = root.name if Path(source).exists() else source
    for number, row in enumerate(episodes, 1):
        data_file = root / info["data_path"].format(chunk_index=row["data/chunk_index"],
                                                   file_index=row["data/file_index"])
        if str(data_file) not in data_cache:
            data_cache.clear()
            data_cache[str(data_file)] = pq.read_table(data_file)
        table = data_cache[str(data_file)]
        frames_of = table.filter(pc.equal(table["episode_index"], row["episode_index"])).sort_by("frame_index")
        values = np.asarray(frames_of["action"].to_pylist(), np.float64).reshape(frames_of.num_rows, -1)
        stamps = np.asarray(frames_of["timestamp"].to_pylist(), np.float64)
        task_ids = frames_of["task_index"].to_pylist()
        instruction = tasks[task_ids[0]] if task_ids else (row.get("tasks") or [""])[0]
        if len(set(task_ids)) > 1:
            report.warnings.append(f"episode {row['episode_index']}: {len(set(task_ids))} tasks; the first is its "
                                   "instruction")
        video = root / info["video_path"].format(video_key=camera, chunk_index=row[f"videos/{camera}/chunk_index"],
                                                 file_index=row[f"videos/{camera}/file_index"])
        images = _decode_episode(video, float(row[f"videos/{camera}/from_timestamp"]), stamps)
        actions = np.zeros((len(values), 3), np.float32)
        actions[:, :2] = values[:, columns] * action_scale
        if rotation:
            actions[:, 2] = values[:, rotation[0]] * action_scale
        name = _file_name(row, dataset_name)
        path = out_dir / f"{name}.h5"
        temporary = out_dir / f".{name}.{uuid.uuid4().hex[:8]}.h5"  # hidden: the drop folder ignores it
        period = float(np.median(np.diff(stamps))) if len(stamps) > 1 else 1 / max(float(info.get("fps") or 1), 1e-3)
        try:
            with h5py.File(temporary, "w") as h5:
                h5.create_dataset("observations/images", data=images, compression="gzip", chunks=True)
                h5.create_dataset("actions", data=actions, compression="gzip", chunks=True)
                h5.create_dataset("language_instruction", data=np.array([instruction.encode()]))
                h5.attrs.update({"total_duration": float(stamps[-1] + period) if len(stamps) else 0.0,
                                 "num_frames": len(images), "lerobot_dataset": dataset_name,
                                 "lerobot_episode_index": int(row["episode_index"])})
                for key in ("scenario", "simulator"):
                    if row.get(f"vla/{key}"):
                        h5.attrs[key] = row[f"vla/{key}"]
            os.replace(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)
        report.files.append(path)
        report.frames += len(images)
        if number % 25 == 0 or number == len(episodes):
            say(f"converted {number}/{len(episodes)} episodes ({report.frames} frames) into {out_dir}")
    report.seconds = time.perf_counter() - started
    return report
