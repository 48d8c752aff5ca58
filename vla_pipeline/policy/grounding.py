"""Grounding pretraining of a small backbone's image path: Kosmos-2 learned where objects are in
web images before it ever drove; a backbone built from a config has seen nothing. This teaches
the vision tower and the image-to-text projection of a local preset to read the room's geometry
from rendered frames of `vla_pipeline/BoxNav-v1`, before any policy trains on it.

Frames: the operator's poses in `scenes` rooms, each also shifted at random by up to ±0.5 m
(the places a policy strays to), rendered at the collector's 16:9 aspect and brought to the model
as the store brings them (`model_frame`, `normalise_images`). Labels, from the room's geometry at
that pose (x ahead, y to the left):

- the target: whether the camera sees it (in the field of view, not hidden by a box), and where
  (1 / metres ahead; metres to the side per metre ahead, i.e. its image column); the where is
  scored only where it is seen;
- the obstacle group's near face while it is ahead: 1 / metres ahead and the side per metre ahead
  of its two edges;
- whether a stop here would be an arrival (`varied.arrival`), weighted ×5 (one pose in ~25).

Only the image path trains (AdamW, a one-cycle schedule); the text model is left as built.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

JITTER = 0.5  # m: how far the shifted poses stray from the operator's, along each axis
RENDER_SIZE = (252, 448)  # (height, width): the collector's 16:9 frames, smaller
LABELS = ("target_seen", "target_inverse_depth", "target_column", "obstacle_ahead", "obstacle_inverse_depth",
          "obstacle_left_column", "obstacle_right_column", "arrived")
_SEEN, _AHEAD, _ARRIVED = 0, 3, 7  # the flags: target seen, obstacle ahead, a stop arrives
_TARGET_WHERE, _OBSTACLE_WHERE = (1, 2), (4, 5, 6)


def _hidden(pose: tuple[float, float], target: tuple[float, float], boxes) -> bool:
    """Whether a box stands on the floor line from the camera to the target."""
    for t in np.linspace(0.0, 1.0, 41)[1:-1]:
        x, y = pose[0] + t * (target[0] - pose[0]), pose[1] + t * (target[1] - pose[1])
        if any(x0 <= x <= x1 and y0 <= y <= y1 for x0, x1, y0, y1 in boxes):
            return True
    return False


def pose_labels(pose: tuple[float, float], obstacles, target_xy: tuple[float, float], half_view: float) -> list[float]:
    """The LABELS at `pose`; `half_view`: the tangent of half the horizontal field of view."""
    from ..sim import varied

    x, y = pose
    tx, ty = target_xy
    ahead = tx - x
    column = (ty - y) / ahead if ahead > 0.3 else math.inf
    seen = abs(column) <= half_view and not _hidden(pose, target_xy, obstacles)
    target = [1.0 / ahead, column] if seen else [0.0, 0.0]
    near = min(o[0] for o in obstacles) - x
    low, high = min(o[2] for o in obstacles), max(o[3] for o in obstacles)
    if near > 0.2:
        obstacle = [1.0, 1.0 / near, float(np.clip((high - y) / near, -3, 3)), float(np.clip((low - y) / near, -3, 3))]
    else:
        obstacle = [0.0, 0.0, 0.0, 0.0]
    arrived = float(varied.arrival(pose, target_xy) is None)
    return [float(seen), *target, *obstacle, arrived]


def grounding_frames(scenes: int, seed: int = 0, log: Callable[[str], None] = print):
    """(uint8 frames (N, 224, 224, 3) RGB, labels (N, len(LABELS)) float32) over `scenes` rooms."""
    from ..data.frames import model_frame
    from ..sim import varied
    from ..sim.env import SIGHT_ENV_ID, BoxNavEnv
    from ..sim.geometry import contact
    from ..sim.operator import press_poses
    from ..sim.render import Camera

    height, width = RENDER_SIZE
    half_view = (width / 2) / Camera.for_size(height, width).focal
    rng = np.random.default_rng(seed)
    env = BoxNavEnv(height=height, width=width, world=SIGHT_ENV_ID)
    frames, labels = [], []
    started = time.perf_counter()
    for scene in range(scenes):
        _, info = env.reset(seed=int(rng.integers(2**31)))
        obstacles, target = info["obstacles"], info["target_xy"]
        keys = varied.operator_keys(obstacles, target, info["side"])
        for x, y in press_poses(keys)[1][1:]:  # the pose at each press, the closing stop's included
            for pose in ((x, y), (x + rng.uniform(-JITTER, JITTER), y + rng.uniform(-JITTER, JITTER))):
                if contact(pose, obstacles):
                    continue  # against a box or the back wall: no camera stands there
                frames.append(model_frame(env.episode.renderer.frame(*pose), "BGR"))
                labels.append(pose_labels(pose, obstacles, target, half_view))
        if (scene + 1) % 100 == 0 or scene + 1 == scenes:
            log(f"grounding: {scene + 1}/{scenes} rooms rendered, {len(frames)} frames "
                f"({time.perf_counter() - started:.0f} s)")
    return np.stack(frames), np.asarray(labels, dtype=np.float32)


def grounding_loss(out: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Flags by BCE (the arrival ×5); each place by Huber where its object is seen or ahead."""
    flags = (_SEEN, _AHEAD, _ARRIVED)
    weight = torch.ones(len(flags), device=out.device)
    weight[-1] = 5.0
    bce = F.binary_cross_entropy_with_logits(out[:, flags], labels[:, flags], reduction="none")
    bce = (bce * torch.where(labels[:, flags] > 0.5, weight, 1.0)).mean()
    where = 0.0
    for flag, columns in ((_SEEN, _TARGET_WHERE), (_AHEAD, _OBSTACLE_WHERE)):
        mask = labels[:, flag] > 0.5
        if mask.any():
            where = where + F.smooth_l1_loss(out[mask][:, columns], labels[mask][:, columns], beta=0.1)
    return bce + where


def pretrain_grounding(model: nn.Module, scenes: int = 300, epochs: int = 6, seed: int = 0, lr: float = 1e-3,
                       batch_size: int = 64, log: Callable[[str], None] = print) -> dict:
    """Train `model`'s (a Kosmos2Model's) vision tower and projection on the LABELS in place; returns
    the held-out tenth's scores (the target's mean column error where seen, in metres to the side
    per metre ahead; the arrival's recall and precision)."""
    from .preprocess import normalise_images

    frames, labels = grounding_frames(scenes, seed, log)
    size = int(model.config.vision_config.image_size)
    pixels, targets = normalise_images(frames, size=size), torch.from_numpy(labels)
    held = max(1, len(pixels) // 10)  # the first rooms' frames: rooms the training never saw
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        latents = int(model.config.latent_query_num) * int(model.config.text_config.embed_dim)
        head = nn.Linear(latents, len(LABELS))
        params = [*model.vision_model.parameters(), *model.image_to_text_projection.parameters(), *head.parameters()]
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
        steps_per_epoch = max(1, (len(pixels) - held) // batch_size)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=epochs * steps_per_epoch,
                                                       pct_start=0.1)

        def predict(batch: torch.Tensor) -> torch.Tensor:
            return head(model.get_image_features(batch, return_dict=True).pooler_output.flatten(1))

        started = time.perf_counter()
        for epoch in range(epochs):
            model.train()
            order = held + torch.randperm(len(pixels) - held)
            for step in range(steps_per_epoch):
                rows = order[step * batch_size:(step + 1) * batch_size]
                loss = grounding_loss(predict(pixels[rows]), targets[rows])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                schedule.step()
            model.eval()
            scores = _held_out(predict, pixels[:held], targets[:held])
            log(f"grounding: epoch {epoch + 1}/{epochs}, held-out loss {scores['loss']:.3f}, target column "
                f"error {scores['target_column_error']:.3f}, arrival recall {scores['arrival_recall']:.2f} "
                f"precision {scores['arrival_precision']:.2f} ({time.perf_counter() - started:.0f} s)")
    model.eval()
    return scores


@torch.no_grad()
def _held_out(predict, pixels: torch.Tensor, targets: torch.Tensor) -> dict:
    out = torch.cat([predict(pixels[i:i + 256]) for i in range(0, len(pixels), 256)])
    seen = targets[:, _SEEN] > 0.5
    column = (out[seen, 2] - targets[seen, 2]).abs().mean() if seen.any() else torch.tensor(float("nan"))
    said, arrived = out[:, _ARRIVED] > 0, targets[:, _ARRIVED] > 0.5
    hits = float((said & arrived).sum())
    return {"loss": float(grounding_loss(out, targets)), "target_column_error": float(column),
            "arrival_recall": hits / max(1, int(arrived.sum())), "arrival_precision": hits / max(1, int(said.sum()))}
