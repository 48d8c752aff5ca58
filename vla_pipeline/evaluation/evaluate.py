"""Score a policy on the validation episodes of the window store.

Every frame a training window covers (`schema.training_starts`: all of them, the last one, the
operator's closing stop where he pressed one, included) is predicted once, from the window of up
to W frames that ends at it: the prediction the robot gets from `StreamingPolicy.step` at that
frame. Its target is the recorded chunk actions[t … t+C-1] in robot units; the steps of a chunk
past the last recorded action have no target and are not scored (training masks them too). The
`episode_start` frame is predicted but not scored: its zero action is no key press (training
leaves it out too). The constant baselines and, given the training episodes,
the scripted replay (`replay.py`) are scored on the same targets, and left/right episodes are
predicted a second time with "left" and "right" swapped in the instruction.

Two sight ablations say whether the policy looks at the frames at all (`metrics.sight_reliance`):
every episode is predicted again with each window's frames replaced by the episode's first frame,
and with the frames of the next validation episode (in the order given, the last taking the
first's) at the same indices, that episode's last frame repeated where it is shorter; the
instruction stays the episode's own. Both are scored on the same targets as the real frames.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import metrics
from .replay import ScriptedReplay, side_and_distance
from ..policy.model import MobileVLAPolicy
from ..data.schema import ACTION_DIMS, commanded, mirror_instruction, scenario_group, training_starts
from ..policy.serving import sliding_window_actions
from ..data.store import WindowStore

ENCODE_BATCH = 8  # frames per backbone call


@dataclass
class EpisodePredictions:
    episode_id: str
    side: str | None
    scenario: str | None
    instruction: str
    frames: np.ndarray  # (N,) the frame index of each scored prediction
    pred: np.ndarray  # (N, C, 2) robot units
    true: np.ndarray  # (N, C, 2) robot units
    pred_swapped: np.ndarray | None = None  # with left/right swapped in the instruction
    pred_first_frame: np.ndarray | None = None  # every frame replaced by the episode's first
    pred_other_episode: np.ndarray | None = None  # the frames of `other_episode_id`, same indices
    other_episode_id: str | None = None


@dataclass
class Evaluation:
    metrics: dict
    episodes: list[EpisodePredictions] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(self.metrics, indent=1, default=_jsonable)


def _jsonable(value):
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value)}")


@torch.no_grad()
def predict_frames(policy: MobileVLAPolicy, images: np.ndarray, instruction: str, repeat: int = 1) -> np.ndarray:
    """(T, 224, 224, 3) RGB frames of one episode -> (T × repeat, chunk, 2) actions in robot units;
    `repeat` shows each frame that many times in a row (encoded once)."""
    features = torch.cat([
        policy.encode_images(policy.normalise(images[i : i + ENCODE_BATCH]), [instruction] * len(images[i : i + ENCODE_BATCH]))
        for i in range(0, len(images), ENCODE_BATCH)
    ]).repeat_interleave(repeat, dim=0)
    return (sliding_window_actions(policy, features) * policy.config.action_scale).float().cpu().numpy()


def frames_at(store: WindowStore, episode_id: str, count: int) -> np.ndarray:
    """Frames 0 … count-1 of `episode_id`, its last frame repeated where it has fewer."""
    taken = np.asarray(store.open_episode(episode_id)["images"][:count])
    return taken[np.minimum(np.arange(count), len(taken) - 1)]


def covered_frames(group, window: int, chunk: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(images, scored frame indices, (N, chunk, 2) targets in robot units) of the frames a stored
    episode's training windows cover: every frame, the last included; the scored ones are the
    commands. Target steps past the last recorded action are NaN (`metrics.score` leaves them
    out). None if the episode has no training window."""
    num_frames = int(group.attrs["num_frames"])
    if not training_starts(num_frames, window, chunk):
        return None
    actions = np.full((num_frames + chunk - 1, 2), np.nan, np.float32)
    actions[:num_frames] = group["actions"][:num_frames, :2]
    scored = np.flatnonzero(commanded(group["event_types"][:num_frames]))
    return np.asarray(group["images"][:num_frames]), scored, actions[scored[:, None] + np.arange(chunk)[None, :]]


def predict_episode(policy: MobileVLAPolicy, store: WindowStore, episode_id: str, swap_sides: bool = True,
                    sight_ablations: bool = False, other_episode_id: str | None = None) -> EpisodePredictions | None:
    """Predictions for the frames the episode's windows cover; None if it has no window.
    `sight_ablations` predicts them again from the episode's first frame alone and, given
    `other_episode_id`, from that episode's frames at the same indices."""
    config = policy.config
    group = store.open_episode(episode_id)
    attrs = dict(group.attrs)
    covered = covered_frames(group, config.window, config.chunk)
    if covered is None:
        return None
    images, scored, true = covered
    frames = len(images)
    side = attrs.get("side")
    result = EpisodePredictions(
        episode_id=episode_id, side=side, scenario=scenario_group(attrs.get("scenario")), instruction=attrs["instruction"],
        frames=scored, pred=predict_frames(policy, images, attrs["instruction"])[scored], true=true,
    )
    swapped = mirror_instruction(attrs["instruction"])
    if swap_sides and side in ("left", "right") and swapped != attrs["instruction"]:
        result.pred_swapped = predict_frames(policy, images, swapped)[scored]
    if sight_ablations:
        result.pred_first_frame = predict_frames(policy, images[:1], attrs["instruction"], repeat=frames)[scored]
        if other_episode_id is not None:
            result.other_episode_id = other_episode_id
            result.pred_other_episode = predict_frames(
                policy, frames_at(store, other_episode_id, frames), attrs["instruction"])[scored]
    return result


def other_episodes(episode_ids: Sequence[str]) -> dict[str, str]:
    """Whose frames each episode is shown in the other-episode ablation: the next one in order, the
    last the first's; {} with fewer than two distinct episodes."""
    distinct = list(dict.fromkeys(episode_ids))
    if len(distinct) < 2:
        return {}
    return {episode_id: distinct[(i + 1) % len(distinct)] for i, episode_id in enumerate(distinct)}


def evaluate(
    policy: MobileVLAPolicy,
    store_path: Path | str,
    episode_ids: Sequence[str],
    train_mean: Sequence[float],
    dead_band: float = metrics.DEFAULT_DEAD_BAND,
    progress: Callable[[str], None] | None = None,
    replay: ScriptedReplay | None = None,
    sight_ablations: bool = True,
) -> Evaluation:
    """Metrics of `policy`, of the constant baselines and (given one, built from the training
    episodes) of the scripted replay, on the evaluation episodes' covered frames; with
    `sight_ablations`, also the accuracy without the real frames (`sight_reliance`; about twice the
    backbone calls)."""
    store = WindowStore(store_path)
    scale = policy.config.action_scale
    was_training = policy.training
    policy.eval()
    episodes = []
    others = other_episodes(episode_ids)
    try:
        for number, episode_id in enumerate(episode_ids, 1):
            predicted = predict_episode(policy, store, episode_id, sight_ablations=sight_ablations,
                                        other_episode_id=others.get(episode_id))
            if predicted is not None:
                episodes.append(predicted)
            if progress:
                progress(f"evaluated {number}/{len(episode_ids)} episodes ({episode_id})")
    finally:
        policy.train(was_training)
    if not episodes:
        raise ValueError(f"none of the {len(episode_ids)} evaluation episodes has a complete window "
                         f"(window {policy.config.window} + chunk {policy.config.chunk} frames)")
    pred = np.concatenate([e.pred for e in episodes])
    true = np.concatenate([e.true for e in episodes])
    model = metrics.score(pred, true, scale, dead_band)
    baselines = metrics.score_baselines(true, metrics.constant_baselines(train_mean, scale), scale, dead_band)
    swapped = [e for e in episodes if e.pred_swapped is not None]
    replayed = None
    if replay is not None:
        chunk = policy.config.chunk
        replayed = metrics.score(np.concatenate([
            replay.predict(*side_and_distance(store.episode_attrs(e.episode_id)), e.frames, chunk) for e in episodes
        ]), true, scale, dead_band)
    result = {
        "episodes": len(episodes),
        "predictions": int(len(pred)),
        "chunk": policy.config.chunk,
        "window": policy.config.window,
        "action_scale": scale,
        "dead_band": dead_band,
        "model": model,
        "baselines": baselines,
        "margin": metrics.margins(model, baselines),
        # Not a constant: kept apart from `baselines`, so the gate's "best constant baseline" stays what it says.
        "scripted_replay": replayed,
        "margin_over_replay": {steps: model[steps]["direction_accuracy"] - replayed[steps]["direction_accuracy"]
                               for steps in metrics.STEPS} if replayed else None,
        "instruction_sensitivity": metrics.instruction_sensitivity(
            np.concatenate([e.pred[..., 1] for e in swapped]) if swapped else np.zeros((0, 1)),
            np.concatenate([e.pred_swapped[..., 1] for e in swapped]) if swapped else np.zeros((0, 1)),
            scale, dead_band,
        ),
        "sight_reliance": _sight_reliance(episodes, true, model, scale, dead_band) if sight_ablations else None,
        "by_side": metrics.breakdown(pred, true, _labels(episodes, "side"), scale, dead_band),
        "by_scenario": metrics.breakdown(pred, true, _labels(episodes, "scenario"), scale, dead_band),
    }
    return Evaluation(result, episodes)


def _sight_reliance(episodes: list[EpisodePredictions], true: np.ndarray, model: dict, scale: float,
                    dead_band: float) -> dict:
    def first_step_accuracy(name: str) -> float:
        pred = np.concatenate([getattr(e, name) for e in episodes])
        return metrics.score(pred, true, scale, dead_band)["first"]["direction_accuracy"]

    shown_other = all(e.pred_other_episode is not None for e in episodes)
    return {
        **metrics.sight_reliance(model["first"]["direction_accuracy"], first_step_accuracy("pred_first_frame"),
                                 first_step_accuracy("pred_other_episode") if shown_other else None),
        "other_episodes_skipped": None if shown_other else
        "one validation episode: there is no other episode whose frames it could be shown",
        "other_episode_of": {e.episode_id: e.other_episode_id for e in episodes},
    }


def _labels(episodes: list[EpisodePredictions], name: str) -> list[str | None]:
    return [getattr(e, name) for e in episodes for _ in range(len(e.pred))]


def headline(result: dict) -> dict[str, float]:
    """Flat numbers for MLflow metrics and registry tags."""
    model, margin, sensitivity = result["model"], result["margin"], result["instruction_sensitivity"]
    out = {}
    for steps in metrics.STEPS:
        out[f"direction_accuracy_{steps}"] = model[steps]["direction_accuracy"]
        out[f"direction_accuracy_margin_{steps}"] = margin[steps]["direction_accuracy_margin"]
        out[f"mse_margin_{steps}"] = margin[steps]["mse_margin"]
        for key in ("mse", "mae", "rmse", *(f"{m}_{d}" for m in ("mse", "mae", "rmse") for d in ACTION_DIMS)):
            out[f"{key}_{steps}"] = model[steps][key]
        for name, scored in result["baselines"].items():
            out[f"baseline_{name}_direction_accuracy_{steps}"] = scored[steps]["direction_accuracy"]
            out[f"baseline_{name}_mse_{steps}"] = scored[steps]["mse"]
    if result.get("scripted_replay"):
        for steps in metrics.STEPS:
            out[f"baseline_scripted_replay_direction_accuracy_{steps}"] = result["scripted_replay"][steps]["direction_accuracy"]
            out[f"baseline_scripted_replay_mse_{steps}"] = result["scripted_replay"][steps]["mse"]
            out[f"direction_accuracy_margin_over_replay_{steps}"] = result["margin_over_replay"][steps]
    for key, value in sensitivity.items():
        out[f"instruction_{key}"] = value
    sight = result.get("sight_reliance")
    if sight:  # first step; an ablation that could not run is left out, never written as 0
        out["direction_accuracy_first_frame"] = sight["first_frame"]
        if sight["other_episodes"] is not None:
            out["direction_accuracy_other_episode"] = sight["other_episodes"]
        out["sight_reliance"] = sight["drop"]
    out["predictions"] = result["predictions"]
    return {key: float(value) for key, value in out.items()}
