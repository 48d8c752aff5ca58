"""Action-quality metrics that a collapsed policy cannot hide behind: regression errors in
robot units, direction classes with a dead band, constant baselines scored on the very
same targets, and the breakdowns the report shows.

Arrays are (N, C, 2): N predictions of a C-step chunk of (linear_x, linear_y) in robot
units. "first" scores only step 0 of every chunk, "all" every step.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from ..data.schema import ACTION_DIMS, DEAD_BAND

DIRECTIONS = ("STOP", "F", "B", "L", "R", "FL", "FR", "BL", "BR")
# (sign of linear_x, sign of linear_y) -> class; +y strafes left (key "a").
_CLASS_OF_SIGNS = {(0, 0): 0, (1, 0): 1, (-1, 0): 2, (0, 1): 3, (0, -1): 4, (1, 1): 5, (1, -1): 6, (-1, 1): 7, (-1, -1): 8}
_CLASS_TABLE = np.zeros((3, 3), np.int64)
for (_sx, _sy), _cls in _CLASS_OF_SIGNS.items():
    _CLASS_TABLE[_sx + 1, _sy + 1] = _cls
DEFAULT_DEAD_BAND = DEAD_BAND  # fraction of the action scale below which a component counts as 0
STEPS = ("first", "all")


def direction_classes(actions, action_scale: float, dead_band: float = DEFAULT_DEAD_BAND) -> np.ndarray:
    """Indices into DIRECTIONS for (..., 2) actions: each component's sign, 0 inside the dead band."""
    actions = np.asarray(actions, np.float64)
    threshold = dead_band * action_scale
    signs = np.where(np.abs(actions) > threshold, np.sign(actions), 0).astype(np.int64)
    return _CLASS_TABLE[signs[..., 0] + 1, signs[..., 1] + 1]


def _steps(actions: np.ndarray, steps: str) -> np.ndarray:
    """(N, C, 2) -> (M, 2) rows scored for `steps`."""
    return (actions[:, :1] if steps == "first" else actions).reshape(-1, actions.shape[-1])


def regression(pred: np.ndarray, true: np.ndarray) -> dict:
    """MSE, MAE and RMSE per action dimension (and their mean over dimensions), robot units."""
    error = np.asarray(pred, np.float64) - np.asarray(true, np.float64)
    out = {}
    for name, values in (("mse", (error**2).mean(0)), ("mae", np.abs(error).mean(0))):
        out.update({f"{name}_{dim}": float(v) for dim, v in zip(ACTION_DIMS, values)})
        out[name] = float(values.mean())
    for dim in ACTION_DIMS:
        out[f"rmse_{dim}"] = math.sqrt(out[f"mse_{dim}"])
    out["rmse"] = math.sqrt(out["mse"])
    return out


def classification(pred_classes: np.ndarray, true_classes: np.ndarray) -> dict:
    """Accuracy, per-class recall and precision (None where undefined), confusion matrix
    (rows: true class, columns: predicted class, in DIRECTIONS order)."""
    k = len(DIRECTIONS)
    confusion = np.bincount(true_classes.ravel() * k + pred_classes.ravel(), minlength=k * k).reshape(k, k)
    total, correct = confusion.sum(), np.trace(confusion)
    recall, precision = {}, {}
    for i, name in enumerate(DIRECTIONS):
        support, predicted = confusion[i].sum(), confusion[:, i].sum()
        recall[name] = float(confusion[i, i] / support) if support else None
        precision[name] = float(confusion[i, i] / predicted) if predicted else None
    return {
        "accuracy": float(correct / total) if total else math.nan,
        "recall": recall,
        "precision": precision,
        "support": {name: int(n) for name, n in zip(DIRECTIONS, confusion.sum(1))},
        "confusion": confusion.tolist(),
    }


def score(pred, true, action_scale: float, dead_band: float = DEFAULT_DEAD_BAND) -> dict:
    """{"first": {...}, "all": {...}}: regression + direction metrics of `pred` against `true`.
    A NaN target (a chunk step past the episode's last action) is not scored."""
    pred, true = np.asarray(pred, np.float64), np.asarray(true, np.float64)
    if pred.shape != true.shape or pred.ndim != 3:
        raise ValueError(f"predictions {pred.shape} and targets {true.shape} must both be (N, chunk, 2)")
    out = {}
    for steps in STEPS:
        p, t = _steps(pred, steps), _steps(true, steps)
        known = ~np.isnan(t).any(axis=-1)
        p, t = p[known], t[known]
        directions = classification(direction_classes(p, action_scale, dead_band), direction_classes(t, action_scale, dead_band))
        out[steps] = {**regression(p, t), "direction_accuracy": directions.pop("accuracy"), **directions}
    return out


def constant_baselines(train_mean: Sequence[float], action_scale: float) -> dict[str, np.ndarray]:
    """The constant predictors a policy must beat: no motion, the training mean, always forward."""
    # float32 like the recorded actions and the policy's outputs, so that a policy that outputs
    # one of these constants scores exactly as its baseline.
    return {
        "zero": np.zeros(2, np.float32),
        "train_mean": np.asarray(train_mean, np.float32)[:2],
        "always_forward": np.array([action_scale, 0.0], np.float32),
    }


def score_baselines(true, baselines: Mapping[str, np.ndarray], action_scale: float,
                    dead_band: float = DEFAULT_DEAD_BAND) -> dict:
    true = np.asarray(true, np.float64)
    return {name: score(np.broadcast_to(value, true.shape), true, action_scale, dead_band)
            for name, value in baselines.items()}


def margins(model: dict, baselines: Mapping[str, dict]) -> dict:
    """The model's margin over the best baseline per step set: direction accuracy gained
    (model − best baseline) and MSE saved (best baseline − model); positive is better."""
    out = {}
    for steps in STEPS:
        best_accuracy = max(baselines, key=lambda name: baselines[name][steps]["direction_accuracy"])
        best_mse = min(baselines, key=lambda name: baselines[name][steps]["mse"])
        out[steps] = {
            "best_accuracy_baseline": best_accuracy,
            "direction_accuracy_margin": model[steps]["direction_accuracy"] - baselines[best_accuracy][steps]["direction_accuracy"],
            "best_mse_baseline": best_mse,
            "mse_margin": baselines[best_mse][steps]["mse"] - model[steps]["mse"],
        }
    return out


def instruction_sensitivity(lateral: np.ndarray, lateral_swapped: np.ndarray, action_scale: float,
                            dead_band: float = DEFAULT_DEAD_BAND) -> dict:
    """How the predicted linear_y (N, C) reacts to swapping "left" and "right" in the instruction.

    `flip_fraction`: of the predictions that strafe (|linear_y| beyond the dead band) with either
    instruction, the share that strafe with both and to opposite sides. Frames where the policy
    rightly does not strafe (forward, stop) say nothing about the instruction and are left out;
    a policy that never strafes scores 0. `mean_abs_change`: of linear_y, over all predictions
    (robot units)."""
    lateral, lateral_swapped = np.asarray(lateral, np.float64), np.asarray(lateral_swapped, np.float64)
    if lateral.size == 0:
        return {"predictions": 0}
    threshold = dead_band * action_scale
    out = {"predictions": int(lateral.shape[0])}
    for steps, (a, b) in {"first": (lateral[:, :1], lateral_swapped[:, :1]), "all": (lateral, lateral_swapped)}.items():
        strafing, strafing_swapped = np.abs(a) > threshold, np.abs(b) > threshold
        either = strafing | strafing_swapped
        flipped = strafing & strafing_swapped & (a * b < 0)
        out[f"lateral_predictions_{steps}"] = int(either.sum())
        out[f"flip_fraction_{steps}"] = float(flipped.sum() / either.sum()) if either.any() else 0.0
        out[f"mean_abs_change_{steps}"] = float(np.abs(b - a).mean())
    return out


def sight_reliance(real: float, first_frame: float, other_episodes: float | None) -> dict:
    """How much of the first-step direction accuracy the frames themselves earn: `real` (the real
    frames), `first_frame` (every window's frames replaced by its episode's first frame: no
    progress, no scene change) and `other_episodes` (frames of another validation episode at the
    same indices, the instruction kept: progress without this scene; None where there was no
    other episode to take them from).

    `drop` = real − the higher of the ablated accuracies that were measured, i.e. the smaller of
    the drops: the accuracy that no stand-in for the frames could keep. Exactly 0 for a policy that
    does not look at the frames (it drives on the instruction alone); negative where an
    ablation scores higher than the real frames (kept as measured, not clipped)."""
    measured = [accuracy for accuracy in (first_frame, other_episodes) if accuracy is not None]
    return {"real": real, "first_frame": first_frame, "other_episodes": other_episodes,
            "drop": real - max(measured)}


def breakdown(pred, true, groups: Sequence[str | None], action_scale: float,
              dead_band: float = DEFAULT_DEAD_BAND) -> dict[str, dict]:
    """First-step direction accuracy, MAE and prediction count per group label."""
    pred, true = np.asarray(pred, np.float64), np.asarray(true, np.float64)
    labels = np.array([g if g is not None else "unknown" for g in groups], dtype=object)
    out = {}
    for label in sorted(set(labels)):
        rows = labels == label
        scored = score(pred[rows], true[rows], action_scale, dead_band)["first"]
        out[label] = {"predictions": int(rows.sum()), "direction_accuracy": scored["direction_accuracy"],
                      "mae": scored["mae"]}
    return out
