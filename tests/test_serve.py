"""`vla-pipeline serve`, started as a process and driven by openpi's own `WebsocketClientPolicy`
(tests/openpi_drive.py, in .venv-openpi: it needs NumPy < 2) and by the project's client."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import write_episode_file

from vla_pipeline.policy.model import build_policy, save_policy
from vla_pipeline.policy.policy_config import PolicyConfig
from vla_pipeline.policy.serving import StreamingPolicy
from vla_pipeline.serve.client import ActionQueue, PolicyClient, ServerError
from vla_pipeline.serve.protocol import BadRequest, packb, parse_request, unpackb
from vla_pipeline.serve.server import PolicyServer, ServeConfig, ServeError

ROOT = Path(__file__).resolve().parents[1]
CLI = Path(sys.executable).parent / "vla-pipeline"
OPENPI_PYTHON = ROOT / ".venv-openpi" / "bin" / "python"
KEY = "test-key-7f3a"
MAX_MESSAGE_MB = 0.5  # a 640×480 frame (0.9 MiB) is over it, and under 4× it (the connection stays open)

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def policy_dir(tiny_backbone_path, tmp_path_factory) -> Path:
    policy = build_policy(PolicyConfig.tiny(backbone=str(tiny_backbone_path), window=3, chunk=2)).eval()
    return save_policy(policy, tmp_path_factory.mktemp("policy"))


class ServerProcess:
    """`vla-pipeline serve` in a process of its own; its log lines are collected as they come."""

    def __init__(self, policy_dir: Path, *args: str, key: str | None = KEY):
        env = {**os.environ, "VLA_SERVE_API_KEY": key or ""}
        self.process = subprocess.Popen(
            [str(CLI), "serve", str(policy_dir), "--port", "0", "--max-message-mb", str(MAX_MESSAGE_MB), *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.lines: list[str] = []
        self._port = threading.Event()
        self.port = None
        threading.Thread(target=self._read, daemon=True).start()
        if not self._port.wait(180):
            self.process.kill()
            raise AssertionError("the server did not start:\n" + "".join(self.lines))

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line)
            if " on ws://127.0.0.1:" in line and self.port is None:
                self.port = int(line.split(" on ws://127.0.0.1:")[1].split()[0])
                self._port.set()

    @property
    def uri(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(60)


@pytest.fixture(scope="module")
def server(policy_dir):
    started = ServerProcess(policy_dir, "--max-wait-ms", "50", "--rate-every-s", "1")
    yield started
    assert started.stop() == 0, "".join(started.lines)


def openpi(*args: str, timeout: float = 120) -> dict:
    assert OPENPI_PYTHON.is_file(), "openpi-client's environment is missing: run `make install`"
    done = subprocess.run([str(OPENPI_PYTHON), str(ROOT / "tests" / "openpi_drive.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def frames_file(tmp_path: Path, frames: np.ndarray) -> Path:
    path = tmp_path / f"frames-{len(list(tmp_path.glob('frames-*')))}.npz"
    np.savez(path, frames=frames)
    return path


def test_openpi_client_gets_the_actions_predict_prints(server, policy_dir, tmp_path):
    from vla_pipeline.data.episodes import ValidationRules, inspect_episode

    episode = write_episode_file(tmp_path / "episode_20250610_101502_1box_hori_left_core_far.h5", frames=12,
                                 instruction="Navigate around the obstacle on the left side and reach the cup")
    header = inspect_episode(episode, ValidationRules(min_frames=1), digest="-")
    predicted = subprocess.run([str(CLI), "predict", str(episode), "--model-uri", str(policy_dir)],
                               capture_output=True, text=True, timeout=300)
    assert predicted.returncode == 0, predicted.stderr
    expected = np.array([json.loads(line)["actions"] for line in predicted.stdout.splitlines()])
    with h5py.File(episode) as h5:
        frames = h5[header.image_dataset][:]
    got = openpi("episode", server.uri, KEY, frames_file(tmp_path, frames), header.instruction, header.colour_order)
    np.testing.assert_allclose(np.array(got["actions"]), expected, atol=1e-5)
    metadata = got["metadata"]
    assert metadata["window"] == 3 and metadata["chunk"] == 2 and metadata["colour_order"] == "BGR"
    assert metadata["model_uri"] == str(policy_dir) and metadata["image_size"] == [224, 224]


def test_four_robots_at_once_each_get_what_they_would_alone(server, policy_dir):
    rng = np.random.default_rng(5)
    episodes = [(rng.integers(0, 256, (6, 90, 160, 3), dtype=np.uint8), f"go around the box on the {side}")
                for side in ("left", "right", "left side", "right side")]
    from vla_pipeline.policy.model import load_policy_dir

    alone = StreamingPolicy(load_policy_dir(policy_dir))
    expected = []
    for frames, instruction in episodes:
        alone.reset()
        expected.append([alone.step(frame, instruction) for frame in frames])
    clients = [PolicyClient(server.uri, KEY) for _ in episodes]
    together = threading.Barrier(len(clients))
    got: list[list] = [[] for _ in episodes]
    batches: list[int] = []

    def robot(index: int) -> None:
        frames, instruction = episodes[index]
        for step, frame in enumerate(frames):
            together.wait(timeout=60)  # the robots' frames arrive together
            reply = clients[index].infer(frame, instruction, reset=step == 0)
            got[index].append(reply["actions"])
            batches.append(reply["server_timing"]["batch_size"])

    threads = [threading.Thread(target=robot, args=(index,)) for index in range(len(clients))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    for client in clients:
        client.close()
    for index in range(len(episodes)):
        np.testing.assert_allclose(np.array(got[index]), np.array(expected[index]), atol=1e-5,
                                   err_msg=f"robot {index}")
    assert max(batches) > 1, "the robots' frames were never encoded in one batch"


def test_the_client_resizes_on_the_robot_to_the_same_actions(server):
    """PolicyClient sends model_frame's 224×224 RGB (what the server would make of the frame), not the frame."""
    frames = np.random.default_rng(9).integers(0, 256, (4, 180, 320, 3), dtype=np.uint8)
    replies, sent = {}, {}
    for resize in (True, False):
        with PolicyClient(server.uri, KEY, resize=resize) as client:
            replies[resize] = [client.step(frame, "go around the box on the left", "BGR") for frame in frames]
            sent[resize] = client.bytes_sent
    np.testing.assert_array_equal(np.array(replies[True]), np.array(replies[False]))
    assert sent[False] > 4 * 180 * 320 * 3 > 4 * 224 * 224 * 3 > sent[True] - 4 * 200  # 200 B of map and text each


def test_a_wrong_or_missing_key_is_refused(server):
    for key in ("wrong", ""):
        refused = openpi("connect", server.uri, key)
        assert "401" in refused["refused"], refused
    assert openpi("connect", server.uri, KEY)["metadata"]["window"] == 3
    with pytest.raises(ServerError, match="401"):
        PolicyClient(server.uri, "wrong")
    assert any("refused" in line and "wrong API key" in line for line in server.lines)


def test_each_bad_request_gets_its_text_and_the_connection_keeps_serving(server, tmp_path):
    frames = np.random.default_rng(1).integers(0, 256, (1, 60, 80, 3), dtype=np.uint8)
    answer = openpi("bad", server.uri, KEY, frames_file(tmp_path, frames))
    expected = ["missing field 'image'", "missing field 'instruction'", "field 'instruction' must be",
                "must be a uint8 (height, width, 3) array, got float32", "got uint8 (60, 80)",
                "field 'colour_order'", "field 'reset' must be a boolean", "over the server's limit"]
    for error, words in zip(answer["errors"], expected):
        assert error is not None and words in error, (error, words)
    assert all(np.array(actions).shape == (2, 2) for actions in answer["after"])
    # What openpi's packer would never send: not msgpack, text, an object array, a lying array.
    from websockets.sync.client import connect

    good = packb({"image": frames[0], "instruction": "go"})
    raw = [b"\xc1 not msgpack", "a text frame",
           packb({"image": {b"__ndarray__": True, b"data": b"\0" * 8, b"dtype": "|O", b"shape": [1]},
                  "instruction": "go"}),
           packb({"image": {b"__ndarray__": True, b"data": b"\0" * 5, b"dtype": "|u1", b"shape": [2, 2, 3]},
                  "instruction": "go"}),
           packb([1, 2, 3])]
    words = ["not msgpack", "binary msgpack frames", "is refused", "5 bytes of data", "a msgpack map"]
    with connect(server.uri, additional_headers={"Authorization": f"Api-Key {KEY}"}) as connection:
        unpackb(connection.recv(timeout=60))  # the metadata
        for message, word in zip(raw, words):
            connection.send(message)
            reply = connection.recv(timeout=60)
            assert isinstance(reply, str) and word in reply, (reply, word)
            connection.send(good)
            assert unpackb(connection.recv(timeout=60))["actions"].shape == (2, 2)


def test_a_killed_client_leaves_the_server_serving(server, tmp_path):
    frames = np.random.default_rng(2).integers(0, 256, (1, 60, 80, 3), dtype=np.uint8)
    hung = subprocess.Popen([str(OPENPI_PYTHON), str(ROOT / "tests" / "openpi_drive.py"), "hang", server.uri, KEY,
                             str(frames_file(tmp_path, frames))], stdout=subprocess.PIPE, text=True)
    assert hung.stdout.readline().strip() == "sent"
    hung.kill()
    hung.wait(30)
    with PolicyClient(server.uri, KEY) as client:
        assert client.infer(frames[0], "go")["actions"].shape == (2, 2)
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/healthz", timeout=30) as health:
        assert health.status == 200 and health.read() == b"ok\n"


def test_the_log_has_a_line_per_connection_and_rate_lines(server):
    with PolicyClient(server.uri, KEY) as client:
        client.infer(np.zeros((40, 60, 3), np.uint8), "go")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not any("requests/s" in line for line in server.lines):
        time.sleep(0.2)
    text = "".join(server.lines)
    assert "connected from 127.0.0.1" in text and "closed after" in text and "requests/s" in text


def test_the_network_without_a_key_is_refused_before_loading(policy_dir):
    done = subprocess.run([str(CLI), "serve", str(policy_dir), "--host", "0.0.0.0"], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "VLA_SERVE_API_KEY": ""})
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "without authentication" in done.stderr


def test_sigterm_stops_it_cleanly(policy_dir):
    started = ServerProcess(policy_dir)
    with PolicyClient(started.uri, KEY) as client:
        client.infer(np.zeros((40, 60, 3), np.uint8), "go")
        assert started.stop() == 0
    text = "".join(started.lines)
    assert "stopping: no new connections" in text and "stopped:" in text
    with pytest.raises(ConnectionError):
        PolicyClient(started.uri, KEY, retries=1, backoff_s=0.05)


def test_the_systemd_unit_starts_a_server_that_parses(tmp_path):
    """deploy/systemd/vla-serve.service: its command line is one `vla-pipeline serve` accepts, on the network
    with the key from the credential systemd hands it."""
    import shlex

    from vla_pipeline.cli import build_parser

    unit = (ROOT / "deploy" / "systemd" / "vla-serve.service").read_text()
    command = shlex.split(next(line for line in unit.splitlines() if line.startswith("ExecStart=")).split("=", 1)[1])
    assert command[0].endswith("/vla-pipeline") and command[1] == "serve"
    (tmp_path / "serve-key").write_text("k\n")
    args = build_parser().parse_args([part.replace("${CREDENTIALS_DIRECTORY}", str(tmp_path)) for part in command[1:]])
    config = ServeConfig(host=args.host, port=args.port, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                         drain_timeout_s=args.drain_timeout_s)
    from vla_pipeline.serve.server import read_api_key

    PolicyServer.check_host(config, read_api_key(None, args.api_key_file))  # a key: the network is allowed
    assert "LoadCredential=serve-key:" in unit and "KillSignal=SIGTERM" in unit
    assert int(unit.split("TimeoutStopSec=")[1].split()[0]) > config.drain_timeout_s


def test_rollout_through_the_server_equals_in_process(server, policy_dir):
    common = ["--episodes", "2", "--seed", "3", "--camera", "small", "--no-baselines", "--json", "--envs", "2"]

    def outcomes(*args: str) -> list[tuple]:
        done = subprocess.run([str(CLI), "rollout", *args, *common], capture_output=True, text=True, timeout=400,
                              env={**os.environ, "VLA_SERVE_API_KEY": KEY})
        assert done.returncode == 0, done.stderr
        rows = [json.loads(line) for line in done.stdout.splitlines()]
        return sorted((row["index"], row["outcome"], row["presses"]) for row in rows if row.get("driver") == "policy")

    remote = outcomes("--server", server.uri)
    assert len(remote) == 2
    assert remote == outcomes(str(policy_dir))


# -- the client's pieces, without a server process ----------------------------------------------

class FakeClient:
    """Chunks of (step number + request number / 10) so merges can be read off."""

    def __init__(self, chunk: int):
        self.metadata, self.requests = {"chunk": chunk}, 0

    def reset(self) -> None:
        pass

    def step(self, image, instruction, colour_order=None) -> np.ndarray:
        self.requests += 1
        return np.array([[step + self.requests / 10, 0] for step in range(self.metadata["chunk"])], np.float32)


def test_action_queue_asks_below_the_threshold_and_merges_by_rule():
    latest = ActionQueue(FakeClient(4), threshold=0.5, merge="latest")
    sent = [latest.act(None, "go")[0] for _ in range(6)]
    # chunk 1 at step 0, drained to 2 queued (< 0.5 × 4 is false at 2), asks again at 1 queued
    np.testing.assert_allclose(sent, [0.1, 1.1, 2.1, 0.2, 1.2, 2.2], atol=1e-6)
    assert latest.requests == 2
    averaged = ActionQueue(FakeClient(4), threshold=0.5, merge="weighted_average", new_weight=0.5)
    sent = [averaged.act(None, "go")[0] for _ in range(4)]
    # the second chunk's first step meets the first chunk's last queued step (3.1): (0.2 + 3.1) / 2
    np.testing.assert_allclose(sent, [0.1, 1.1, 2.1, 1.65], atol=1e-6)
    every_step = ActionQueue(FakeClient(4))  # the default: a frame each step, so the window is as in training
    sent = [every_step.act(None, "go")[0] for _ in range(3)]
    np.testing.assert_allclose(sent, [0.1, 0.2, 0.3], atol=1e-6)
    assert every_step.requests == 3
    with pytest.raises(ValueError, match="merge"):
        ActionQueue(FakeClient(4), merge="median")


def test_the_client_reconnects_with_backoff(policy_dir):
    from vla_pipeline.policy.model import load_policy_dir

    policy = StreamingPolicy(load_policy_dir(policy_dir))

    def start(port: int) -> tuple[PolicyServer, asyncio.AbstractEventLoop, asyncio.Future, threading.Thread]:
        server = PolicyServer(policy, ServeConfig(port=port), api_key=KEY)
        loop = asyncio.new_event_loop()
        stop = loop.create_future()
        thread = threading.Thread(target=lambda: loop.run_until_complete(server.serve(stop)), daemon=True)
        thread.start()
        assert server._ready.wait(60)
        return server, loop, stop, thread

    first, loop, stop, thread = start(0)
    port = first.port
    client = PolicyClient(f"ws://127.0.0.1:{port}", KEY, retries=8, backoff_s=0.05)
    frame = np.zeros((40, 60, 3), np.uint8)
    assert client.infer(frame, "go")["frames_in_window"] == 1
    loop.call_soon_threadsafe(stop.set_result, None)
    thread.join(60)
    restarted = []
    second = threading.Timer(0.3, lambda: restarted.append(start(port)))  # back up after a few of the client's tries
    second.start()
    reply = client.infer(frame, "go")
    assert client.reconnects == 1 and reply["frames_in_window"] == 1  # a new session: a new window
    client.close()
    _, loop, stop, thread = restarted[0]
    loop.call_soon_threadsafe(stop.set_result, None)
    thread.join(60)


def test_protocol_refuses_what_it_must():
    image = np.zeros((4, 5, 3), np.uint8)
    request = parse_request(packb({"image": image, "instruction": "go", "colour_order": "rgb", "reset": True}))
    assert request.colour_order == "RGB" and request.reset and request.image.shape == (4, 5, 3)
    with pytest.raises(BadRequest, match="not msgpack"):
        parse_request(b"\x92\x01")  # an array missing an element
    with pytest.raises(TypeError):
        packb({"image": np.array([object()])})
    with pytest.raises(ServeError, match="without authentication"):
        PolicyServer.check_host(ServeConfig(host="0.0.0.0"), None)
    PolicyServer.check_host(ServeConfig(host="0.0.0.0"), "key")
    PolicyServer.check_host(ServeConfig(host="::1"), None)
    with pytest.raises(ValueError, match="max_batch"):
        ServeConfig(max_batch=0)
