"""A stand-in for torchvision, used only by the test environment .venv-lerobot (never by the project).

.venv-lerobot holds LeRobot 0.4.4, whose own dataset loader (`LeRobotDataset`) tests/lerobot_load.py
uses to prove the project's LeRobotDataset export. LeRobot imports torchvision at module load and,
with its "pyav" video backend, decodes video through `torchvision.io.VideoReader`; but PyPI's
torchvision does not import beside the CPU build of torch that these machines use. `make install`
puts the folder above this one on that venv's path (a .pth file), so this package is found instead.

It provides only what LeRobot's dataset code touches:
  set_video_backend / get_video_backend  ("pyav" only)
  io.VideoReader                          the "pyav" backend of torchvision.io.VideoReader
  transforms.ToTensor                     PIL image or HWC array -> CHW tensor, uint8 scaled to [0, 1]
Anything else (transforms.v2, models, ops, ...) is absent and fails to import.
"""

__version__ = "0.0.0+vla-pipeline-stand-in"

_video_backend = "pyav"


def set_video_backend(backend: str) -> None:
    global _video_backend
    if backend != "pyav":
        raise ValueError(f"this torchvision stand-in decodes only with 'pyav', not {backend!r}")
    _video_backend = backend


def get_video_backend() -> str:
    return _video_backend


from . import io, transforms  # noqa: E402,F401  (torchvision exposes both as attributes)
