"""Rollouts as people look at them: top-down paths per scenario cell, and videos of the camera."""
from __future__ import annotations

import io
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np

from .rollout import DISTANCES, RolloutResult
from .scene import PRESS_SECONDS

OUTCOME_COLOURS = {"success": "tab:green", "collision": "tab:red", "wrong_side": "tab:orange",
                   "lost": "tab:purple", "stopped_away": "tab:brown", "timeout": "tab:gray", "invalid_action": "black",
                   "controller_error": "black"}
# Each rollout's scene (boxes, target) in a panel gets its own colour: which target goes with which boxes.
SCENE_COLOURS = ("tab:blue", "tab:olive", "tab:cyan", "tab:pink", "navy", "teal")
VIDEO_WIDTH = 320  # px; enough to see the scene, small enough to attach anywhere


def paths_figure(results: list[RolloutResult], columns: int = 4) -> bytes:
    """PNG: one top-down panel per side/distance/boxes cell (forward is up, the robot's left is
    left) with each rollout's scene and path: its boxes outlined and its target starred in a colour
    of its own, both labelled with their lateral offsets (m, + = left), the target's success
    circle (BoxNav-v1: the farthest arrival distance), and the path coloured by its outcome, its
    last pose ringed."""
    # The object-oriented API: no pyplot state, no backend switch for the whole process.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Circle, Rectangle

    if not results:
        raise ValueError("paths_figure: no rollouts to draw (results is empty)")
    cells: dict[str, list[RolloutResult]] = {}
    for result in results:
        cells.setdefault(result.cell, []).append(result)
    columns = min(columns, len(cells))
    rows = -(-len(cells) // columns)
    figure = Figure(figsize=(2.4 * columns, 3.6 * rows + 0.6))
    FigureCanvasAgg(figure)
    def reading_order(cell: str) -> tuple:  # left before right, near before far
        side, distance, boxes = cell.split("/")
        return side, DISTANCES.index(distance), boxes

    for panel, cell in enumerate(sorted(cells, key=reading_order)):
        cell_results = cells[cell]
        ax = figure.add_subplot(rows, columns, panel + 1)
        for number, result in enumerate(cell_results):
            own = SCENE_COLOURS[number % len(SCENE_COLOURS)]
            for x0, x1, y0, y1 in result.obstacles:  # plotted as (-y, x): left on the left, forward up
                ax.add_patch(Rectangle((-y1, x0), y1 - y0, x1 - x0, facecolor="tab:red", alpha=0.15, lw=0))
                ax.add_patch(Rectangle((-y1, x0), y1 - y0, x1 - x0, fill=False, edgecolor=own, lw=0.9))
            low, high = min(r[2] for r in result.obstacles), max(r[3] for r in result.obstacles)
            near = min(r[0] for r in result.obstacles)
            ax.annotate(f"{(low + high) / 2:+.2f}", (-(low + high) / 2, near), fontsize=6, color=own,
                        ha="center", va="top")
            tx, ty = result.target_xy
            ax.add_patch(Circle((-ty, tx), result.success_radius, fill=False, ls=":", color=own, lw=0.7))
            ax.plot(-ty, tx, marker="*", color=own, ms=8)
            ax.annotate(f"{ty:+.2f}", (-ty, tx), xytext=(0, 5), textcoords="offset points", fontsize=6,
                        color=own, ha="center")
            path = np.asarray(result.path)
            colour = OUTCOME_COLOURS.get(result.outcome, "black")
            ax.plot(-path[:, 1], path[:, 0], ".-", color=colour, lw=1.2, ms=3, alpha=0.8)
            ax.plot(-path[-1, 1], path[-1, 0], "o", mfc="none", mec=colour, ms=6)
        ax.set_title(f"{cell} ({len(cell_results)})", fontsize=9)
        ax.set_aspect("equal")
        ax.set_xlim(-2.6, 2.6)
        ax.set_ylim(-0.6, max(r.target_xy[0] + r.success_radius for r in cell_results) + 0.3)
        ax.tick_params(labelsize=7)
    present = [outcome for outcome in OUTCOME_COLOURS if any(r.outcome == outcome for r in results)]
    figure.legend([Line2D([], [], color=OUTCOME_COLOURS[o], lw=2) for o in present], present,
                  loc="lower center", ncol=len(present), fontsize=8, frameon=False)
    figure.tight_layout(rect=(0, 0.05, 1, 1))
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=80)
    return buffer.getvalue()


def write_video(frames_bgr: list[np.ndarray], path: str | Path, fps: float = 1 / PRESS_SECONDS) -> Path:
    """An H.264 MP4 (yuv420p, what browsers play) of the frames through PyAV, downscaled to
    VIDEO_WIDTH, one frame per press by default. Returns the path, with the suffix .mp4."""
    import av

    if len(frames_bgr) == 0:
        raise ValueError(f"{path}: no frames to write")
    height, width = frames_bgr[0].shape[:2]
    size = (VIDEO_WIDTH, max(2, round(height * VIDEO_WIDTH / width / 2) * 2))  # H.264 wants even sizes
    path = Path(path).with_suffix(".mp4")
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        for frame in frames_bgr:
            small = cv2.resize(frame, size, interpolation=cv2.INTER_AREA)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(small, format="bgr24")))
        container.mux(stream.encode())  # flush the encoder's delayed frames
    return path
