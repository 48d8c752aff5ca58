"""The simulated teleop operator: key guides, and episodes written in the collector's exact HDF5 layouts.

Every pixel and attribute comes from the numpy Generator passed in, so one seed always
gives byte-identical arrays. Images are drawn from the simulated robot pose, so obstacle,
target and floor move consistently with the recorded actions.
"""
from __future__ import annotations

import contextlib
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime, timedelta
from pathlib import Path
from typing import Callable

import h5py
import numpy as np

from ..data.schema import INSTRUCTION_TEMPLATE, KEY_ACTIONS, parse_scenario
from . import varied
from .render import Renderer
from .scene import APPROACH_PRESSES, PRESS_SECONDS, WORLD_ID, build_scene

WORLDS = (WORLD_ID, varied.WORLD_ID)
SAMPLE_WORLD = varied.WORLD_ID  # the sample episodes' world: only the camera tells its geometry

CORE_PRESSES = 17  # plus the episode_start frame: 18 frames
ACTION_CHUNK_SIZE = 8
LEFT_TO_RIGHT_KEYS = str.maketrans("adqezc", "daeqcz")


def episode_filename(when: datetime, scenario: str, basket_era: bool = False) -> str:
    prefix = "basket_" if basket_era else ""
    return f"episode_{when:%Y%m%d_%H%M%S}_{prefix}{scenario}.h5"


def guide_keys(side: str, distance: str, pattern: str, presses: int,
               rng: np.random.Generator | None = None, with_stop: bool = False) -> str:
    """Key presses (one char each, ' ' = stop) for going around the obstacle on `side`.

    Padded with 'w' to `presses`; longer when the manoeuvre itself needs more presses.
    `rng` is needed only for the "variant" pattern and `with_stop`.
    """
    approach, out, alongside, back = ["w"] * APPROACH_PRESSES[distance], ["a", "a"], ["w", "w"], ["d", "d"]
    if pattern == "variant":
        for tweak in rng.choice(4, size=int(rng.integers(1, 3)), replace=False):
            if tweak == 0:  # one press more or less on the approach
                approach = approach[:-1] if len(approach) > 1 and rng.random() < 0.5 else approach + ["w"]
            elif tweak == 1:
                out[0] = "q"  # cut the corner diagonally
            elif tweak == 2:
                back[-1] = "e"
            else:
                out, back = out + ["a"], back + ["d"]  # wider berth
    keys = approach + out + alongside + back
    if with_stop:
        keys.insert(int(rng.integers(1, len(keys) + 1)), " ")
    keys += ["w"] * max(presses - len(keys), 1)  # always at least one press towards the goal
    text = "".join(keys)
    return text if side == "left" else text.translate(LEFT_TO_RIGHT_KEYS)


def press_poses(keys: str) -> tuple[np.ndarray, np.ndarray, float]:
    """The recorded actions (T, 3) float32 of `keys`, the pose (T, 2) at each frame, and how far
    forward the last press ends (where the operator stops, short of the goal)."""
    actions = np.zeros((len(keys) + 1, 3), dtype=np.float32)
    actions[1:, :2] = [KEY_ACTIONS[k][:2] for k in keys]
    moves = actions[:, :2].astype(np.float64) * PRESS_SECONDS
    # Each frame is captured when its key is pressed, i.e. before that press moves the base.
    poses = np.cumsum(moves, axis=0) - moves
    return actions, poses, float(poses[-1, 0] + moves[-1, 0])


def core_goal_x(distance: str) -> float:
    """How far forward a scripted ("core") episode of CORE_PRESSES ends: where its scene puts the goal."""
    return press_poses(guide_keys("left", distance, "core", CORE_PRESSES))[2]


def _fixed_bytes(text: str) -> np.ndarray:
    encoded = text.encode("utf-8")
    return np.array([encoded], dtype=f"S{len(encoded)}")


def write_episode(path: Path, *, scenario: str, keys: str | None, rng: np.random.Generator,
                  layout: str = "legacy", instruction: str | None = None, basket_era: bool = False,
                  height: int = 720, width: int = 1280, when: datetime, world: str = WORLD_ID) -> Path:
    """Write one episode of `world`. `path` is the .h5 file (or a directory: the collector's name is used).

    `keys` holds one teleop key per press (' ' = stop). In BoxNav-v1 the scene is drawn first and
    `keys=None` lets the operator drive it (`varied.operator_keys`; a "variant" scenario strafes
    out one press wider). Legacy images are BGR, observations RGB.
    """
    if layout not in ("legacy", "observations"):
        raise ValueError(f"unknown layout {layout!r}: expected 'legacy' or 'observations'")
    if world not in WORLDS:
        raise ValueError(f"unknown world {world!r}: expected one of {', '.join(WORLDS)}")
    if keys is None and world == WORLD_ID:
        raise ValueError(f"{WORLD_ID} episodes need their keys")
    path = Path(path)
    if path.is_dir():
        path = path / episode_filename(when, scenario, basket_era)
    tokens = parse_scenario(scenario)
    if tokens is None:
        raise ValueError(f"scenario {scenario!r} has no scenario tokens: expected "
                         "{1box|2box}_{hori|vert}_{left|right}_{core|variant}_{close|medium|far}")
    target = "basket" if basket_era else ("bottle" if instruction and "bottle" in instruction else "cup")
    if layout == "observations" and instruction is None:
        instruction = INSTRUCTION_TEMPLATE.format(side=tokens.side, target=target)

    if world == WORLD_ID:
        scene = build_scene(tokens, target, press_poses(keys)[2], rng)
    else:
        scene = varied.build_varied_scene(tokens, target, rng)
        if keys is None:
            keys = varied.operator_keys([(b.x0, b.x1, b.y0, b.y1) for b in scene.boxes], scene.target_xy,
                                        tokens.side, wider=tokens.pattern == "variant")
    actions, poses, _ = press_poses(keys)
    events = ["episode_start"] + ["stop_action" if k == " " else "start_action" for k in keys]
    renderer = Renderer(scene, rng, height, width)
    images = np.stack([renderer.frame(x, y) for x, y in poses])

    with h5py.File(path, "w") as f:
        if layout == "legacy":
            f.create_dataset("images", data=images, compression="gzip", chunks=True)
            f.create_dataset("actions", data=actions, compression="gzip", chunks=True)
            f.create_dataset("action_event_types", data=np.array(events, dtype=object),
                             dtype=h5py.string_dtype("utf-8"), compression="gzip", chunks=True)
            if instruction is not None:
                f.create_dataset("language_instruction", data=_fixed_bytes(instruction),
                                 compression="gzip", chunks=True)
            f.attrs.update({
                "episode_name": path.stem,
                "total_duration": float(len(keys) * PRESS_SECONDS + rng.uniform(0.2, 0.9)),
                "num_frames": len(events),
                "action_chunk_size": ACTION_CHUNK_SIZE,
                "obstacle_layout_type": tokens.layout,
                "time_period": "morning" if when.hour < 12 else "afternoon" if when.hour < 17 else "evening",
                "collection_datetime": when.isoformat(),
                "collection_hour": when.hour,
                "collection_minute": when.minute,
                "simulator": world,
            })
        else:
            f.create_dataset("observations/images", data=np.ascontiguousarray(images[..., ::-1]), compression="gzip", chunks=True)
            f.create_dataset("actions", data=actions, compression="gzip", chunks=True)
            f.create_dataset("language_instruction", data=_fixed_bytes(instruction),
                             compression="gzip", chunks=True)
            f.attrs.update({"scenario": scenario, "pattern": tokens.pattern, "distance": tokens.distance,
                            "simulator": world})
    return path


def write_sample_episodes(out_dir: str | Path, n: int, seed: int = 0, *, height: int = 720,
                          width: int = 1280, progress: Callable[[str], None] | None = None,
                          workers: int | None = None, world: str = SAMPLE_WORLD) -> list[Path]:
    """Write `n` episodes of `world`; the last ~1 in 6 are the later basket era in the observations layout.

    BoxNav-v1 (the default): the operator drives each drawn scene (`varied.operator_keys`), and
    every episode ends with its stop press. BoxNav-v0: the scripted key guides, some episodes
    shorter or longer than 18 frames, some with a stop press part-way.

    Every episode is planned here, in order, then rendered and written by `workers` processes
    (default: every CPU for camera-size frames, this process alone for small test frames); each
    episode draws from its own generator, so the files are the same whatever the count."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    n_basket = (n + 2) // 6
    clock = datetime(2025, 6, 14, 9, 12, 5)
    jobs = []
    for i in range(n):
        basket_era = i >= n - n_basket
        if basket_era:
            clock = max(clock, datetime(2025, 8, 20, 9, 40, 17))
        side = ("left", "right")[i % 2]
        scenario = "_".join([str(rng.choice(["1box", "2box"])), str(rng.choice(["hori", "vert"])), side,
                             "core" if rng.random() < 0.6 else "variant",
                             str(rng.choice(["close", "medium", "far"]))])
        episode_rng = np.random.default_rng([seed, i])  # episode i is the same whatever n is
        keys = None  # v1: the operator drives the scene it is shown
        if world == WORLD_ID:
            presses = CORE_PRESSES
            if i % 10 == 4:
                presses = int(rng.integers(11, 17))  # 12-17 frames
            elif i % 10 == 8:
                presses = int(rng.integers(19, 24))  # 20-24 frames
            _, _, _, pattern, distance = scenario.split("_")
            keys = guide_keys(side, distance, pattern, presses, episode_rng, with_stop=i % 10 == 2)
        instruction = None
        if basket_era:
            instruction = INSTRUCTION_TEMPLATE.format(side=side, target="basket")
        elif i % 3 == 1:
            instruction = INSTRUCTION_TEMPLATE.format(side=side, target="bottle" if rng.random() < 0.3 else "cup")
        jobs.append(dict(path=out_dir / episode_filename(clock, scenario, basket_era), scenario=scenario,
                         keys=keys, rng=episode_rng, layout="observations" if basket_era else "legacy",
                         instruction=instruction, basket_era=basket_era, height=height, width=width, when=clock,
                         world=world))
        clock += timedelta(minutes=int(rng.integers(3, 75)), seconds=int(rng.integers(0, 60)))
        if clock.hour >= 19:  # collection stops for the day
            clock = (clock + timedelta(days=1)).replace(hour=9, minute=int(rng.integers(0, 60)))
    if workers is None:
        workers = (os.cpu_count() or 1) if height * width >= 640 * 360 else 1
    paths = []
    with contextlib.ExitStack() as stack:
        if workers > 1 and len(jobs) > 1:
            # forkserver, never fork: a forked child inherits OpenCV's thread-pool locks as they are
            context = multiprocessing.get_context("forkserver")
            written = stack.enter_context(ProcessPoolExecutor(min(workers, len(jobs)), mp_context=context)).map(
                _write_job, jobs)
        else:
            written = map(_write_job, jobs)
        for job, path in zip(jobs, written):
            paths.append(path)
            if progress is not None:
                with h5py.File(path, "r") as f:
                    frames = len(f["actions"])
                progress(f"wrote {path.name} ({frames} frames)")
    return paths


def _write_job(job: dict) -> Path:
    return write_episode(**job)
