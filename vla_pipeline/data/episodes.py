"""Reading and validating the collector's HDF5 episodes.

Two layouts exist: the original one (`images`, BGR) and a later one
(`observations/images`, RGB). Every problem a user can fix is raised as
`EpisodeRejected` with a message naming the file, the field and the fix.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import xxhash

from .frames import model_frame
from .h5chunks import frame_blocks
from .schema import IMAGE_SIZE, Scenario, parse_scenario, side_of_instruction

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
IMAGE_DATASETS = {"images": "BGR", "observations/images": "RGB"}


class EpisodeRejected(Exception):
    """A file that must not reach the store; `reason` says why and what to do."""

    def __init__(self, path: Path | str, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path.name}: {reason}")


@dataclass(frozen=True)
class ValidationRules:
    """What an acceptable episode looks like; defaults suit the seeds' window 8, chunk 10."""

    window: int = 8
    chunk: int = 10
    max_abs_action: float = 1.2
    min_frames: int | None = None  # None: window + chunk
    # A frame whose resized pixels vary less than this (std, grey levels) is blank.
    blank_std: float = 1.0

    @property
    def required_frames(self) -> int:
        return self.min_frames if self.min_frames is not None else self.window + self.chunk


@dataclass
class EpisodeHeader:
    """Everything about an episode except its decoded images."""

    episode_id: str
    path: Path
    image_dataset: str
    colour_order: str
    num_frames: int
    height: int
    width: int
    actions: np.ndarray  # (T, 3) float32, raw units
    event_types: list[str]
    instruction: str
    instruction_source: str  # "file" or "scenario"
    scenario: Scenario | None
    side: str | None
    size_bytes: int
    content_hash: str
    warnings: list[str] = field(default_factory=list)
    simulator: str | None = None  # the simulated world that rendered it (sample episodes), None for the robot's
    duration_s: float | None = None  # the collector's total_duration attr: the episode's own timing, where recorded

    def summary(self) -> dict:
        """JSON-safe description used as store attrs and asset metadata."""
        return {
            "episode_id": self.episode_id,
            "source_file": str(self.path),
            "source_layout": self.image_dataset,
            "source_colour_order": self.colour_order,
            "source_resolution": [self.height, self.width],
            "num_frames": self.num_frames,
            "instruction": self.instruction,
            "instruction_source": self.instruction_source,
            "scenario": self.scenario.name if self.scenario else None,
            "side": self.side,
            "size_bytes": self.size_bytes,
            "content_hash": self.content_hash,
            "warnings": list(self.warnings),
            "simulator": self.simulator,
            "duration_s": self.duration_s,
        }


def content_hash(path: Path | str) -> str:
    digest = xxhash.xxh3_128()
    with open(path, "rb") as handle:
        while block := handle.read(8 << 20):
            digest.update(block)
    return digest.hexdigest()


def frame_ranges(indices) -> str:
    """'3–4, 9' for frames [3, 4, 9]."""
    indices = sorted(int(i) for i in indices)
    parts, start = [], None
    for pos, index in enumerate(indices):
        if start is None:
            start = index
        if pos + 1 == len(indices) or indices[pos + 1] != index + 1:
            parts.append(str(start) if start == index else f"{start}–{index}")
            start = None
    return ", ".join(parts)


def inspect_episode(
    path: Path | str, rules: ValidationRules = ValidationRules(), digest: str | None = None
) -> EpisodeHeader:
    """Open and validate everything but the pixels; raises EpisodeRejected.

    `digest` is the file's content hash when the caller already computed it.
    """
    path = Path(path)
    _check_container(path)
    try:
        with h5py.File(path, "r") as h5:
            return _read_header(path, h5, rules, digest or content_hash(path))
    except EpisodeRejected:
        raise
    except Exception as error:  # h5py raises OSError/KeyError/RuntimeError on damaged files
        raise EpisodeRejected(path, _damage_reason(error)) from error


def _damage_reason(error: Exception) -> str:
    sizes = re.search(r"truncated file: eof = (\d+).*stored_eof = (\d+)", str(error))
    if sizes:
        present, expected = (int(n) for n in sizes.groups())
        return (
            f"truncated HDF5 file: {present:,} of {expected:,} bytes present "
            "(copy interrupted?); re-copy it from the robot"
        )
    return f"file is damaged or truncated ({error}); re-copy it from the robot"


def _check_container(path: Path) -> None:
    if not path.is_file():
        raise EpisodeRejected(path, "file not found; it was moved or deleted")
    if os.path.getsize(path) == 0:
        raise EpisodeRejected(path, "file is empty (0 bytes); re-copy it from the robot")
    with open(path, "rb") as handle:
        head = handle.read(8)
    if not h5py.is_hdf5(path):
        kind = "truncated HDF5 file" if head == HDF5_SIGNATURE else "not an HDF5 file"
        raise EpisodeRejected(path, f"{kind}; re-export the episode with the collector")


def _read_header(path: Path, h5: h5py.File, rules: ValidationRules, digest: str) -> EpisodeHeader:
    image_dataset = next((name for name in IMAGE_DATASETS if name in h5), None)
    if image_dataset is None:
        raise EpisodeRejected(
            path, "missing images: expected dataset 'images' (BGR) or 'observations/images' (RGB)"
        )
    images = h5[image_dataset]
    if not isinstance(images, h5py.Dataset):
        raise EpisodeRejected(path, f"{image_dataset} is a group, expected a (T,H,W,3) dataset")
    if images.ndim != 4 or images.shape[-1] != 3:
        raise EpisodeRejected(
            path, f"{image_dataset} has shape {images.shape}; expected rank 4 (T,H,W,3) colour frames"
        )
    if images.dtype != np.uint8:
        raise EpisodeRejected(path, f"{image_dataset} has dtype {images.dtype}; expected uint8")
    num_frames, height, width = (int(n) for n in images.shape[:3])
    if height < 8 or width < 8:
        raise EpisodeRejected(path, f"{image_dataset} frames are {height}×{width}; too small to use")

    actions = _read_actions(path, h5, num_frames, rules)
    event_types = _read_event_types(path, h5, num_frames)

    if num_frames < rules.required_frames:
        raise EpisodeRejected(
            path,
            f"only {num_frames} frames; a training window needs {rules.required_frames} "
            f"(window {rules.window} + chunk {rules.chunk}); record a longer episode "
            "or lower min_frames",
        )

    episode_id = path.stem
    scenario = parse_scenario(episode_id) or parse_scenario(str(h5.attrs.get("scenario", "") or ""))
    instruction = _read_instruction(h5)
    instruction_source = "file"
    if instruction is None:
        if scenario is None:
            raise EpisodeRejected(
                path,
                "no language_instruction and no scenario in the name (expected e.g. "
                "'..._1box_hori_left_core_medium.h5'); rename the file or add the instruction",
            )
        instruction, instruction_source = scenario.instruction(), "scenario"
    side = scenario.side if scenario else side_of_instruction(instruction)

    warnings = []
    declared = h5.attrs.get("num_frames")
    if declared is not None and int(np.asarray(declared).ravel()[0]) != num_frames:
        warnings.append(f"attr num_frames={int(declared)} but {num_frames} frames stored")
    if np.any(actions[:, 2] != 0):
        warnings.append("angular_z is non-zero in some frames; the policy ignores it")
    return EpisodeHeader(
        episode_id=episode_id,
        path=path,
        image_dataset=image_dataset,
        colour_order=IMAGE_DATASETS[image_dataset],
        num_frames=num_frames,
        height=height,
        width=width,
        actions=actions,
        event_types=event_types,
        instruction=instruction,
        instruction_source=instruction_source,
        scenario=scenario,
        side=side,
        size_bytes=os.path.getsize(path),
        content_hash=digest,
        warnings=warnings,
        simulator=_text_attr(h5, "simulator"),
        duration_s=_duration_attr(h5),
    )


def _duration_attr(h5: h5py.File) -> float | None:
    """The collector's `total_duration` (seconds) where it is a positive finite number, else None."""
    try:
        value = float(np.asarray(h5.attrs.get("total_duration")).ravel()[0])
    except (TypeError, ValueError, IndexError):
        return None
    return value if np.isfinite(value) and value > 0 else None


def _text_attr(h5: h5py.File, name: str) -> str | None:
    value = h5.attrs.get(name)
    return (_text(value) or None) if isinstance(value, str | bytes | np.bytes_) else None


def _read_actions(path: Path, h5: h5py.File, num_frames: int, rules: ValidationRules) -> np.ndarray:
    if "actions" not in h5 or not isinstance(h5["actions"], h5py.Dataset):
        raise EpisodeRejected(path, "missing actions: expected dataset 'actions' (T,3) float32")
    dataset = h5["actions"]
    if dataset.ndim != 2 or dataset.shape[1] < 2:
        raise EpisodeRejected(
            path, f"actions has shape {dataset.shape}; expected (T,3) [linear_x, linear_y, angular_z]"
        )
    if dataset.dtype.kind != "f":
        raise EpisodeRejected(path, f"actions has dtype {dataset.dtype}; expected float32")
    if dataset.shape[0] != num_frames:
        raise EpisodeRejected(
            path,
            f"frame count mismatch: images has {num_frames} frames but actions has "
            f"{dataset.shape[0]}; one action per frame is required",
        )
    values = dataset[()].astype(np.float64)
    for name, bad in (("NaN", np.isnan(values)), ("inf", np.isinf(values))):
        frames = np.flatnonzero(bad.any(axis=1))
        if frames.size:
            raise EpisodeRejected(path, f"actions has {name} at frames {frame_ranges(frames)}")
    actions = np.zeros((num_frames, 3), np.float32)
    actions[:, : min(3, values.shape[1])] = values[:, :3]
    too_large = np.flatnonzero((np.abs(actions) > rules.max_abs_action).any(axis=1))
    if too_large.size:
        peak = float(np.abs(actions).max())
        raise EpisodeRejected(
            path,
            f"actions exceed ±{rules.max_abs_action:g} at frames {frame_ranges(too_large)} "
            f"(max |value| {peak:g}); the robot commands 0 or ±1.15, "
            "check the units or raise max_abs_action",
        )
    return actions


def _read_event_types(path: Path, h5: h5py.File, num_frames: int) -> list[str]:
    if "action_event_types" not in h5:
        # The later collector writes none: frame 0 starts the episode, each other frame is a key press.
        return ["episode_start"] + ["start_action"] * (num_frames - 1)
    raw = np.asarray(h5["action_event_types"][()]).ravel()
    if raw.shape[0] != num_frames:
        raise EpisodeRejected(
            path,
            f"frame count mismatch: images has {num_frames} frames but action_event_types "
            f"has {raw.shape[0]}",
        )
    return [_text(value) for value in raw]


def _read_instruction(h5: h5py.File) -> str | None:
    if "language_instruction" not in h5:
        return None
    values = np.asarray(h5["language_instruction"][()]).ravel()
    text = _text(values[0]) if values.size else ""
    return text or None


def _text(value) -> str:
    if isinstance(value, bytes | np.bytes_):
        value = bytes(value).decode("utf-8", errors="replace")
    return str(value).strip("\x00 \t\r\n")


def read_frames(
    header: EpisodeHeader, size: int = IMAGE_SIZE, rules: ValidationRules = ValidationRules()
) -> np.ndarray:
    """All frames resized to size×size RGB uint8; raises EpisodeRejected on blank or unreadable frames."""
    frames = np.empty((header.num_frames, size, size, 3), np.uint8)
    blank = []
    try:
        with h5py.File(header.path, "r") as h5:
            for start, block in frame_blocks(h5[header.image_dataset], header.path):
                for offset, frame in enumerate(block):
                    small = model_frame(frame, header.colour_order, size)
                    frames[start + offset] = small
                    if small.std() < rules.blank_std:
                        blank.append(start + offset)
    except Exception as error:
        raise EpisodeRejected(
            header.path,
            f"{header.image_dataset} could not be read ({error}); the file is damaged or "
            "truncated, re-copy it from the robot",
        ) from error
    if blank:
        raise EpisodeRejected(
            header.path,
            f"{header.image_dataset} has blank (constant) frames {frame_ranges(blank)}; "
            "the camera delivered no picture, re-record the episode",
        )
    return frames
