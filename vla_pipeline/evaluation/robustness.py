"""Robustness: the policy judged under the changes a real room brings.

Closed loop (`robustness_rollouts`): the policy drives the same plan of scenes once as trained
(`nominal`) and once under each condition of `sim.perturb.CONDITIONS` (light, floor and walls,
obstacle colour, distractors, camera height and pitch, noise, blur, held-out wordings). The
conditions change no geometry, so every difference in outcome is the policy's.

Offline (`offline_robustness`), for any data, robot episodes included: the first-step direction
accuracy on the validation episodes with every frame changed by one image perturbation
(`IMAGE_PERTURBATIONS`, OpenCV), and with the instruction in a held-out wording, beside the
accuracy on the frames as recorded.
"""
from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from . import metrics
from .closed_loop import CAMERAS, WORLDS, PolicyDriver
from .evaluate import covered_frames, predict_frames
from ..data.instructions import HELD_OUT_PARAPHRASES, fill, parse_instruction
from ..data.store import WindowStore
from ..policy.serving import StreamingPolicy
from ..sim.perturb import CONDITIONS, NOMINAL, PERTURBED
from ..sim.rollout import RolloutResult, plan, run_rollouts, summarise

DEFAULT_EPISODES = 12  # per condition: one rollout in each of the 12 side × distance × boxes cells
GOAL_SUCCESS = 0.80  # every perturbed condition's closed-loop success, for a champion
GOAL_ACCURACY_DROP = 0.10  # offline: each perturbation's accuracy within this of the unperturbed
RATES = ("success_rate", "spl", "collision_rate", "wrong_side_rate", "lost_rate", "stopped_away_rate", "timeout_rate")


def _gain(gains) -> Callable[[np.ndarray], np.ndarray]:
    """Each channel's intensity times its gain (RGB), rounded and clipped."""
    def apply(frame: np.ndarray) -> np.ndarray:
        return cv2.multiply(frame, np.array([*gains, 0.0]), dtype=cv2.CV_8U)
    return apply


def _warp(angle: float = 0.0, shift: float = 0.0, zoom: float = 1.0) -> Callable[[np.ndarray], np.ndarray]:
    """Rotated by `angle`° counter-clockwise about the centre, enlarged by `zoom`, shifted by `shift` of the
    width right and down; the border repeated."""
    def apply(frame: np.ndarray) -> np.ndarray:
        height, width = frame.shape[:2]
        matrix = cv2.getRotationMatrix2D((width / 2, height / 2), angle, zoom)
        matrix[:, 2] += shift * width
        return cv2.warpAffine(frame, matrix, (width, height), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    return apply


# name → (what it does, uint8 RGB (H, W, 3) frame → the same)
IMAGE_PERTURBATIONS: dict[str, tuple[str, Callable[[np.ndarray], np.ndarray]]] = {
    "brighter": ("brightness +40%", _gain((1.4, 1.4, 1.4))),
    "darker": ("brightness −40%", _gain((0.6, 0.6, 0.6))),
    "colour_cast": ("a warm colour cast: red ×1.2, blue ×0.8", _gain((1.2, 1.0, 0.8))),
    "blur": ("Gaussian blur, sigma 1.5 px at 224 px", lambda frame: cv2.GaussianBlur(frame, (0, 0), 1.5)),
    "shift": ("shifted 5% of the width right and down, the border repeated", _warp(shift=0.05)),
    "crop": ("the central 85% enlarged to the frame", _warp(zoom=1 / 0.85)),
    "rotation": ("rotated 5° counter-clockwise, the border repeated", _warp(angle=5.0)),
}


def perturb_images(images: np.ndarray, name: str) -> np.ndarray:
    """uint8 RGB (T, H, W, 3) frames under the image perturbation `name`."""
    change = IMAGE_PERTURBATIONS[name][1]
    return np.stack([change(np.ascontiguousarray(frame)) for frame in images])


def offline_robustness(policy, store_path: Path | str, episode_ids: Sequence[str],
                       dead_band: float = metrics.DEFAULT_DEAD_BAND,
                       progress: Callable[[str], None] | None = None) -> dict:
    """First-step direction accuracy on the episodes' scored frames as recorded ("unperturbed") and
    under each of IMAGE_PERTURBATIONS, and, on the episodes whose instruction is in a known wording,
    with it in a held-out one (HELD_OUT_PARAPHRASES, taken in turn). The frames scored are those
    `evaluate` scores."""
    store = WindowStore(store_path)
    config, scale = policy.config, policy.config.action_scale
    names = ["unperturbed", *IMAGE_PERTURBATIONS]
    preds: dict[str, list[np.ndarray]] = {name: [] for name in names}
    truths: list[np.ndarray] = []
    worded: dict[str, list[np.ndarray]] = {"unperturbed": [], "paraphrase": [], "true": []}
    was_training = policy.training
    policy.eval()
    try:
        for number, episode_id in enumerate(episode_ids):
            group = store.open_episode(episode_id)
            covered = covered_frames(group, config.window, config.chunk)
            if covered is None:
                continue
            images, scored, true = covered
            instruction = group.attrs["instruction"]
            truths.append(true)
            for name in names:
                shown = images if name == "unperturbed" else perturb_images(images, name)
                preds[name].append(predict_frames(policy, shown, instruction)[scored])
            parsed = parse_instruction(instruction)
            if parsed is not None:
                reworded = fill(HELD_OUT_PARAPHRASES[number % len(HELD_OUT_PARAPHRASES)], *parsed)
                worded["unperturbed"].append(preds["unperturbed"][-1])
                worded["paraphrase"].append(predict_frames(policy, images, reworded)[scored])
                worded["true"].append(true)
            if progress:
                progress(f"offline robustness: {number + 1}/{len(episode_ids)} episodes ({episode_id})")
    finally:
        policy.train(was_training)
    if not truths:
        raise ValueError(f"none of the {len(episode_ids)} episodes has a complete window")
    true = np.concatenate(truths)

    def accuracy(pred: list[np.ndarray], target: np.ndarray) -> float:
        return float(metrics.score(np.concatenate(pred), target, scale, dead_band)["first"]["direction_accuracy"])

    base = accuracy(preds["unperturbed"], true)
    result = {"predictions": int(len(true)), "unperturbed": base, "goal_drop": GOAL_ACCURACY_DROP, "perturbations": {
        name: {"description": IMAGE_PERTURBATIONS[name][0], "accuracy": (acc := accuracy(preds[name], true)),
               "drop": base - acc} for name in IMAGE_PERTURBATIONS}}
    if worded["true"]:
        target = np.concatenate(worded["true"])
        same = accuracy(worded["unperturbed"], target)
        acc = accuracy(worded["paraphrase"], target)
        result["paraphrase"] = {"description": "the instruction in a held-out wording", "accuracy": acc,
                                "unperturbed": same, "drop": same - acc, "predictions": int(len(target)),
                                "skipped": None}
    else:
        result["paraphrase"] = {"skipped": "no episode's instruction is in a known wording (free-form instructions "
                                           "cannot be reworded without changing what they ask)"}
    drops = {name: entry["drop"] for name, entry in result["perturbations"].items()}
    result["worst"] = max(drops, key=drops.get)
    result["within_goal"] = sorted(name for name, drop in drops.items() if drop <= GOAL_ACCURACY_DROP)
    return result


def offline_headline(result: dict) -> dict[str, float]:
    """Flat numbers for MLflow: offline_robustness_<name>_accuracy, the unperturbed and the worst drop."""
    numbers = {"offline_robustness_unperturbed_accuracy": result["unperturbed"]}
    for name, entry in result["perturbations"].items():
        numbers[f"offline_robustness_{name}_accuracy"] = entry["accuracy"]
    if not result["paraphrase"].get("skipped"):
        numbers["offline_robustness_paraphrase_accuracy"] = result["paraphrase"]["accuracy"]
    numbers["offline_robustness_worst_drop"] = max(entry["drop"] for entry in result["perturbations"].values())
    return {key: float(value) for key, value in numbers.items()}


@dataclass
class RobustnessReport:
    env: str
    episodes: int
    seed: int
    camera: str
    envs: int
    results: dict[str, list[RolloutResult]]  # NOMINAL first, then each condition run
    frames: dict[str, np.ndarray] = field(default_factory=dict, repr=False)  # the first scene's start frame, BGR

    @property
    def summary(self) -> dict:
        """{condition: {description, rollouts, success_rate, spl, collision_rate, ...}}."""
        return {name: {"description": CONDITIONS[name].description, "rollouts": len(results),
                       **{key: summarise(results)[key] for key in RATES}}
                for name, results in self.results.items()}

    def worst(self) -> tuple[str, float] | None:
        """The perturbed condition of the lowest success (the first of a tie), or None without one."""
        perturbed = {name: rates["success_rate"] for name, rates in self.summary.items() if name != NOMINAL}
        if not perturbed:
            return None
        name = min(perturbed, key=perturbed.get)
        return name, perturbed[name]

    def mean(self) -> float:
        perturbed = [rates["success_rate"] for name, rates in self.summary.items() if name != NOMINAL]
        return float(np.mean(perturbed)) if perturbed else math.nan

    def headline(self) -> dict[str, float]:
        """robustness_<condition>_success (nominal too), the worst and the mean over the perturbed ones."""
        numbers = {f"robustness_{name}_success": rates["success_rate"] for name, rates in self.summary.items()}
        worst = self.worst()
        if worst is not None:
            numbers["robustness_worst_success"] = worst[1]
            numbers["robustness_mean_success"] = self.mean()
        return {key: float(value) for key, value in numbers.items()}

    def record(self) -> dict:
        worst = self.worst()
        return {"env": self.env, "episodes": self.episodes, "seed": self.seed, "camera": self.camera,
                "envs": self.envs, "robustness": self.summary,
                "worst": {"condition": worst[0], "success_rate": worst[1]} if worst else None,
                "mean_success": self.mean() if worst else None,
                "goal_success": GOAL_SUCCESS,
                "rollouts": {name: [r.to_dict() for r in results] for name, results in self.results.items()}}


def condition_frames(conditions: Sequence[str], rollout: tuple[int, str], env_id: str, camera: str) -> dict[str, np.ndarray]:
    """The start frame (BGR) of one scene under each condition: what each one looks like."""
    from ..sim.env import BoxNavEnv

    seed, scenario = rollout
    frames = {}
    for name in conditions:
        env = BoxNavEnv(world=env_id, perturbation=name, **CAMERAS[camera])
        observation, _ = env.reset(seed=seed, options={"scenario": scenario})
        frames[name] = observation["image"]
    return frames


def robustness_rollouts(policy: StreamingPolicy, conditions: Sequence[str] = PERTURBED,
                        episodes: int = DEFAULT_EPISODES, seed: int = 0, envs: int = 2, camera: str = "720p",
                        env_id: str = WORLDS[-1], log: Callable[[str], None] = print,
                        on_result: Callable[[str, RolloutResult], None] | None = None) -> RobustnessReport:
    """The policy over the plan of `episodes` rollouts from `seed`, as trained and under each of
    `conditions`; `on_result(condition, result)` hears of every rollout."""
    if env_id not in WORLDS:
        raise ValueError(f"env {env_id!r}: no such simulated world (known: {', '.join(WORLDS)})")
    if camera not in CAMERAS:
        raise ValueError(f"camera {camera!r}: expected one of {', '.join(CAMERAS)}")
    unknown = [name for name in conditions if name not in CONDITIONS]
    if unknown:
        raise ValueError(f"perturbations {', '.join(unknown)}: expected names of {', '.join(PERTURBED)}")
    rollouts = plan(episodes, seed)
    names = [NOMINAL, *(name for name in conditions if name != NOMINAL)]
    results = {}
    for number, name in enumerate(names, 1):
        results[name] = run_rollouts(
            lambda: PolicyDriver(policy), rollouts, envs=envs, env_id=env_id,
            env_kwargs={**CAMERAS[camera], "perturbation": name},
            on_result=None if on_result is None else (lambda result, name=name: on_result(name, result)))
        rates = summarise(results[name])
        log(f"robustness {number}/{len(names)}: {name:<16} success {rates['success_rate']:.2f}, SPL {rates['spl']:.2f}, "
            f"collisions {rates['collision_rate']:.2f} ({len(rollouts)} rollouts)")
    return RobustnessReport(env_id, len(rollouts), seed, camera, envs, results,
                            condition_frames(names, rollouts[0], env_id, camera))


def frames_figure(frames: dict[str, np.ndarray], summary: dict | None = None, columns: int = 4,
                  width: int = 320) -> bytes:
    """PNG: each condition's frame, labelled with its name (and success, given the summary)."""
    tiles = []
    for name, frame in frames.items():
        tile = cv2.resize(frame, (width, round(width * frame.shape[0] / frame.shape[1])), interpolation=cv2.INTER_AREA)
        label = name + (f"  success {summary[name]['success_rate']:.2f}" if summary and name in summary else "")
        cv2.rectangle(tile, (0, 0), (width, 22), (0, 0, 0), -1)
        cv2.putText(tile, label, (6, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 255), 1, cv2.LINE_AA)
        tiles.append(tile)
    blank = np.zeros_like(tiles[0])
    tiles += [blank] * (-len(tiles) % columns)
    grid = np.vstack([np.hstack(tiles[i:i + columns]) for i in range(0, len(tiles), columns)])
    ok, png = cv2.imencode(".png", grid)
    if not ok:
        raise RuntimeError("frames_figure: PNG encoding failed")
    return png.tobytes()


def bar_chart(closed: dict | None, offline: dict | None) -> bytes:
    """PNG: closed-loop success per condition (the goal marked) and offline accuracy per
    perturbation (the unperturbed accuracy and the goal band marked), side by side."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = [p for p in (closed, offline) if p]
    if not panels:
        raise ValueError("bar_chart: nothing to draw")
    figure = Figure(figsize=(6 * len(panels), 4.2), layout="constrained")
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    index = 0
    if closed:
        ax = axes[index]
        names = list(closed)
        values = [closed[name]["success_rate"] for name in names]
        colours = ["tab:gray" if name == NOMINAL else ("tab:green" if v >= GOAL_SUCCESS else "tab:red")
                   for name, v in zip(names, values)]
        ax.barh(names[::-1], values[::-1], color=colours[::-1])
        ax.axvline(GOAL_SUCCESS, color="black", linestyle="--", linewidth=1, label=f"goal {GOAL_SUCCESS:.2f}")
        ax.set_xlim(0, 1)
        ax.set_xlabel("closed-loop success")
        ax.set_title("closed loop, per condition")
        ax.legend(loc="lower right")
        index += 1
    if offline:
        ax = axes[index]
        entries = dict(offline["perturbations"])
        if not offline["paraphrase"].get("skipped"):
            entries["paraphrase"] = offline["paraphrase"]
        names = list(entries)
        values = [entries[name]["accuracy"] for name in names]
        base = offline["unperturbed"]
        colours = ["tab:green" if base - v <= GOAL_ACCURACY_DROP else "tab:red" for v in values]
        ax.barh(names[::-1], values[::-1], color=colours[::-1])
        ax.axvline(base, color="black", linewidth=1, label=f"unperturbed {base:.2f}")
        ax.axvspan(base - GOAL_ACCURACY_DROP, base, color="tab:green", alpha=0.12,
                   label=f"goal: within {GOAL_ACCURACY_DROP:.2f}")
        ax.set_xlim(0, 1)
        ax.set_xlabel("first-step direction accuracy (validation)")
        ax.set_title("offline, per perturbation")
        ax.legend(loc="lower right")
    buffer = io.BytesIO()
    FigureCanvasAgg(figure).print_png(buffer)
    return buffer.getvalue()
