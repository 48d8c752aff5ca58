"""Deterministic synthetic teleop episodes, written in the data collector's exact HDF5 layout.

Every pixel and attribute comes from the numpy Generator passed in, so one seed always
gives byte-identical arrays. Images are drawn from a simulated robot pose, so obstacle,
target and floor move consistently with the recorded actions.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Callable

import cv2
import h5py
import numpy as np

from .schema import ACTION_SCALE, INSTRUCTION_TEMPLATE, KEY_ACTIONS

PRESS_SECONDS = 0.4
STEP = ACTION_SCALE * PRESS_SECONDS
CORE_PRESSES = 17  # plus the episode_start frame: 18 frames
ACTION_CHUNK_SIZE = 8
LEFT_TO_RIGHT_KEYS = str.maketrans("adqezc", "daeqcz")
APPROACH_PRESSES = {"close": 2, "medium": 3, "far": 4}

CAMERA_HEIGHT = 0.32  # m; low enough that the boxes hide the target at first
WALL_X = 11.0  # back wall, beyond any goal
FLOOR_TILE = 0.5  # m
NEAR_PLANE = 0.12  # m; geometry closer than this is clipped away
OBSTACLE_BGR = (40, 40, 200)  # red
TARGET_BGR = {"cup": (190, 110, 30), "bottle": (60, 160, 40), "basket": (60, 170, 220)}


def instruction_for(side: str, target: str) -> str:
    return INSTRUCTION_TEMPLATE.format(side=side, target=target)


def episode_filename(when: datetime, scenario: str, basket_era: bool = False) -> str:
    prefix = "basket_" if basket_era else ""
    return f"episode_{when:%Y%m%d_%H%M%S}_{prefix}{scenario}.h5"


def guide_keys(side: str, distance: str, pattern: str, presses: int,
               rng: np.random.Generator, with_stop: bool = False) -> str:
    """Key presses (one char each, ' ' = stop) for going around the obstacle on `side`.

    Padded with 'w' to `presses`; longer when the manoeuvre itself needs more presses.
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


@dataclass
class _Box:
    x0: float
    x1: float
    y0: float
    y1: float
    z0: float
    z1: float
    bgr: tuple[int, int, int]


@dataclass
class _Scene:
    boxes: list[_Box]
    target: str
    target_xy: tuple[float, float]
    floor_bgr: np.ndarray
    wall_rows: np.ndarray  # (H, 1, 3) uint8 vertical wall gradient
    door_y: float


@dataclass
class _Camera:
    height: int
    width: int
    focal: float
    cx: float
    horizon: float
    column_lateral: np.ndarray  # per pixel column: world lateral offset per metre of depth

    @classmethod
    def for_size(cls, height: int, width: int) -> "_Camera":
        focal = 0.55 * width  # ~85 degree horizontal field of view, like a wide robot camera
        lateral = -(np.arange(width, dtype=np.float32) + 0.5 - width / 2) / focal
        return cls(height, width, focal, width / 2, 0.4 * height, lateral)

    def project(self, rel: np.ndarray) -> np.ndarray:
        """(N, 3) robot-relative points (x forward, y left, z up) -> (N, 2) pixel u, v."""
        u = self.cx - self.focal * rel[:, 1] / rel[:, 0]
        v = self.horizon + self.focal * (CAMERA_HEIGHT - rel[:, 2]) / rel[:, 0]
        return np.stack([u, v], axis=1)


def _jitter(bgr, rng: np.random.Generator, spread: int = 12) -> tuple[int, int, int]:
    return tuple(int(np.clip(c + rng.integers(-spread, spread + 1), 0, 255)) for c in bgr)


def _build_scene(scenario: str, target: str, goal_x: float, height: int,
                 rng: np.random.Generator) -> _Scene:
    count, arrangement, _side, _pattern, distance = scenario.split("_")
    near = STEP * APPROACH_PRESSES[distance] + 0.45 + rng.uniform(-0.05, 0.05)
    far = near + 0.3
    shift = rng.uniform(-0.05, 0.05)
    if count == "1box":  # hori: long low box across the path; vert: tall narrow box
        half_width, top = (0.35, 0.35) if arrangement == "hori" else (0.2, 0.75)
        extents = [(-half_width, half_width, 0.0, top)]
    elif arrangement == "hori":  # two boxes side by side
        extents = [(-0.42, -0.02, 0.0, 0.35), (0.02, 0.42, 0.0, 0.35)]
    else:  # two boxes stacked
        extents = [(-0.25, 0.25, 0.0, 0.35), (-0.2, 0.2, 0.35, 0.65)]
    boxes = [_Box(near, far, y0 + shift, y1 + shift, z0, z1,
                  _jitter(tuple(int(c * (1 - 0.2 * i)) for c in OBSTACLE_BGR), rng))
             for i, (y0, y1, z0, z1) in enumerate(extents)]
    # The episode ends just short of the goal, so the target sits a little past the final pose.
    target_xy = (max(goal_x + 0.9, far + 1.2), rng.uniform(-0.1, 0.1))
    top_bgr, bottom_bgr = np.array(_jitter((200, 205, 215), rng)), np.array(_jitter((170, 178, 190), rng))
    ramp = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    wall_rows = (top_bgr * (1 - ramp) + bottom_bgr * ramp).astype(np.uint8)
    floor_bgr = np.array(_jitter((150, 165, 180), rng), dtype=np.float32)
    return _Scene(boxes, target, target_xy, floor_bgr, wall_rows, rng.uniform(0.8, 2.5))


def _draw_floor_and_wall(img: np.ndarray, scene: _Scene, cam: _Camera, x: float, y: float) -> None:
    to_wall = WALL_X - x
    wall_base = int(np.clip(np.ceil(cam.horizon + cam.focal * CAMERA_HEIGHT / to_wall), 0, cam.height))
    img[:wall_base] = scene.wall_rows[:wall_base]
    rows = np.arange(wall_base, cam.height, dtype=np.float32) + 0.5
    depth = cam.focal * CAMERA_HEIGHT / (rows - cam.horizon)
    tile_x = np.floor((depth + x) / FLOOR_TILE).astype(np.int32)[:, None]
    tile_y = np.floor((y + depth[:, None] * cam.column_lateral) / FLOOR_TILE).astype(np.int32)
    fog = np.clip(depth / WALL_X, 0.0, 1.0)[:, None]  # fades the checker so the horizon doesn't alias
    brightness = (1.0 - 0.14 * ((tile_x + tile_y) & 1) * (1.0 - fog)) * (0.75 + 0.25 * (1.0 - fog))
    img[wall_base:] = (brightness[:, :, None] * scene.floor_bgr).astype(np.uint8)

    def wall_point(wy: float, wz: float) -> tuple[int, int]:
        u, v = cam.project(np.array([[to_wall, wy - y, wz]], dtype=np.float64))[0]
        return int(u), int(v)

    cv2.rectangle(img, wall_point(12.0, 0.12), wall_point(-12.0, 0.0), (95, 100, 110), -1)  # skirting
    for seam_y in np.arange(-9.0, 9.1, 1.5):
        cv2.line(img, wall_point(seam_y, 0.12), wall_point(seam_y, 3.0), (150, 155, 165), 1)
    cv2.rectangle(img, wall_point(scene.door_y + 0.9, 2.0), wall_point(scene.door_y, 0.0), (70, 100, 140), -1)


def _clip_to_near_plane(face: np.ndarray) -> np.ndarray:
    kept = []
    for a, b in zip(face, np.roll(face, -1, axis=0)):
        if a[0] >= NEAR_PLANE:
            kept.append(a)
        if (a[0] >= NEAR_PLANE) != (b[0] >= NEAR_PLANE):
            kept.append(a + (NEAR_PLANE - a[0]) / (b[0] - a[0]) * (b - a))
    return np.array(kept)


def _draw_box(img: np.ndarray, box: _Box, cam: _Camera, x: float, y: float) -> None:
    x0, x1, y0, y1, z0, z1 = box.x0 - x, box.x1 - x, box.y0 - y, box.y1 - y, box.z0, box.z1
    faces = []  # (corners, shade); only faces turned towards the camera
    if x0 > 0:
        faces.append(([(x0, y0, z0), (x0, y1, z0), (x0, y1, z1), (x0, y0, z1)], 1.0))
    if y1 < 0:
        faces.append(([(x0, y1, z0), (x1, y1, z0), (x1, y1, z1), (x0, y1, z1)], 0.7))
    if y0 > 0:
        faces.append(([(x0, y0, z0), (x1, y0, z0), (x1, y0, z1), (x0, y0, z1)], 0.7))
    if z1 < CAMERA_HEIGHT:
        faces.append(([(x0, y0, z1), (x1, y0, z1), (x1, y1, z1), (x0, y1, z1)], 1.2))
    for corners, shade in faces:
        clipped = _clip_to_near_plane(np.array(corners, dtype=np.float64))
        if len(clipped) < 3:
            continue
        pixels = np.round(cam.project(clipped)).astype(np.int32)
        cv2.fillConvexPoly(img, pixels, tuple(min(255, int(c * shade)) for c in box.bgr), cv2.LINE_AA)
        cv2.polylines(img, [pixels], True, tuple(int(c * 0.5) for c in box.bgr), 2, cv2.LINE_AA)


def _draw_target(img: np.ndarray, scene: _Scene, cam: _Camera, x: float, y: float) -> None:
    depth, lateral = scene.target_xy[0] - x, scene.target_xy[1] - y
    if depth < 0.3:
        return
    (u, v), = cam.project(np.array([[depth, lateral, 0.0]]))
    scale = cam.focal / depth  # pixels per metre at the target
    bgr = TARGET_BGR[scene.target]
    dark = tuple(int(c * 0.6) for c in bgr)

    def px(dx: float, dz: float) -> tuple[int, int]:
        return int(u + dx * scale), int(v - dz * scale)

    def size(metres: float) -> int:
        return max(1, int(metres * scale))

    if scene.target == "cup":
        cv2.ellipse(img, px(0.11, 0.12), (size(0.05), size(0.06)), 0, 0, 360, dark, size(0.02), cv2.LINE_AA)
        body = np.array([px(-0.07, 0), px(0.07, 0), px(0.09, 0.22), px(-0.09, 0.22)], np.int32)
        cv2.fillConvexPoly(img, body, bgr, cv2.LINE_AA)
        cv2.ellipse(img, px(0, 0.22), (size(0.09), size(0.025)), 0, 0, 360, dark, -1, cv2.LINE_AA)
    elif scene.target == "bottle":
        cv2.rectangle(img, px(-0.05, 0), px(0.05, 0.22), bgr, -1)
        cv2.fillConvexPoly(img, np.array([px(-0.05, 0.22), px(0.05, 0.22), px(0.02, 0.28), px(-0.02, 0.28)],
                                         np.int32), bgr, cv2.LINE_AA)
        cv2.rectangle(img, px(-0.02, 0.28), px(0.02, 0.33), (230, 230, 230), -1)
        cv2.rectangle(img, px(-0.05, 0.07), px(0.05, 0.14), (235, 240, 245), -1)  # label
    else:  # basket: wide woven trapezoid with a handle
        cv2.ellipse(img, px(0, 0.28), (size(0.2), size(0.2)), 0, 180, 360, dark, size(0.02), cv2.LINE_AA)
        body = np.array([px(-0.18, 0), px(0.18, 0), px(0.23, 0.28), px(-0.23, 0.28)], np.int32)
        cv2.fillConvexPoly(img, body, bgr, cv2.LINE_AA)
        for dz in (0.07, 0.14, 0.21):
            cv2.line(img, px(-0.2, dz), px(0.2, dz), dark, size(0.01), cv2.LINE_AA)


def _render_episode(scene: _Scene, poses: np.ndarray, rng: np.random.Generator,
                    height: int, width: int) -> np.ndarray:
    base_cam = _Camera.for_size(height, width)
    pad = 16
    # Sparse sensor speckle: dense noise would triple the gzip size and time of every file.
    speckle = rng.integers(-2, 3, size=(height + pad, width + pad, 3), dtype=np.int16)
    noise_bank = np.where(rng.random(speckle.shape) < 0.1, speckle, 0).astype(np.int16)
    frames = np.empty((len(poses), height, width, 3), dtype=np.uint8)
    for i, (x, y) in enumerate(poses):
        cam = replace(base_cam, horizon=base_cam.horizon + rng.normal(0.0, 1.5))  # body bounce
        img = np.empty((height, width, 3), dtype=np.uint8)
        _draw_floor_and_wall(img, scene, cam, x, y)
        objects = [(float(np.hypot(scene.target_xy[0] - x, scene.target_xy[1] - y)), 0.0, None)]
        objects += [(float(np.hypot((b.x0 + b.x1) / 2 - x, (b.y0 + b.y1) / 2 - y)), b.z0, b) for b in scene.boxes]
        for _dist, _z, box in sorted(objects, key=lambda o: (-o[0], o[1])):  # painter's order: far first
            if box is None:
                _draw_target(img, scene, cam, x, y)
            else:
                _draw_box(img, box, cam, x, y)
        oy, ox = rng.integers(0, pad, size=2)
        lit = cv2.convertScaleAbs(img, alpha=1.0 + rng.normal(0.0, 0.03), beta=rng.normal(0.0, 3.0))
        frames[i] = cv2.add(lit, noise_bank[oy:oy + height, ox:ox + width], dtype=cv2.CV_8U)
    return frames


def _fixed_bytes(text: str) -> np.ndarray:
    encoded = text.encode("utf-8")
    return np.array([encoded], dtype=f"S{len(encoded)}")


def write_episode(path: Path, *, scenario: str, keys: str, rng: np.random.Generator,
                  layout: str = "legacy", instruction: str | None = None, basket_era: bool = False,
                  height: int = 720, width: int = 1280, when: datetime) -> Path:
    """Write one episode. `path` is the .h5 file (or a directory: the collector's name is used).

    `keys` holds one teleop key per press (' ' = stop). Legacy images are BGR, observations RGB.
    """
    if layout not in ("legacy", "observations"):
        raise ValueError(f"unknown layout {layout!r}")
    path = Path(path)
    if path.is_dir():
        path = path / episode_filename(when, scenario, basket_era)
    side, pattern, distance = scenario.split("_")[2:5]
    target = "basket" if basket_era else ("bottle" if instruction and "bottle" in instruction else "cup")
    if layout == "observations" and instruction is None:
        instruction = instruction_for(side, target)

    actions = np.zeros((len(keys) + 1, 3), dtype=np.float32)
    actions[1:, :2] = [KEY_ACTIONS[k][:2] for k in keys]
    events = ["episode_start"] + ["stop_action" if k == " " else "start_action" for k in keys]
    moves = actions[:, :2].astype(np.float64) * PRESS_SECONDS
    # Each frame is captured when its key is pressed, i.e. before that press moves the base.
    poses = np.cumsum(moves, axis=0) - moves
    scene = _build_scene(scenario, target, float(poses[-1, 0] + moves[-1, 0]), height, rng)
    images = _render_episode(scene, poses, rng, height, width)

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
                "obstacle_layout_type": scenario.split("_")[1],
                "time_period": "morning" if when.hour < 12 else "afternoon" if when.hour < 17 else "evening",
                "collection_datetime": when.isoformat(),
                "collection_hour": when.hour,
                "collection_minute": when.minute,
            })
        else:
            f.create_dataset("observations/images", data=np.ascontiguousarray(images[..., ::-1]), compression="gzip", chunks=True)
            f.create_dataset("actions", data=actions, compression="gzip", chunks=True)
            f.create_dataset("language_instruction", data=_fixed_bytes(instruction),
                             compression="gzip", chunks=True)
            f.attrs.update({"scenario": scenario, "pattern": pattern, "distance": distance})
    return path


def write_sample_episodes(out_dir: str | Path, n: int, seed: int = 0, *, height: int = 720,
                          width: int = 1280, progress: Callable[[str], None] | None = None) -> list[Path]:
    """Write `n` episodes; the last ~1 in 6 are the later basket era in the observations layout."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    n_basket = (n + 2) // 6
    clock = datetime(2025, 6, 14, 9, 12, 5)
    paths = []
    for i in range(n):
        basket_era = i >= n - n_basket
        if basket_era:
            clock = max(clock, datetime(2025, 8, 20, 9, 40, 17))
        side = ("left", "right")[i % 2]
        scenario = "_".join([str(rng.choice(["1box", "2box"])), str(rng.choice(["hori", "vert"])), side,
                             "core" if rng.random() < 0.6 else "variant",
                             str(rng.choice(["close", "medium", "far"]))])
        presses = CORE_PRESSES
        if i % 10 == 4:
            presses = int(rng.integers(11, 17))  # 12-17 frames
        elif i % 10 == 8:
            presses = int(rng.integers(19, 24))  # 20-24 frames
        _, _, _, pattern, distance = scenario.split("_")
        episode_rng = np.random.default_rng([seed, i])  # episode i is the same whatever n is
        keys = guide_keys(side, distance, pattern, presses, episode_rng, with_stop=i % 10 == 2)
        instruction = None
        if basket_era:
            instruction = instruction_for(side, "basket")
        elif i % 3 == 1:
            instruction = instruction_for(side, "bottle" if rng.random() < 0.3 else "cup")
        path = write_episode(out_dir / episode_filename(clock, scenario, basket_era), scenario=scenario,
                             keys=keys, rng=episode_rng, layout="observations" if basket_era else "legacy",
                             instruction=instruction, basket_era=basket_era, height=height, width=width,
                             when=clock)
        paths.append(path)
        if progress is not None:
            progress(f"wrote {path.name} ({len(keys) + 1} frames)")
        clock += timedelta(minutes=int(rng.integers(3, 75)), seconds=int(rng.integers(0, 60)))
        if clock.hour >= 19:  # collection stops for the day
            clock = (clock + timedelta(days=1)).replace(hour=9, minute=int(rng.integers(0, 60)))
    return paths
