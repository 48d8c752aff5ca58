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


def test_the_video_is_h264_that_decodes_to_every_frame(tmp_path):
    import av

    result = run_rollouts(ScriptedGuide, plan(1, 0), env_kwargs={"height": 180, "width": 320, "camera": True},
                          keep_frames=True)[0]
    path = write_video(result.frames, tmp_path / "rollout.mp4")
    assert path == tmp_path / "rollout.mp4" and path.read_bytes()[4:8] == b"ftyp"  # an MP4, not a GIF
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264" and stream.codec_context.pix_fmt == "yuv420p"
        decoded = [frame.to_ndarray(format="bgr24") for frame in container.decode(stream)]
    assert len(decoded) == len(result.frames) == result.presses + 1
    assert decoded[0].shape == (180, VIDEO_WIDTH, 3)
    first = cv2.resize(result.frames[0], (VIDEO_WIDTH, 180), interpolation=cv2.INTER_AREA)
    assert np.abs(decoded[0].astype(int) - first).mean() < 8  # the frames themselves, within the codec's loss
