"""Pictures of rollouts: the top-down paths figure and the camera video."""

from __future__ import annotations

import cv2
import numpy as np

from vla_pipeline.sim.controllers import AlwaysForward, ScriptedGuide
from vla_pipeline.sim.report import VIDEO_WIDTH, paths_figure, write_video
from vla_pipeline.sim.rollout import plan, run_rollouts

SMALL = {"height": 90, "width": 160}


def test_the_paths_figure_is_a_png_with_a_panel_per_cell():
    rollouts = plan(4, 0)
    results = (run_rollouts(ScriptedGuide, rollouts, env_kwargs=SMALL)
               + run_rollouts(AlwaysForward, rollouts, env_kwargs=SMALL))
    png = paths_figure(results)
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    image = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
    assert image.shape[1] > image.shape[0]  # 4 panels side by side


def test_the_video_opens_again_with_every_frame(tmp_path):
    result = run_rollouts(ScriptedGuide, plan(1, 0), env_kwargs={"height": 180, "width": 320},
                          keep_frames=True)[0]
    path = write_video(result.frames, tmp_path / "rollout.mp4")
    assert path.suffix == ".mp4", "this OpenCV build cannot write MP4: the GIF fallback was used"
    video = cv2.VideoCapture(str(path))
    try:
        assert video.isOpened()
        assert int(video.get(cv2.CAP_PROP_FRAME_COUNT)) == len(result.frames) == result.presses + 1
        assert int(video.get(cv2.CAP_PROP_FRAME_WIDTH)) == VIDEO_WIDTH
        frames = 0
        while video.read()[0]:
            frames += 1
        assert frames == len(result.frames)
    finally:
        video.release()
