"""The wire format: binary msgpack frames, NumPy arrays encoded as `openpi_client.msgpack_numpy`
encodes them (a map of `__ndarray__`, `data`, `dtype`, `shape` with bytes keys), so openpi's
`WebsocketClientPolicy` speaks it. No pickle anywhere: only numeric and boolean dtypes decode.

A request is a map: `image` (uint8 H×W×3), `instruction` (str), optional `colour_order`
("BGR" default, or "RGB") and `reset` (bool: a new episode on this connection). `parse_request`
turns one into a `Request` or raises `BadRequest` with the text the client gets back.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod

import msgpack
import numpy as np

# Kinds that decode: bool, signed and unsigned integers, floats. Object ("O"), void ("V"),
# complex, strings and datetimes never do.
ARRAY_KINDS = frozenset("biuf")
MAX_ARRAY_DIMS = 4
MAX_IMAGE_SIDE = 4096  # pixels: a 4K frame fits
MAX_INSTRUCTION_CHARS = 1000
COLOUR_ORDERS = ("BGR", "RGB")


class BadRequest(ValueError):
    """A request the server cannot serve; its text goes back to the client as a text frame."""


def _pack_default(value):
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in ARRAY_KINDS:
            raise TypeError(f"arrays of dtype {value.dtype} are not sent")
        # a view, not a copy: msgpack writes its bytes once (a 720p frame packs in a tenth of the time)
        data = memoryview(np.ascontiguousarray(value).reshape(-1).view(np.uint8))
        return {b"__ndarray__": True, b"data": data, b"dtype": value.dtype.str,
                b"shape": list(value.shape)}
    if isinstance(value, np.generic):
        if value.dtype.kind not in ARRAY_KINDS:
            raise TypeError(f"values of dtype {value.dtype} are not sent")
        return {b"__npgeneric__": True, b"data": value.item(), b"dtype": value.dtype.str}
    raise TypeError(f"cannot encode {type(value).__name__}")


def _dtype(value) -> np.dtype:
    text = value.decode("ascii", "replace") if isinstance(value, bytes) else str(value)
    try:
        dtype = np.dtype(text)
    except TypeError:
        raise BadRequest(f"array dtype {text!r} is not a NumPy dtype") from None
    if dtype.kind not in ARRAY_KINDS or dtype.hasobject:
        raise BadRequest(f"array dtype {text!r} is refused: only bool, integer and float arrays decode")
    return dtype


def _unpack_hook(obj: dict):
    if b"__ndarray__" in obj:
        dtype, data, shape = _dtype(obj.get(b"dtype")), obj.get(b"data"), obj.get(b"shape")
        if not isinstance(data, bytes) or not isinstance(shape, (list, tuple)) or len(shape) > MAX_ARRAY_DIMS \
                or not all(isinstance(n, int) and n >= 0 for n in shape):
            raise BadRequest("malformed array: expected __ndarray__ with bytes data, a dtype and a shape of "
                             f"at most {MAX_ARRAY_DIMS} non-negative integers")
        if len(data) != prod(shape) * dtype.itemsize:
            raise BadRequest(f"malformed array: {len(data)} bytes of data for shape {tuple(shape)} {dtype}")
        return np.frombuffer(data, dtype).reshape(shape)
    if b"__npgeneric__" in obj:
        return _dtype(obj.get(b"dtype")).type(obj.get(b"data"))
    return obj


def packb(value) -> bytes:
    """msgpack bytes of `value`, arrays as openpi-client encodes them."""
    return msgpack.packb(value, default=_pack_default, use_bin_type=True)


def unpackb(data: bytes):
    """The value in msgpack `data`; BadRequest if it is not msgpack or holds a refused array."""
    try:
        return msgpack.unpackb(data, object_hook=_unpack_hook, raw=False, strict_map_key=False)
    except BadRequest:
        raise
    except (ValueError, TypeError, msgpack.UnpackException) as error:  # ExtraData, FormatError, StackError …
        detail = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
        raise BadRequest(f"the message is not msgpack ({detail})"[:300]) from None


@dataclass(frozen=True)
class Request:
    image: np.ndarray  # uint8 (H, W, 3)
    instruction: str
    colour_order: str = "BGR"
    reset: bool = False


def parse_request(message) -> Request:
    """A decoded message as a Request, or BadRequest naming the field and what it must be."""
    if isinstance(message, str):
        raise BadRequest("send requests as binary msgpack frames, not text")
    value = unpackb(message)
    if not isinstance(value, dict):
        raise BadRequest(f"a request is a msgpack map with image and instruction, got {type(value).__name__}")
    image = value.get("image")
    if image is None:
        raise BadRequest("missing field 'image': a uint8 (height, width, 3) array")
    if not isinstance(image, np.ndarray):
        raise BadRequest(f"field 'image' must be an array (msgpack_numpy), got {type(image).__name__}")
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise BadRequest(f"field 'image' must be a uint8 (height, width, 3) array, got {image.dtype} {image.shape}")
    if not (1 <= image.shape[0] <= MAX_IMAGE_SIDE and 1 <= image.shape[1] <= MAX_IMAGE_SIDE):
        raise BadRequest(f"field 'image' must be 1–{MAX_IMAGE_SIDE} pixels a side, got {image.shape[:2]}")
    instruction = value.get("instruction")
    if not isinstance(instruction, str) or not instruction.strip():
        raise BadRequest("missing field 'instruction': a non-empty string" if instruction is None else
                         f"field 'instruction' must be a non-empty string, got {type(instruction).__name__}")
    if len(instruction) > MAX_INSTRUCTION_CHARS:
        raise BadRequest(f"field 'instruction' is {len(instruction)} characters; the most is {MAX_INSTRUCTION_CHARS}")
    order = value.get("colour_order", "BGR")
    if not isinstance(order, str) or order.upper() not in COLOUR_ORDERS:
        raise BadRequest(f"field 'colour_order' must be 'BGR' or 'RGB', got {order!r}")
    reset = value.get("reset", False)
    if not isinstance(reset, (bool, np.bool_)):
        raise BadRequest(f"field 'reset' must be a boolean, got {type(reset).__name__}")
    return Request(image, instruction, order.upper(), bool(reset))
