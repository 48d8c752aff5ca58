"""torchvision.transforms in the torchvision stand-in of the test environment .venv-lerobot (see
torchvision/__init__.py: PyPI's torchvision does not import beside the CPU build of torch, and
LeRobot 0.4.4 imports `torchvision.transforms` at module load).

Provides `ToTensor` only, which LeRobot uses on image (not video) features: a PIL image or an
(H, W, C) array becomes a (C, H, W) tensor, uint8 as float32 scaled to [0, 1], other dtypes as they
are (as torchvision's ToTensor does). transforms.v2 is absent.
"""

import numpy as np
import torch


class ToTensor:
    def __call__(self, pic) -> torch.Tensor:
        array = np.array(pic)
        if getattr(pic, "mode", None) == "1":  # PIL's 1-bit images read as bool
            array = array.astype(np.uint8) * 255
        if array.ndim == 2:
            array = array[:, :, None]
        tensor = torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))
        return tensor.float().div(255) if tensor.dtype == torch.uint8 else tensor

    def __repr__(self) -> str:
        return "ToTensor()"
