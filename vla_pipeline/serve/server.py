"""`vla-pipeline serve`: the policy over WebSocket for many robots at once.

Each connection is a session: its own window of frames and instruction (a `StreamingPolicy`
fork over the one network). On connect the server sends one msgpack map of metadata; then each
binary request (see `protocol`) gets a reply map: `actions` float32 (chunk, 2) in robot units,
`frames_in_window` and `server_timing` {"infer_ms"}. A bad request gets a text frame saying
what is wrong, and the connection stays open (openpi-client's `WebsocketClientPolicy` raises
RuntimeError with that text).

The event loop only reads, checks and answers: inference runs in one worker thread, which takes
the frames waiting from different sessions and steps them together (`serving.step_many`: one
backbone batch) — up to `max_batch`, waiting at most `max_wait_ms` for more while other sessions
are connected. `GET /healthz` answers 200 while the model serves. With an API key, a connection
without `Authorization: Api-Key <key>` is refused in the handshake, before any model work.
SIGTERM (or SIGINT) stops new connections, lets the requests in flight finish and exits.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hmac
import ipaddress
import logging
import queue
import signal
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..policy.policy_config import config_error
from ..policy.serving import StreamingPolicy, step_many
from .protocol import BadRequest, Request, packb, parse_request

log = logging.getLogger("vla_pipeline.serve")
API_KEY_HEADER = "Authorization"
API_KEY_SCHEME = "Api-Key"


class ServeConfig(BaseModel):
    """Where the server listens and how it batches; a bad value raises ValueError naming the field."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    host: str = Field("127.0.0.1", description="address to bind; any other than loopback needs an API key")
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0: any free one)")
    max_batch: int = Field(8, ge=1, description="most frames of different robots encoded in one backbone batch")
    max_wait_ms: float = Field(2.0, ge=0, description=(
        "how long a frame waits for other robots' frames to join its batch (only while other robots are connected)"))
    max_message_mb: float = Field(16.0, gt=0, description=(
        "largest request accepted, MiB (a 1080p BGR frame is 6 MiB); a larger one gets an error text, one over "
        "4× this closes the connection"))
    rate_every_s: float = Field(30.0, gt=0, description="seconds between the log's rate lines")
    drain_timeout_s: float = Field(30.0, ge=0, description="on SIGTERM, how long requests in flight may take to finish")

    def __init__(self, **values) -> None:
        try:
            super().__init__(**values)
        except ValidationError as error:
            raise ValueError(f"serve config: {config_error(error)}") from None

    @property
    def max_message_bytes(self) -> int:
        return int(self.max_message_mb * 2**20)


class ServeError(ValueError):
    """The server cannot start as asked (the message says why)."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_api_key(environment_key: str | None, key_file: Path | None) -> str | None:
    """The API key from a file (first line, stripped) or else the environment's value; None if neither."""
    if key_file is not None:
        try:
            text = Path(key_file).read_text()
        except OSError as error:
            raise ServeError(f"--api-key-file {key_file}: {error.strerror or error}") from None
        key = next((line.strip() for line in text.splitlines() if line.strip()), "")
        if not key:
            raise ServeError(f"--api-key-file {key_file}: the file holds no key")
        return key
    return environment_key.strip() if environment_key and environment_key.strip() else None


@dataclass(eq=False)
class Session:
    """One connection: its stream (window and instruction) and what it has asked."""

    number: int
    peer: str
    stream: StreamingPolicy
    requests: int = 0
    opened: float = field(default_factory=time.monotonic)


@dataclass
class _Job:
    session: Session
    request: Request
    future: concurrent.futures.Future


class Batcher:
    """The inference worker: one thread that steps waiting sessions' frames together."""

    def __init__(self, max_batch: int, max_wait_s: float, connected=lambda: 1):
        self.max_batch, self.max_wait_s, self.connected = max_batch, max_wait_s, connected
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="vla-serve-inference", daemon=True)
        self.batches: list[tuple[int, float]] = []  # (size, infer ms) since the last rate line
        self._lock = threading.Lock()
        self._thread.start()

    def submit(self, session: Session, request: Request) -> concurrent.futures.Future:
        job = _Job(session, request, concurrent.futures.Future())
        self._queue.put(job)
        return job.future

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=60)

    def take_stats(self) -> list[tuple[int, float]]:
        with self._lock:
            stats, self.batches = self.batches, []
        return stats

    def _gather(self, first: _Job) -> tuple[list[_Job], bool]:
        batch, stopping = [first], False
        deadline = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                # Wait for other robots' frames only while other robots are connected.
                wait = deadline - time.monotonic()
                if wait <= 0 or self.connected() <= len(batch):
                    break
                try:
                    job = self._queue.get(timeout=wait)
                except queue.Empty:
                    break
            if job is None:
                stopping = True
                break
            batch.append(job)
        return batch, stopping

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch, stopping = self._gather(first)
            self._step(batch)
            if stopping:
                return

    def _step(self, batch: list[_Job]) -> None:
        started = time.perf_counter()
        try:
            for job in batch:
                if job.request.reset:
                    job.session.stream.reset()
            actions = step_many([job.session.stream for job in batch], [job.request.image for job in batch],
                                [job.request.instruction for job in batch],
                                [job.request.colour_order for job in batch])
        except Exception as error:  # the machine or the model failed: every request of the batch hears why
            log.error("inference failed for a batch of %d: %s: %s", len(batch), type(error).__name__, error)
            for job in batch:
                job.future.set_exception(error)
            return
        infer_ms = (time.perf_counter() - started) * 1000
        with self._lock:
            self.batches.append((len(batch), infer_ms))
        for job, chunk in zip(batch, actions):
            job.session.requests += 1
            job.future.set_result({
                "actions": np.asarray(chunk, np.float32),
                "frames_in_window": job.session.stream.frames_in_window,
                "server_timing": {"infer_ms": infer_ms, "batch_size": len(batch)},
            })


class PolicyServer:
    """The server over one loaded policy (`StreamingPolicy`); `run()` serves until SIGTERM/SIGINT."""

    def __init__(self, policy: StreamingPolicy, config: ServeConfig, api_key: str | None = None,
                 model_uri: str = "", version: str | None = None):
        self.check_host(config, api_key)
        self.policy, self.config, self.api_key = policy, config, api_key
        self.sessions: set[Session] = set()
        self.metadata = self._metadata(model_uri, version)
        self.draining = False
        self.in_flight = 0
        self.port: int | None = None
        self._numbers = 0
        self._batcher: Batcher | None = None
        self._ready = threading.Event()

    @staticmethod
    def check_host(config: ServeConfig, api_key: str | None) -> None:
        """ServeError where the server would listen beyond this machine without an API key."""
        if not is_loopback(config.host) and not api_key:
            raise ServeError(f"--host {config.host} would serve the network without authentication: set "
                             "VLA_SERVE_API_KEY or --api-key-file (robots then send 'Authorization: Api-Key <key>')")

    def _metadata(self, model_uri: str, version: str | None) -> dict:
        config = self.policy.config
        from ..data.schema import ACTION_DIMS, IMAGE_SIZE

        return {
            "model_uri": model_uri, "model_version": version, "window": config.window, "chunk": config.chunk,
            "action_dims": list(ACTION_DIMS), "action_units": "robot velocity units (a full key press is "
            f"{config.action_scale:g})", "action_scale": config.action_scale,
            "image_size": [IMAGE_SIZE, IMAGE_SIZE], "image": "uint8 (height, width, 3), any size: resized to "
            f"{IMAGE_SIZE}×{IMAGE_SIZE}", "colour_order": "BGR", "colour_orders": ["BGR", "RGB"],
            "max_message_bytes": self.config.max_message_bytes,
        }

    # -- the handshake: health check and API key, before any model work --------------------------
    def _process_request(self, connection, request):
        if request.path.split("?")[0] == "/healthz":
            if self.draining:
                return connection.respond(503, "draining\n")
            return connection.respond(200, "ok\n")
        if self.api_key is not None:
            given = request.headers.get(API_KEY_HEADER, "")
            expected = f"{API_KEY_SCHEME} {self.api_key}"
            if not hmac.compare_digest(given.encode(), expected.encode()):
                log.warning("refused %s: %s", _peer(connection), "wrong API key" if given else "no API key")
                return connection.respond(401, f"a valid '{API_KEY_HEADER}: {API_KEY_SCHEME} <key>' header is required\n")
        if self.draining:
            return connection.respond(503, "the server is shutting down\n")
        return None

    async def _handle(self, connection) -> None:
        from websockets.exceptions import ConnectionClosed

        self._numbers += 1
        session = Session(self._numbers, _peer(connection), self.policy.fork("BGR"))
        self.sessions.add(session)
        log.info("session %d: connected from %s (%d connected)", session.number, session.peer, len(self.sessions))
        limit = self.config.max_message_bytes
        try:
            await connection.send(packb(self.metadata))
            async for message in connection:
                if self.draining:
                    await connection.close(1001, "the server is shutting down")
                    break
                if len(message) > limit:
                    await connection.send(f"message of {len(message)} bytes is over the server's limit of "
                                          f"{limit} bytes (max_message_mb)")
                    continue
                try:
                    request = parse_request(message)
                except BadRequest as error:
                    await connection.send(str(error))
                    continue
                self.in_flight += 1
                try:
                    try:
                        reply = await asyncio.wrap_future(self._batcher.submit(session, request))
                    except Exception as error:
                        await connection.send(f"inference failed: {type(error).__name__}: {error}"[:1000])
                        continue
                    await connection.send(packb(reply))
                finally:
                    self.in_flight -= 1
        except ConnectionClosed:
            pass
        finally:
            self.sessions.discard(session)
            log.info("session %d: closed after %d requests in %.0f s (%d connected)", session.number,
                     session.requests, time.monotonic() - session.opened, len(self.sessions))

    async def _rate_lines(self) -> None:
        while True:
            await asyncio.sleep(self.config.rate_every_s)
            stats = self._batcher.take_stats()
            if not stats:
                continue
            requests = sum(size for size, _ in stats)
            log.info("serving %d sessions: %.1f requests/s over %.0f s, mean batch %.1f, infer p50 %.1f ms",
                     len(self.sessions), requests / self.config.rate_every_s, self.config.rate_every_s,
                     requests / len(stats), statistics.median(ms for _, ms in stats))

    async def serve(self, stop: asyncio.Future | None = None) -> None:
        """Serve until `stop` completes (or SIGTERM/SIGINT where this is the main thread), then drain."""
        from websockets.asyncio.server import serve

        loop = asyncio.get_running_loop()
        stop = stop if stop is not None else loop.create_future()
        for sign in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sign, lambda: stop.done() or stop.set_result(None))
            except (RuntimeError, ValueError):  # not the main thread
                pass
        self._batcher = Batcher(self.config.max_batch, self.config.max_wait_ms / 1000, lambda: len(self.sessions))
        limit = self.config.max_message_bytes
        async with serve(self._handle, self.config.host, self.config.port, process_request=self._process_request,
                         compression=None, max_size=4 * limit, max_queue=4, logger=logging.getLogger("websockets.server"),
                         ) as server:
            self.port = server.sockets[0].getsockname()[1]
            log.info("serving %s on ws://%s:%d (%s; batches of up to %d, %.1f ms wait)",
                     self.metadata["model_uri"], _host_text(self.config.host), self.port,
                     "API key required" if self.api_key else "no API key: loopback only", self.config.max_batch,
                     self.config.max_wait_ms)
            self._ready.set()
            rates = asyncio.create_task(self._rate_lines())
            await stop
            self.draining = True
            log.info("stopping: no new connections; %d requests in flight", self.in_flight)
            server.close(close_connections=False)
            deadline = time.monotonic() + self.config.drain_timeout_s
            while self.in_flight and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            rates.cancel()
            for connection in list(server.connections):
                await connection.close(1001, "the server is shutting down")
        self._batcher.stop()
        log.info("stopped: %d requests in flight left unanswered", self.in_flight)

    def run(self) -> None:
        asyncio.run(self.serve())


def _peer(connection) -> str:
    address = connection.remote_address
    return f"{address[0]}:{address[1]}" if isinstance(address, tuple) else str(address)


def _host_text(host: str) -> str:
    return f"[{host}]" if ":" in host else host

