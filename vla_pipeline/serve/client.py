"""The robot side of `vla-pipeline serve`: a client that reconnects, and a queue of action chunks.

`PolicyClient(uri, api_key)` speaks the server's protocol (the bytes openpi-client's
`WebsocketClientPolicy` sends) over one connection, its session: `infer(...)` returns the reply
map, `step(image, instruction)` the (chunk, 2) actions, as `StreamingPolicy.step` does. A lost
connection is reopened with exponential backoff, and the request sent again; the new session
starts an empty window (`reconnects` counts them). A refused key or a request the server calls
bad raises at once, never retried. With `resize=True` (the default) a frame is brought to the
server's image size on the robot, by the very function the server would apply (`model_frame`:
the same pixels, so the same actions), and sent as RGB: a 720p frame is then 147 KiB on the wire
instead of 2.6 MiB, which a robot's Wi-Fi needs at 10 frames a second.

`ActionQueue(client)` runs at the robot's control rate: `act(image, instruction)` returns the one
action to send now. It asks the server for a new chunk when fewer than `threshold` × chunk actions
are queued (LeRobot's `chunk_size_threshold`), and merges a new chunk into the steps still queued
by a named rule: `latest` (the new chunk replaces them) or `weighted_average` (`new_weight` × new +
(1 − `new_weight`) × queued, step by step).

The server's window holds the frames it was sent. The policy was trained on windows of
consecutive frames at the collector's rate, so the default `threshold=1.0` sends every frame (a
new chunk each step; the window is as in training). A lower threshold sends a frame only every
few steps, and the window then spans that many times the time it was trained on; it saves
bandwidth, not server work, which encodes every frame it gets either way.
"""

from __future__ import annotations

import time
from collections import deque

import numpy as np

from ..data.frames import model_frame
from .protocol import packb, unpackb

MERGE_RULES = ("latest", "weighted_average")


class ServerError(RuntimeError):
    """The server answered with an error text (a bad request, failed inference) or refused us."""


class PolicyClient:
    def __init__(self, uri: str, api_key: str | None = None, retries: int = 5, backoff_s: float = 0.2,
                 max_backoff_s: float = 5.0, open_timeout_s: float = 10.0, reply_timeout_s: float = 60.0,
                 colour_order: str = "BGR", resize: bool = True):
        self.uri = uri if uri.startswith(("ws://", "wss://")) else f"ws://{uri}"
        self.api_key, self.retries, self.backoff_s, self.max_backoff_s = api_key, retries, backoff_s, max_backoff_s
        self.open_timeout_s, self.reply_timeout_s = open_timeout_s, reply_timeout_s
        self.colour_order, self.resize = colour_order, resize
        self.reconnects = 0
        self.bytes_sent = 0  # requests' bytes, over the client's life
        self.last_reply: dict = {}
        self._reset_next = False
        self._connection = None
        self.metadata: dict = {}
        self._open()

    # -- connection ---------------------------------------------------------------------------
    def _connect_once(self):
        from websockets.exceptions import InvalidStatus
        from websockets.sync.client import connect

        headers = {"Authorization": f"Api-Key {self.api_key}"} if self.api_key else None
        try:
            connection = connect(self.uri, additional_headers=headers, compression=None, max_size=None,
                                 open_timeout=self.open_timeout_s)
        except InvalidStatus as error:  # refused in the handshake: a wrong key is not retried
            status = error.response.status_code
            body = error.response.body.decode("utf-8", "replace").strip() if error.response.body else ""
            raise ServerError(f"{self.uri} refused the connection: HTTP {status} {body}".strip()) from None
        self.metadata = unpackb(connection.recv(timeout=self.reply_timeout_s))
        return connection

    def _open(self) -> None:
        delay, attempt = self.backoff_s, 0
        while True:
            try:
                self._connection = self._connect_once()
                return
            except ServerError:
                raise
            except (OSError, TimeoutError, EOFError) as error:
                attempt += 1
                if attempt > self.retries:
                    raise ConnectionError(f"{self.uri}: no policy server after {attempt} tries: "
                                          f"{type(error).__name__}: {error}") from None
                time.sleep(delay)
                delay = min(delay * 2, self.max_backoff_s)

    def _lost(self) -> None:
        self.close()
        self._open()
        self.reconnects += 1

    def close(self) -> None:
        if self._connection is not None:
            try:
                self._connection.close()
            except Exception:
                pass
            self._connection = None

    def __enter__(self) -> PolicyClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- requests -----------------------------------------------------------------------------
    def infer(self, image: np.ndarray, instruction: str, colour_order: str | None = None,
              reset: bool = False) -> dict:
        """The server's reply map for one frame: actions (chunk, 2) float32, frames_in_window,
        server_timing. Reconnects (and sends again) where the connection was lost."""
        from websockets.exceptions import ConnectionClosed

        order = colour_order or self.colour_order
        size = self.metadata.get("image_size")
        frame = np.asarray(image)
        if self.resize and size and frame.dtype == np.uint8 and frame.ndim == 3 and frame.shape[2] == 3 \
                and order in ("BGR", "RGB"):  # anything else goes as it is, for the server to say what is wrong
            frame, order = model_frame(frame, order, int(size[0])), "RGB"
        request = packb({"image": np.ascontiguousarray(frame), "instruction": instruction, "colour_order": order,
                         "reset": bool(reset)})
        for attempt in range(self.retries + 1):
            try:
                if self._connection is None:
                    self._open()
                self._connection.send(request)
                self.bytes_sent += len(request)
                reply = self._connection.recv(timeout=self.reply_timeout_s)
                break
            except (ConnectionClosed, OSError, EOFError) as error:
                if attempt == self.retries:
                    raise ConnectionError(f"{self.uri}: connection lost: {type(error).__name__}: {error}") from None
                self._lost()
        if isinstance(reply, str):
            raise ServerError(reply)
        self.last_reply = unpackb(reply)
        return self.last_reply

    # StreamingPolicy's interface, so a server drives the simulated world as a policy in-process does.
    def reset(self) -> None:
        self._reset_next = True

    def step(self, image, instruction: str, colour_order: str | None = None) -> np.ndarray:
        reply = self.infer(image, instruction, colour_order, reset=self._reset_next)
        self._reset_next = False
        return reply["actions"]

    def fork(self, colour_order: str | None = None) -> PolicyClient:
        """A new connection to the same server: a session of its own."""
        return PolicyClient(self.uri, self.api_key, self.retries, self.backoff_s, self.max_backoff_s,
                            self.open_timeout_s, self.reply_timeout_s, colour_order or self.colour_order, self.resize)


class ActionQueue:
    """Action chunks queued at the robot's control rate; see the module docstring."""

    def __init__(self, client: PolicyClient, threshold: float = 1.0, merge: str = "latest", new_weight: float = 0.7):
        if merge not in MERGE_RULES:
            raise ValueError(f"merge must be one of {', '.join(MERGE_RULES)}, not {merge!r}")
        if not 0 <= threshold <= 1:
            raise ValueError(f"threshold must be within 0–1 (a fraction of the chunk), not {threshold}")
        if not 0 < new_weight <= 1:
            raise ValueError(f"new_weight must be within (0, 1], not {new_weight}")
        self.client, self.threshold, self.merge, self.new_weight = client, threshold, merge, new_weight
        self.queue: deque[np.ndarray] = deque()
        self.requests = 0

    def reset(self) -> None:
        self.queue.clear()
        self.client.reset()

    def act(self, image, instruction: str, colour_order: str | None = None) -> np.ndarray:
        """The (linear_x, linear_y) action to send now."""
        chunk = int(self.client.metadata.get("chunk", 1))
        if not self.queue or len(self.queue) < self.threshold * chunk:
            self._merge(self.client.step(image, instruction, colour_order))
            self.requests += 1
        return self.queue.popleft()

    def _merge(self, chunk: np.ndarray) -> None:
        new = [np.asarray(step, np.float32) for step in chunk]
        if self.merge == "weighted_average":
            queued = list(self.queue)
            for index in range(min(len(queued), len(new))):
                new[index] = self.new_weight * new[index] + (1 - self.new_weight) * queued[index]
        self.queue = deque(new)
