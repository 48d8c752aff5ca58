"""A camera frame as the policy sees it, defined once: ingest stores frames through it and the
policy on the robot (`policy.serving`) passes each new frame through it. numpy and OpenCV only,
so the robot's process imports nothing of HDF5 or the store."""

from __future__ import annotations

import cv2
import numpy as np

from .schema import IMAGE_SIZE


def model_frame(frame: np.ndarray, colour_order: str, size: int = IMAGE_SIZE) -> np.ndarray:
    """One camera frame as the policy sees it: size×size RGB uint8.

    The whole field of view matters (obstacles sit left or right), so the frame is squashed
    to a square rather than cropped.
    """
    small = cv2.resize(frame, (size, size), interpolation=cv2.INTER_AREA)
    return cv2.cvtColor(small, cv2.COLOR_BGR2RGB) if colour_order == "BGR" else small
