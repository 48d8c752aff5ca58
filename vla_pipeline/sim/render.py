"""The robot's camera: frames of a scene drawn at a pose, BGR like the collector's images."""
from __future__ import annotations

from dataclasses import dataclass, replace

import cv2
import numpy as np

from . import perturb
from .scene import WALL_X, Box, Scene

CAMERA_HEIGHT = 0.32  # m; low enough that the boxes hide the target at first
FLOOR_TILE = 0.5  # m
FLOOR_CONTRAST = 0.14  # the odd tiles are this much darker
NEAR_PLANE = 0.12  # m; geometry closer than this is clipped away
TARGET_BGR = {"cup": (190, 110, 30), "bottle": (60, 160, 40), "basket": (60, 170, 220)}
NOISE_PAD = 16  # the speckle bank is this much larger than a frame, so each frame shows another crop


@dataclass
class Camera:
    height: int
    width: int
    focal: float
    cx: float
    horizon: float
    column_lateral: np.ndarray  # per pixel column: world lateral offset per metre of depth
    mount: float = CAMERA_HEIGHT  # m above the floor

    @classmethod
    def for_size(cls, height: int, width: int, look: perturb.Condition = perturb.CONDITIONS[perturb.NOMINAL]) -> "Camera":
        """The robot's camera at that frame size; `look` may move it on its mount (height, pitch)."""
        focal = 0.55 * width  # ~85 degree horizontal field of view, like a wide robot camera
        lateral = -(np.arange(width, dtype=np.float32) + 0.5 - width / 2) / focal
        # A small pitch moves the horizon by focal × tan(pitch) (the perspective's own tilt is left out).
        return cls(height, width, focal, width / 2, 0.4 * height + perturb.horizon_shift(look, focal), lateral,
                   CAMERA_HEIGHT + look.camera_height)

    def project(self, rel: np.ndarray) -> np.ndarray:
        """(N, 3) robot-relative points (x forward, y left, z up) -> (N, 2) pixel u, v."""
        u = self.cx - self.focal * rel[:, 1] / rel[:, 0]
        v = self.horizon + self.focal * (self.mount - rel[:, 2]) / rel[:, 0]
        return np.stack([u, v], axis=1)


class Renderer:
    """Draws the frames of one episode of `scene`, one per call of `frame(x, y)`.

    The sensor speckle is drawn from `rng` once, here; every frame then draws its body bounce,
    lighting and speckle crop from the same `rng`, so a seed fixes the whole sequence of frames.

    `look` (a robustness condition, `perturb.CONDITIONS`) restyles what is drawn and degrades each
    frame; its own draws come from `look_rng`, so `rng` draws the same with any `look`.
    """

    def __init__(self, scene: Scene, rng: np.random.Generator, height: int, width: int,
                 look: perturb.Condition | None = None, look_rng: np.random.Generator | None = None):
        self.look = look or perturb.CONDITIONS[perturb.NOMINAL]
        self.look_rng = look_rng if look_rng is not None else np.random.default_rng(0)
        self.scene, self.distractors = perturb.restyle(scene, self.look, self.look_rng)
        scene, self.rng = self.scene, rng
        self.camera = Camera.for_size(height, width, self.look)
        ramp = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
        self.wall_rows = (scene.wall_top_bgr * (1 - ramp) + scene.wall_bottom_bgr * ramp).astype(np.uint8)
        # Sparse sensor speckle: dense noise would triple the gzip size and time of every file.
        speckle = rng.integers(-2, 3, size=(height + NOISE_PAD, width + NOISE_PAD, 3), dtype=np.int16)
        self.noise_bank = np.where(rng.random(speckle.shape) < 0.1, speckle, 0).astype(np.int16)

    def frame(self, x: float, y: float) -> np.ndarray:
        """(H, W, 3) uint8 BGR: what the camera sees with the robot at (x, y)."""
        scene, rng, height, width = self.scene, self.rng, self.camera.height, self.camera.width
        cam = replace(self.camera, horizon=self.camera.horizon + rng.normal(0.0, 1.5))  # body bounce
        img = np.empty((height, width, 3), dtype=np.uint8)
        self._draw_floor_and_wall(img, cam, x, y)
        objects = [(float(np.hypot(scene.target_xy[0] - x, scene.target_xy[1] - y)), 0.0, None)]
        objects += [(float(np.hypot((b.x0 + b.x1) / 2 - x, (b.y0 + b.y1) / 2 - y)), b.z0, b)
                    for b in scene.boxes + self.distractors]
        for _dist, _z, box in sorted(objects, key=lambda o: (-o[0], o[1])):  # painter's order: far first
            if box is None:
                _draw_target(img, scene, cam, x, y)
            else:
                _draw_box(img, box, cam, x, y)
        oy, ox = rng.integers(0, NOISE_PAD, size=2)
        lit = cv2.convertScaleAbs(img, alpha=1.0 + rng.normal(0.0, 0.03), beta=rng.normal(0.0, 3.0))
        shown = cv2.add(lit, self.noise_bank[oy:oy + height, ox:ox + width], dtype=cv2.CV_8U)
        return perturb.degrade(shown, self.look, self.look_rng)

    def _draw_floor_and_wall(self, img: np.ndarray, cam: Camera, x: float, y: float) -> None:
        to_wall = WALL_X - x
        wall_base = int(np.clip(np.ceil(cam.horizon + cam.focal * cam.mount / to_wall), 0, cam.height))
        img[:wall_base] = self.wall_rows[:wall_base]
        rows = np.arange(wall_base, cam.height, dtype=np.float32) + 0.5
        depth = cam.focal * cam.mount / (rows - cam.horizon)
        tile = self.look.floor_tile or FLOOR_TILE
        contrast = FLOOR_CONTRAST if self.look.floor_contrast is None else self.look.floor_contrast
        tile_x = np.floor((depth + x) / tile).astype(np.int32)[:, None]
        tile_y = np.floor((y + depth[:, None] * cam.column_lateral) / tile).astype(np.int32)
        fog = np.clip(depth / WALL_X, 0.0, 1.0)[:, None]  # fades the checker so the horizon doesn't alias
        brightness = (1.0 - contrast * ((tile_x + tile_y) & 1) * (1.0 - fog)) * (0.75 + 0.25 * (1.0 - fog))
        img[wall_base:] = (brightness[:, :, None] * self.scene.floor_bgr).astype(np.uint8)

        def wall_point(wy: float, wz: float) -> tuple[int, int]:
            u, v = cam.project(np.array([[to_wall, wy - y, wz]], dtype=np.float64))[0]
            return int(u), int(v)

        cv2.rectangle(img, wall_point(12.0, 0.12), wall_point(-12.0, 0.0), (95, 100, 110), -1)  # skirting
        for seam_y in np.arange(-9.0, 9.1, 1.5):
            cv2.line(img, wall_point(seam_y, 0.12), wall_point(seam_y, 3.0), (150, 155, 165), 1)
        door_y = self.scene.door_y
        cv2.rectangle(img, wall_point(door_y + 0.9, 2.0), wall_point(door_y, 0.0), (70, 100, 140), -1)


def _clip_to_near_plane(face: np.ndarray) -> np.ndarray:
    kept = []
    for a, b in zip(face, np.roll(face, -1, axis=0)):
        if a[0] >= NEAR_PLANE:
            kept.append(a)
        if (a[0] >= NEAR_PLANE) != (b[0] >= NEAR_PLANE):
            kept.append(a + (NEAR_PLANE - a[0]) / (b[0] - a[0]) * (b - a))
    return np.array(kept)


def _draw_box(img: np.ndarray, box: Box, cam: Camera, x: float, y: float) -> None:
    x0, x1, y0, y1, z0, z1 = box.x0 - x, box.x1 - x, box.y0 - y, box.y1 - y, box.z0, box.z1
    faces = []  # (corners, shade); only faces turned towards the camera
    if x0 > 0:
        faces.append(([(x0, y0, z0), (x0, y1, z0), (x0, y1, z1), (x0, y0, z1)], 1.0))
    if y1 < 0:
        faces.append(([(x0, y1, z0), (x1, y1, z0), (x1, y1, z1), (x0, y1, z1)], 0.7))
    if y0 > 0:
        faces.append(([(x0, y0, z0), (x1, y0, z0), (x1, y0, z1), (x0, y0, z1)], 0.7))
    if z1 < cam.mount:
        faces.append(([(x0, y0, z1), (x1, y0, z1), (x1, y1, z1), (x0, y1, z1)], 1.2))
    for corners, shade in faces:
        clipped = _clip_to_near_plane(np.array(corners, dtype=np.float64))
        if len(clipped) < 3:
            continue
        pixels = np.round(cam.project(clipped)).astype(np.int32)
        cv2.fillConvexPoly(img, pixels, tuple(min(255, int(c * shade)) for c in box.bgr), cv2.LINE_AA)
        cv2.polylines(img, [pixels], True, tuple(int(c * 0.5) for c in box.bgr), 2, cv2.LINE_AA)


def _draw_target(img: np.ndarray, scene: Scene, cam: Camera, x: float, y: float) -> None:
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
