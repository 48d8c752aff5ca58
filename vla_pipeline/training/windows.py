"""Training windows from the Zarr window store, as a torch Dataset, and the loader around it.

A window starting at frame s covers frames s … s+W-1; at every window frame t the policy
predicts the action chunk actions[t … t+C-1]. An item is a dict:

    images       uint8 (W, 224, 224, 3) RGB, not normalised (the model's preprocessing does that)
    actions      float32 (W, C, 2) (linear_x, linear_y) / action_scale, clipped to [-1, 1]
    action_mask  bool (W, C), True where the step exists (always, for the store's window starts)
    instruction  str;  episode_id  str;  start  int;  side  'left' | 'right' | None

`HDF5WindowDataset` is the users' old way (open the HDF5 file and resize every time), kept as
the reference for benchmarks/ and the equality tests.
"""

from __future__ import annotations

import multiprocessing
import os
import random
from dataclasses import dataclass
from pathlib import Path

import cv2
import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..data.episodes import ValidationRules, inspect_episode
from ..data.instructions import paraphrase
from ..data.frames import model_frame
from ..policy.preprocess import normalise_actions
from ..data.schema import ACTION_SCALE, IMAGE_SIZE, OTHER_SIDE, commanded, mirror_instruction, training_starts
from ..data.store import WindowStore, is_url

def action_chunks(raw: np.ndarray, window: int, chunk: int, scale: float,
                  is_command: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(W, C, 2) normalised chunks and their (W, C) mask from raw actions[start : start+W+C-1].

    `raw` may be shorter at an episode's end: missing steps are zero and masked out, as are the
    steps `is_command` (aligned with `raw`) marks as no command.
    """
    steps = np.arange(window)[:, None] + np.arange(chunk)[None, :]
    mask = steps < len(raw)
    if is_command is not None:
        mask &= np.pad(np.asarray(is_command, bool), (0, window + chunk - 1 - len(is_command)))[steps]
    padded = np.zeros((window + chunk - 1, 2), np.float32)
    padded[: len(raw)] = normalise_actions(np.asarray(raw, np.float32)[:, :2], scale).numpy()
    return padded[steps], mask


@dataclass(frozen=True)
class Augmentation:
    """What training changes in a window (train=True only); every change is the same for all the
    window's frames, and each field's zero (crop_scale: 1) turns its change off.

    The image changes run through albumentations on the uint8 frames: a random resized crop (a
    shift and a zoom), brightness/contrast/saturation/hue jitter and, sometimes, a Gaussian blur.
    The mirror flips frames, linear_y and the instruction's side words together; the paraphrase
    rewords a known instruction with a template of `data.instructions.TRAINING_PARAPHRASES`.
    """

    mirror_prob: float = 0.0
    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    hue: float = 0.0
    crop_scale: float = 1.0
    blur_prob: float = 0.0
    paraphrase_prob: float = 0.0

    @classmethod
    def of(cls, config) -> "Augmentation":
        """The augmentation a TrainConfig asks for."""
        return cls(**{name: getattr(config, name) for name in cls.__dataclass_fields__})

    def pipeline(self):
        """The albumentations pipeline of the image changes, or None where all are off."""
        import albumentations

        steps = []
        if self.crop_scale < 1.0:
            steps.append(albumentations.RandomResizedCrop(size=(IMAGE_SIZE, IMAGE_SIZE), scale=(self.crop_scale, 1.0),
                                                          ratio=(0.9, 1.1), p=1.0))
        if self.brightness or self.contrast or self.saturation or self.hue:
            steps.append(albumentations.ColorJitter(brightness=self.brightness, contrast=self.contrast,
                                                    saturation=self.saturation, hue=self.hue, p=1.0))
        if self.blur_prob:
            steps.append(albumentations.GaussianBlur(blur_limit=0, sigma_limit=(0.1, 1.5), p=self.blur_prob))
        return albumentations.Compose(steps) if steps else None


def _item(images, raw_actions, is_command, window, chunk, scale, instruction, episode_id, start, side) -> dict:
    actions, mask = action_chunks(raw_actions, window, chunk, scale, is_command)
    return {
        "images": torch.from_numpy(np.ascontiguousarray(images)),
        "actions": torch.from_numpy(actions),
        "action_mask": torch.from_numpy(mask),
        "instruction": instruction,
        "episode_id": episode_id,
        "start": int(start),
        "side": side,
    }


class WindowDataset(Dataset):
    """Every (episode, start) window of the given stored episodes (`training_starts`: tail windows too).

    Zarr arrays are opened lazily, once per process, and never pickled, so the dataset can
    be sent to DataLoader workers. `augmentation` (train=True only; none by default) depends on
    seed, index and the epoch set with `set_epoch`, not on which worker reads the item; the epoch
    lives in shared memory, so persistent workers see `set_epoch` calls made before each epoch.
    """

    def __init__(self, store_path, episode_ids, window: int, chunk: int, action_scale: float = ACTION_SCALE,
                 train: bool = False, augmentation: Augmentation | None = None, seed: int = 0):
        self.store_path = store_path if is_url(store_path) else Path(store_path)  # an fsspec URL stays one
        self.window, self.chunk, self.action_scale = window, chunk, action_scale
        self.train, self.augmentation, self.seed = train, augmentation or Augmentation(), seed
        self._pipeline = None  # built on first use, in the process that reads
        store = WindowStore(self.store_path)
        self.meta: dict[str, tuple[str, str | None, int]] = {}
        self.index: list[tuple[str, int]] = []
        for episode_id in episode_ids:
            attrs = store.open_episode(episode_id).attrs
            self.meta[episode_id] = (attrs["instruction"], attrs.get("side"), int(attrs["num_frames"]))
            self.index += [(episode_id, s) for s in training_starts(int(attrs["num_frames"]), window, chunk)]
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self._arrays: dict = {}
        self._pid = os.getpid()

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(epoch)

    def __len__(self) -> int:
        return len(self.index)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_arrays": {}, "_pid": None, "_pipeline": None}

    def _episode_arrays(self, episode_id: str):
        if self._pid != os.getpid():  # a forked worker: don't reuse the parent's handles
            self._arrays, self._pid = {}, os.getpid()
        if episode_id not in self._arrays:
            group = WindowStore(self.store_path).open_episode(episode_id)
            # Actions and events are a few bytes a frame: read once, they cost no store read per item.
            self._arrays[episode_id] = (group["images"], group["actions"][:], commanded(group["event_types"][:]))
        return self._arrays[episode_id]

    def __getitem__(self, index: int) -> dict:
        episode_id, start = self.index[index]
        return self._read(episode_id, start, self.window, index)

    def _read(self, episode_id: str, start: int, length: int, index: int) -> dict:
        """The item of frames start … start+length-1 (augmented when training, drawn by index)."""
        instruction, side, _ = self.meta[episode_id]
        images, actions, is_command = self._episode_arrays(episode_id)
        C = self.chunk
        frames = images[start : start + length]
        raw = actions[start : start + length + C - 1]
        is_command = is_command[start : start + length + C - 1]
        if self.train:
            augment = self.augmentation
            rng = np.random.default_rng((self.seed, int(self._epoch), index))
            mirror = rng.random() < augment.mirror_prob
            if self._pipeline is None:
                self._pipeline = augment.pipeline() or False
            if self._pipeline:
                self._pipeline.set_random_seed(int(rng.integers(2**31)))
                frames = self._pipeline(images=np.asarray(frames))["images"]
            if rng.random() < augment.paraphrase_prob:
                instruction = paraphrase(instruction, rng)
            if mirror:
                frames = frames[:, :, ::-1]
                raw = np.array(raw, np.float32)
                raw[:, 1] = 0.0 - raw[:, 1]  # 0.0 - x: no -0.0 for a zero linear_y
                instruction = mirror_instruction(instruction)
                side = OTHER_SIDE.get(side, side)
        return _item(frames, raw, is_command, length, C, self.action_scale, instruction, episode_id, start, side)


class EpisodeDataset(WindowDataset):
    """Every stored episode that has a training window, whole, as one item (`TrainConfig.batching`
    "episodes"): images (T, 224, 224, 3), actions (T, C, 2) and action_mask (T, C), augmented
    as one window is. `collate_episodes` pads a batch to its longest episode and adds `lengths`;
    the policy (`MobileVLAPolicy.forward`) encodes each frame once and cuts the windows from the
    frames' features."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.index = [(episode_id, 0) for episode_id, (_, _, frames) in self.meta.items()
                      if training_starts(frames, self.window, self.chunk)]

    def __getitem__(self, index: int) -> dict:
        episode_id, _ = self.index[index]
        return self._read(episode_id, 0, self.meta[episode_id][2], index)


def collate_windows(items: list[dict]) -> dict:
    """Tensors stacked on a new batch dimension; everything else (str, int, None) as lists.

    (torch's default collate would fail on `side=None` and turn `start` into a tensor.)
    """
    return {key: torch.stack([item[key] for item in items]) if isinstance(items[0][key], torch.Tensor)
            else [item[key] for item in items] for key in items[0]}


def collate_episodes(items: list[dict]) -> dict:
    """`collate_windows` of episodes padded to the longest (zero frames, masked actions), with
    `lengths` (B,) the episodes' frame counts."""
    longest = max(len(item["images"]) for item in items)

    def padded(tensor: torch.Tensor) -> torch.Tensor:
        return torch.cat([tensor, tensor.new_zeros((longest - len(tensor), *tensor.shape[1:]))])

    batch = collate_windows([{**item, **{key: padded(item[key]) for key in ("images", "actions", "action_mask")}}
                             for item in items])
    batch["lengths"] = torch.tensor([len(item["images"]) for item in items])
    return batch


def _seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32  # the loader's base seed + worker_id
    np.random.seed(seed)
    random.seed(seed)
    cv2.setNumThreads(1)  # one core per worker


def _worker_context():
    """Workers start from a forkserver, never as a fork of this process: a fork copies OpenCV's
    thread pool's locks as they are, held ones included, and the worker then deadlocks in its
    first OpenCV call (`cv2.setNumThreads` in `_seed_worker`). The server imports this module
    once, so a worker starts without importing torch again."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])  # no effect once the server runs (ingest may have started it)
    return context


def make_loader(
    dataset: Dataset, batch_size: int, shuffle: bool = False, workers: int = 0, seed: int = 0
) -> DataLoader:
    """Batches of `collate_windows` (`collate_episodes` for an EpisodeDataset); the shuffle order
    depends only on `seed` (and the epoch count)."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=workers,
        collate_fn=collate_episodes if isinstance(dataset, EpisodeDataset) else collate_windows,
        persistent_workers=workers > 0,
        multiprocessing_context=_worker_context() if workers > 0 else None,
        worker_init_fn=_seed_worker,
        generator=torch.Generator().manual_seed(seed),
        pin_memory=torch.cuda.is_available(),
    )


class HDF5WindowDataset(Dataset):
    """Reference loader in the style of the old scripts: opens the HDF5 file and decodes and
    resizes the window's frames (cv2 INTER_AREA, BGR → RGB for the legacy layout) on every
    item. Same items as WindowDataset(train=False); for benchmarks and tests only.
    """

    def __init__(self, paths, window: int, chunk: int, action_scale: float = ACTION_SCALE,
                 image_size: int = IMAGE_SIZE):
        self.window, self.chunk, self.action_scale, self.image_size = window, chunk, action_scale, image_size
        self.episodes, self.index = {}, []
        for path in map(Path, paths):
            # digest given: the reference loader never hashes files.
            header = inspect_episode(path, ValidationRules(window, chunk), digest="-")
            self.episodes[header.episode_id] = (path, header.image_dataset, header.colour_order,
                                                header.instruction, header.side, commanded(header.event_types))
            self.index += [(header.episode_id, s) for s in training_starts(header.num_frames, window, chunk)]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, index: int) -> dict:
        episode_id, start = self.index[index]
        path, dataset, order, instruction, side, is_command = self.episodes[episode_id]
        W, C, size = self.window, self.chunk, self.image_size
        with h5py.File(path, "r") as h5:
            source = h5[dataset][start : start + W]
            raw = h5["actions"][start : start + W + C - 1, :2].astype(np.float32)
        frames = np.empty((len(source), size, size, 3), np.uint8)
        for i, frame in enumerate(source):
            frames[i] = model_frame(frame, order, size)
        return _item(frames, raw, is_command[start : start + W + C - 1], W, C, self.action_scale, instruction,
                     episode_id, start, side)
