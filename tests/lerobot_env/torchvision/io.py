"""torchvision.io in the torchvision stand-in of the test environment .venv-lerobot (see __init__.py).

PyPI's torchvision does not import beside the CPU build of torch, and LeRobot 0.4.4 decodes video
through `torchvision.io.VideoReader` with its "pyav" backend. This module provides that class only,
with the semantics of torchvision's own "pyav" backend: `seek(time_s)` goes to the keyframe at or
before time_s, and iterating yields {"data": uint8 tensor (3, H, W) RGB, "pts": seconds (float)}
for each frame from there on; the open PyAV container is the attribute `container`.
"""

from typing import Any, Dict, Iterator

import av
import torch


class VideoReader:
    def __init__(self, src: str, stream: str = "video", num_threads: int = 0) -> None:
        self.container = av.open(str(src), metadata_errors="ignore")
        kind, _, index = stream.partition(":")
        if kind != "video":
            raise ValueError(f"this torchvision stand-in reads video streams only, not {stream!r}")
        self.pyav_stream = {"video": int(index or 0)}
        self._decoded = self.container.decode(**self.pyav_stream)

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        return self

    def __next__(self) -> Dict[str, Any]:
        try:
            frame = next(self._decoded)
        except av.error.EOFError:
            raise StopIteration from None
        pts = float(frame.pts * frame.time_base)
        return {"data": torch.from_numpy(frame.to_ndarray(format="rgb24")).permute(2, 0, 1), "pts": pts}

    def seek(self, time_s: float, keyframes_only: bool = False) -> "VideoReader":
        # As torchvision's pyav backend: PyAV seeks only to keyframes, whatever keyframes_only says.
        stream = self.container.streams.get(**self.pyav_stream)[0]
        offset = int(round(max(time_s, 0) / stream.time_base))
        self.container.seek(offset, backward=True, any_frame=False, stream=stream)
        self._decoded = self.container.decode(**self.pyav_stream)
        return self
