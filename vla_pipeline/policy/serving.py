"""The policy as the robot runs it: one camera frame in, one action chunk out.

`StreamingPolicy.step` encodes only the new frame with the backbone and keeps the features
of the last `window - 1` frames, so the LSTM head sees exactly the window it saw in
training (frames t-W+1 … t, fewer at the start of an episode) at the cost of one frame.
Frames go through `data.frames.model_frame` and `MobileVLAPolicy.normalise`, the very code
the window store and the trainer use.
"""

from __future__ import annotations

from collections import deque
from pathlib import Path

import numpy as np
import torch

from ..data.frames import model_frame
from .model import MobileVLAPolicy
from ..data.schema import IMAGE_SIZE

COLOUR_ORDERS = ("BGR", "RGB")


def sliding_window_actions(policy: MobileVLAPolicy, features: torch.Tensor) -> torch.Tensor:
    """Per-frame features (T, H) of one episode -> (T, chunk, 2) normalised actions, the one at
    frame t predicted from the window of frames max(0, t-W+1) … t, as `StreamingPolicy` does."""
    window = policy.config.window
    # The LSTM is causal: position t of the first window sees frames 0 … t only.
    first = policy.head(features[None, :window])[0]
    if len(features) <= window:
        return first
    later = features.unfold(0, window, 1).movedim(-1, 1)[1:]  # (T-W, W, H): windows ending at W … T-1
    return torch.cat([first, policy.head(later)[:, -1]])


class StreamingPolicy:
    """`reset()` at the start of an episode, then `step(image, instruction)` per frame.

    `colour_order` says what `step` receives: "BGR" (the robot's raw camera frame, any size,
    the default) or "RGB". Actions come back in robot units as a (chunk, 2) float32 array of
    (linear_x, linear_y); the first row is the command to send now.
    """

    def __init__(self, policy: MobileVLAPolicy, colour_order: str = "BGR", metadata: dict | None = None,
                 compiled: bool | None = None):
        self.policy = policy.eval()
        self.config = policy.config
        self.colour_order = _colour_order(colour_order)
        self.metadata = {**(metadata or {}), "compiled": False}
        # On a GPU the step is launch-bound: capture the backbone (CUDA graphs) unless told not to.
        # Streams over one policy share its compiled backbone: it is compiled once, not per stream.
        if compiled if compiled is not None else policy.action_token.is_cuda:
            try:
                policy.compile_backbone()
                self.metadata["compiled"] = True
            except Exception as error:  # no compiler for this platform: eager it is
                self._fall_back(error)
        self._pixels: deque[torch.Tensor] = deque(maxlen=self.config.window)
        self._features: deque[torch.Tensor] = deque(maxlen=self.config.window)
        self._instruction: str | None = None

    def reset(self) -> None:
        self._pixels.clear()
        self._features.clear()
        self._instruction = None

    def preprocess(self, image, colour_order: str | None = None) -> torch.Tensor:
        """A camera frame (H, W, 3) uint8 -> normalised (3, S, S) at the vision tower's size S, as in
        training."""
        frame = np.asarray(image)
        if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
            raise ValueError(f"image must be a uint8 (height, width, 3) array, got {frame.dtype} {frame.shape}")
        order = _colour_order(colour_order or self.colour_order)
        return self.policy.normalise(model_frame(frame, order, IMAGE_SIZE))

    def step(self, image, instruction: str, colour_order: str | None = None) -> np.ndarray:
        """Encode the new frame, append its feature to the window, return the (chunk, 2) actions."""
        return step_many([self], [image], [instruction], [colour_order])[0]

    def fork(self, colour_order: str | None = None) -> StreamingPolicy:
        """A new stream (its own window) over the same network and compiled backbone: one per robot
        or rollout; the CUDA graphs are captured once per policy, not once per stream."""
        return StreamingPolicy(self.policy, colour_order or self.colour_order, self.metadata,
                               compiled=self.metadata["compiled"])

    def _encode(self, pixels: torch.Tensor, instructions: list[str]) -> torch.Tensor:
        """The frames' features, in memory of their own: a compiled backbone (a CUDA graph,
        torch.compile's reduce-overhead) returns one output buffer that its next call overwrites,
        and the window keeps these features across steps."""
        compiled = self.metadata["compiled"]
        try:
            return self.policy.encode_images(pixels, instructions, compiled).clone()
        except Exception as error:
            if not compiled or self.policy.backbone_call is None:
                raise
            self._fall_back(error)  # the compiled backbone failed on this input: eager from now on
            return self.policy.encode_images(pixels, instructions).clone()

    def _fall_back(self, error: Exception) -> None:
        self.policy.backbone_call = None
        self.metadata["compiled"] = False
        self.metadata["compile_error"] = f"{type(error).__name__}: {error}"[:300]

    @property
    def frames_in_window(self) -> int:
        return len(self._features)


@torch.no_grad()
def step_many(streams: list[StreamingPolicy], images: list, instructions: list[str],
              colour_orders: list[str | None] | None = None) -> list[np.ndarray]:
    """One step of several streams over one network: their new frames are encoded in one backbone
    batch, each appended to its own stream's window, and each window goes through the head. A stream
    gets the actions `step` gives it alone (fp32: within float rounding of the batch)."""
    if not streams:
        return []
    first = streams[0]
    if any(stream.policy is not first.policy for stream in streams) or len({id(s) for s in streams}) != len(streams):
        raise ValueError("step_many takes distinct streams over one network")
    orders = colour_orders or [None] * len(streams)
    pixels = [stream.preprocess(image, order) for stream, image, order in zip(streams, images, orders)]
    for stream, instruction in zip(streams, instructions):
        if instruction != stream._instruction and stream._pixels:
            # A new instruction changes every cached feature: re-encode the window's frames.
            stack = torch.stack(list(stream._pixels))
            stream._features = deque(stream._encode(stack, [instruction] * len(stack)).unbind(0),
                                     maxlen=stream.config.window)
    features = first._encode(torch.stack(pixels), list(instructions))
    for stream, instruction, frame, feature in zip(streams, instructions, pixels, features.unbind(0)):
        stream._instruction = instruction
        stream._pixels.append(frame)
        stream._features.append(feature)
    # Windows of one length go through the head together.
    actions: list[np.ndarray | None] = [None] * len(streams)
    by_length: dict[int, list[int]] = {}
    for index, stream in enumerate(streams):
        by_length.setdefault(len(stream._features), []).append(index)
    for indices in by_length.values():
        windows = torch.stack([torch.stack(list(streams[i]._features)) for i in indices])
        out = (first.policy.head(windows)[:, -1] * first.config.action_scale).float().cpu().numpy()
        for row, index in enumerate(indices):
            actions[index] = out[row]
    return actions


# The most an action of the compiled (CUDA-graph) step may differ from the eager step's, robot units
# (a key press is 1.15): fp32 replays the very kernels eager runs; half precision leaves room for
# kernels that round differently under capture.
COMPILED_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 0.02, torch.float16: 0.02}


def compiled_vs_eager(policy: MobileVLAPolicy, episodes: list[tuple[list, str]]) -> float:
    """The largest |difference| of an action (robot units) between a compiled and an eager
    StreamingPolicy stepped side by side over `episodes` ((BGR frames, instruction) each, a reset
    between them). Each compiled step also checks that its window holds distinct tensors."""
    compiled, eager = StreamingPolicy(policy, compiled=True), StreamingPolicy(policy, compiled=False)
    if not compiled.metadata["compiled"]:
        raise RuntimeError(f"the backbone could not be compiled: {compiled.metadata.get('compile_error')}")
    largest = 0.0
    for frames, instruction in episodes:
        compiled.reset(), eager.reset()
        for frame in frames:
            got, expected = compiled.step(frame, instruction), eager.step(frame, instruction)
            window = list(compiled._features)
            if len({feature.data_ptr() for feature in window}) != len(window):
                raise AssertionError("the compiled step's window shares memory between its frames")
            largest = max(largest, float(np.abs(got - expected).max()))
    return largest


def load_bundle(bundle_dir, colour_order: str = "BGR", device: str | None = None,
                compiled: bool | None = None) -> StreamingPolicy:
    """A StreamingPolicy from a deploy bundle (`vla-pipeline export`), with torch and transformers
    alone: no peft, MLflow or Dagster is imported. `device` defaults to the GPU when there is one;
    `compiled` as for StreamingPolicy (default: on a GPU)."""
    from .bundle import bundle_dtype
    from .model import load_policy_dir

    bundle_dir = Path(bundle_dir)
    device = device or default_device()
    policy = load_policy_dir(bundle_dir, backbone_override=bundle_dir, dtype=bundle_dtype(bundle_dir)).to(device)
    return StreamingPolicy(policy, colour_order, {"bundle": str(bundle_dir)}, compiled=compiled)


def default_device() -> str:
    """Where a loaded policy runs unless told: the GPU where there is one."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def _colour_order(value: str) -> str:
    order = str(value).upper()
    if order not in COLOUR_ORDERS:
        raise ValueError(f"colour_order must be 'BGR' (raw robot frame) or 'RGB', got {value!r}")
    return order
