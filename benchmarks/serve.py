"""Policy server: its round trip against the in-process step, and robots at once against one at a time.

    .venv/bin/python benchmarks/serve.py [--frames 60] [--robots 1,4,8] [--full]

A policy is saved here (the tiny preset; with --full also the full-size Kosmos-2 architecture with random
bf16 weights, as benchmarks/inference.py builds it) and `vla-pipeline serve POLICY --port 0` is started as a
process of its own; the project's PolicyClient drives it over localhost. Frames are 1280×720 BGR uint8, a
camera's own (2.6 MiB each on the wire); the policy resizes them to 224×224 on either side.
  [1] latency   one robot: PolicyClient.step's round trip (resize on the robot, pack, send, the server's step,
                reply, unpack), and the same with resize=False (the frame sent as it is, as openpi-client
                sends it), against StreamingPolicy.step in this process on the same frames. The three take
                turns, 5 frames each, with a 0.1 s pause between turns (so one's threads, which spin a
                while after a step, do not compete with the next on the same cores); p50 and p99 of each.
                goal: round-trip p50 <= in-process p50 + 3 ms
  [2] robots    N robots (processes of their own, one connection each) send their frames at the same time,
                each waiting for its reply before sending the next: frames per second over all robots, and
                the server's mean batch (its replies' server_timing), for each N of --robots. Baseline: 8
                in-process streams stepped one after another, as 8 robots would be without batching. Here
                the frames are the 720p ones resized beforehand, as each robot's PolicyClient resizes them
                on the robot (on one machine, 8 robots' resizing would take the server's cores); the
                baseline steps the same 224x224 frames. Beside it, the same 8 streams stepped in one
                step_many batch in-process: what batching gives without the network.
                goal: 8 robots >= 2x the baseline's frames per second
  [3] threads   the in-process step in this main thread and in a worker thread, as the server steps, taking
                turns on the 224x224 frames: what the thread alone costs.
Every served action is checked against the in-process one (same frames, same order): exit 1 on a mismatch.
Each timing waits up to --quiet-wait s for a quiet CPU and is marked "busy" if other processes competed
(benchmarks/ingest.py's check); the server process is this script's child, so it is not a competitor.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import os
import re
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from vla_pipeline.data.frames import model_frame
from vla_pipeline.policy.model import build_policy, load_policy_dir, save_policy
from vla_pipeline.policy.policy_config import PolicyConfig
from vla_pipeline.policy.serving import StreamingPolicy, step_many
from vla_pipeline.serve.client import PolicyClient

from ingest import OUT, finish  # benchmarks/ingest.py, beside this script
from train_throughput import INSTRUCTION, measured, random_full_policy

CLI = Path(sys.executable).parent / "vla-pipeline"
# The three paths take turns in blocks of frames, with a pause between: the threads of one process's last
# step (OpenMP spins a while before it sleeps) never compete with the next path's on 2 cores.
BLOCK, SETTLE_S = 5, 0.1
TOLERANCE = {"tiny": 1e-5, "full": 2e-2}  # fp32; bf16 (a batch of 8 rounds differently from a batch of 1)


class Server:
    """`vla-pipeline serve` as a child process, on a free port."""

    def __init__(self, policy_dir: Path, max_batch: int, max_wait_ms: float):
        self.process = subprocess.Popen(
            [str(CLI), "serve", str(policy_dir), "--port", "0", "--max-batch", str(max_batch), "--rate-every-s", "3600",
             "--max-wait-ms", str(max_wait_ms)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "VLA_SERVE_API_KEY": ""})
        self.lines: list[str] = []
        for line in self.process.stdout:
            self.lines.append(line)
            if found := re.search(r"on ws://[^:]+:(\d+)", line):
                self.uri = f"ws://127.0.0.1:{found.group(1)}"
                break
        else:
            raise RuntimeError("the server did not start:\n" + "".join(self.lines))
        threading.Thread(target=lambda: self.lines.extend(self.process.stdout), daemon=True).start()

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(60)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) * 1e3


def bench_latency(policy, server: Server, frames: np.ndarray, args) -> dict:
    """In-process step, and the round trip of the two ways a client can send a frame: resized on the robot
    (PolicyClient's default) and as it is (what openpi-client sends), in turn on each frame."""
    local = StreamingPolicy(policy, colour_order="BGR")
    clients = {"round trip": PolicyClient(server.uri), "round trip, frame sent raw": PolicyClient(server.uri, resize=False)}
    for frame in frames[:3]:  # warm-up: every side's first steps
        local.step(frame, INSTRUCTION)
        for client in clients.values():
            client.step(frame, INSTRUCTION)
    local.reset()
    for client in clients.values():
        client.reset()

    def alternate():
        times, diff = {"in-process": [], **{name: [] for name in clients}, "server step": []}, 0.0
        for block in range(0, len(frames), BLOCK):
            here = []
            for frame in frames[block:block + BLOCK]:
                started = time.perf_counter()
                here.append(local.step(frame, INSTRUCTION))
                times["in-process"].append(time.perf_counter() - started)
            for name, client in clients.items():
                time.sleep(SETTLE_S)
                for frame, mine in zip(frames[block:block + BLOCK], here):
                    started = time.perf_counter()
                    there = client.step(frame, INSTRUCTION)
                    times[name].append(time.perf_counter() - started)
                    diff = max(diff, float(np.abs(mine - there).max()))
                    if name == "round trip":
                        times["server step"].append(float(client.last_reply["server_timing"]["infer_ms"]) / 1e3)
            time.sleep(SETTLE_S)
        return times, diff

    (times, diff), busy = measured(alternate, args.quiet_wait)
    for client in clients.values():
        client.close()
    row = {name: {"p50_ms": percentile(values, 50), "p99_ms": percentile(values, 99)} for name, values in times.items()}
    row.update(frames=len(frames), max_abs_diff=diff, busy=busy,
               bytes_per_frame={name: client.bytes_sent / (len(frames) + 3) for name, client in clients.items()})
    row["overhead_ms"] = row["round trip"]["p50_ms"] - row["in-process"]["p50_ms"]
    row["overhead_raw_ms"] = row["round trip, frame sent raw"]["p50_ms"] - row["in-process"]["p50_ms"]
    return row


def _robot(uri: str, frames: np.ndarray, barrier, results, index: int) -> None:
    """One robot, in a process of its own (as robots are machines of their own): warm up, wait for the others,
    send every frame after the reply to the last; put (index, replies) on `results`."""
    with PolicyClient(uri, colour_order="RGB") as client:
        client.step(frames[0], INSTRUCTION)
        client.reset()
        barrier.wait()
        replies = []
        for frame in frames:
            client.step(frame, INSTRUCTION)
            replies.append((client.last_reply["actions"], client.last_reply["server_timing"]["batch_size"]))
    results.put((index, replies))


def bench_robots(policy, server: Server, frames: np.ndarray, robots: int, args) -> dict:
    """Frames per second over `robots` connections sending at once, each from a process of its own; each
    robot's actions are checked against an in-process stream fed the same frames afterwards."""
    context = multiprocessing.get_context("fork")  # the children use no torch: only the client
    offsets = [7 * index % len(frames) for index in range(robots)]  # each robot its own sequence of frames
    sequences = [np.roll(frames, -offset, axis=0) for offset in offsets]
    barrier, results = context.Barrier(robots + 1), context.Queue()
    processes = [context.Process(target=_robot, args=(server.uri, sequences[index], barrier, results, index))
                 for index in range(robots)]
    for process in processes:
        process.start()

    def run() -> tuple[float, dict]:
        barrier.wait(timeout=300)
        started = time.perf_counter()
        got = dict(results.get(timeout=600) for _ in processes)
        return time.perf_counter() - started, got

    (seconds, replies), busy = measured(run, args.quiet_wait)
    for process in processes:
        process.join(60)
    diff = 0.0
    for index in range(robots):  # what each robot would get alone
        alone = StreamingPolicy(policy, colour_order="RGB")
        for frame, (actions, _) in zip(sequences[index], replies[index]):
            diff = max(diff, float(np.abs(alone.step(frame, INSTRUCTION) - actions).max()))
    batches = [batch for index in range(robots) for _, batch in replies[index]]
    return {"robots": robots, "frames": robots * len(frames), "seconds": seconds,
            "fps": robots * len(frames) / seconds, "mean_batch": float(np.mean(batches)),
            "max_abs_diff": diff, "busy": busy}


def bench_sequential(policy, frames: np.ndarray, streams: int, args) -> dict:
    """`streams` in-process streams stepped one after another, frame by frame: robots without batching."""
    locals_ = [StreamingPolicy(policy, colour_order="RGB") for _ in range(streams)]
    for stream in locals_:
        stream.step(frames[0], INSTRUCTION)
        stream.reset()

    def run() -> float:
        started = time.perf_counter()
        for frame in frames:
            for stream in locals_:
                stream.step(frame, INSTRUCTION)
        return time.perf_counter() - started

    seconds, busy = measured(run, args.quiet_wait)
    for stream in locals_:
        stream.reset()

    def batched() -> float:  # what the server's worker does with a full batch, without the network
        started = time.perf_counter()
        for frame in frames:
            step_many(locals_, [frame] * streams, [INSTRUCTION] * streams)
        return time.perf_counter() - started

    batched_s, batched_busy = measured(batched, args.quiet_wait)
    return {"robots": streams, "frames": streams * len(frames), "seconds": seconds,
            "fps": streams * len(frames) / seconds, "busy": busy,
            "batched_fps": streams * len(frames) / batched_s, "batched_busy": batched_busy}


def bench_threads(policy, frames: np.ndarray, args) -> dict:
    """The in-process step's median in this main thread and in a worker thread (where the server steps), taking
    turns 5 frames at a time: the same policy, frames and process."""
    streams = {"main thread": StreamingPolicy(policy, colour_order="RGB"),
               "worker thread": StreamingPolicy(policy, colour_order="RGB")}
    times: dict[str, list[float]] = {name: [] for name in streams}

    def steps(name: str, block: np.ndarray) -> None:
        for frame in block:
            started = time.perf_counter()
            streams[name].step(frame, INSTRUCTION)
            times[name].append(time.perf_counter() - started)

    def run() -> None:
        with concurrent.futures.ThreadPoolExecutor(1) as worker:  # one thread throughout, as the server's
            worker.submit(steps, "worker thread", frames[:BLOCK]).result()  # its warm-up
            times["worker thread"].clear()
            for block in range(0, len(frames), BLOCK):
                steps("main thread", frames[block:block + BLOCK])
                worker.submit(steps, "worker thread", frames[block:block + BLOCK]).result()

    _, busy = measured(run, args.quiet_wait)
    return {**{name: percentile(values, 50) for name, values in times.items()}, "busy": busy}


def run_case(case: str, args) -> dict:
    torch.set_num_threads(args.threads)
    frames_n = args.frames if case == "tiny" else args.full_frames
    frames = np.random.default_rng(0).integers(0, 256, (frames_n, 720, 1280, 3), dtype=np.uint8)
    with tempfile.TemporaryDirectory(dir=OUT) as scratch:
        if case == "tiny":
            built = build_policy(PolicyConfig.tiny()).eval()
        else:
            built = random_full_policy()[0].eval()
        save_policy(built, Path(scratch) / "policy")
        policy = load_policy_dir(Path(scratch) / "policy")  # what the server loads, so both sides match
        del built
        config, dtype = policy.config, next(policy.kosmos.parameters()).dtype
        print(f"[{case}] window {config.window}, chunk {config.chunk}, {str(dtype).removeprefix('torch.')}, "
              f"{frames_n} frames of 1280x720 BGR", flush=True)
        server = Server(Path(scratch) / "policy", max(args.robots), args.max_wait_ms)
        try:
            latency = bench_latency(policy, server, frames, args)
            print(f"  [1] in-process p50 {latency['in-process']['p50_ms']:.1f} ms, round trip p50 "
                  f"{latency['round trip']['p50_ms']:.1f} ms (+{latency['overhead_ms']:.1f} ms), frame sent raw "
                  f"{latency['round trip, frame sent raw']['p50_ms']:.1f} ms (+{latency['overhead_raw_ms']:.1f} ms); "
                  f"the server's step p50 {latency['server step']['p50_ms']:.1f} ms; max |diff| "
                  f"{latency['max_abs_diff']:.1e}", flush=True)
            # [2] measures the server: the frames are resized as a robot's PolicyClient resizes them, beforehand,
            # since on one machine the robots' resizing would take the server's cores; the baseline gets them too.
            small = np.stack([model_frame(frame, "BGR") for frame in frames])
            sequential = bench_sequential(policy, small, 8, args)
            print(f"  [2] 8 in-process streams one after another: {sequential['fps']:.1f} frames/s", flush=True)
            threads = bench_threads(policy, small, args)
            print(f"  [3] in-process step p50 on 224x224 frames: {threads['main thread']:.1f} ms in the main thread, "
                  f"{threads['worker thread']:.1f} ms in a worker thread (where the server steps)", flush=True)
            robots = []
            for count in args.robots:
                robots.append(bench_robots(policy, server, small, count, args))
                row = robots[-1]
                print(f"  [2] {count} robots: {row['fps']:.1f} frames/s, mean batch {row['mean_batch']:.1f}, "
                      f"max |diff| {row['max_abs_diff']:.1e}", flush=True)
        finally:
            server.stop()
    return {"case": case, "dtype": str(dtype).removeprefix("torch."), "latency": latency, "sequential": sequential,
            "threads": threads, "robots": robots, "tolerance": TOLERANCE[case]}


def busy_mark(*rows) -> str:
    return " (busy)" if any(row["busy"] for row in rows) else ""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=60, help="tiny: frames per robot (default 60)")
    parser.add_argument("--full", action="store_true", help="also the full-size policy (random bf16 weights)")
    parser.add_argument("--full-frames", type=int, default=6, help="full: frames per robot (default 6)")
    parser.add_argument("--robots", default="1,4,8", help="robot counts served at once (default 1,4,8)")
    parser.add_argument("--max-wait-ms", type=float, default=2.0, help="the server's --max-wait-ms (default 2)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads here (default: cores)")
    parser.add_argument("--quiet-wait", type=float, default=30, help="max s to wait for a quiet CPU (30)")
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    args = parser.parse_args()
    args.robots = [int(value) for value in args.robots.split(",")]
    OUT.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    print(f"command: {shlex.join([Path(sys.executable).name, *sys.argv])}")
    print(f"machine: {os.cpu_count()} cores, torch {torch.__version__}, {args.threads} torch threads here and in the "
          "server; localhost", flush=True)
    rows = [run_case(case, args) for case in ["tiny"] + (["full"] if args.full else [])]

    failed = []
    print("\n| policy | path | sent per frame | p50 / p99 | p50 over in-process (goal <= 3 ms) |")
    print("|---|---|---|---|---|")
    for row in rows:
        lat = row["latency"]
        name = f"{row['case']} ({row['dtype']}){busy_mark(lat)}"
        print(f"| {name} | StreamingPolicy.step in-process | | {lat['in-process']['p50_ms']:.1f} / "
              f"{lat['in-process']['p99_ms']:.1f} ms | |")
        for path, over, label in [("round trip", "overhead_ms", "PolicyClient, resized on the robot (default)"),
                                  ("round trip, frame sent raw", "overhead_raw_ms", "PolicyClient(resize=False), "
                                   "the frame as it is (as openpi-client sends it)")]:
            print(f"| {name} | {label} | {lat['bytes_per_frame'][path] / 1024:.0f} KiB | {lat[path]['p50_ms']:.1f} / "
                  f"{lat[path]['p99_ms']:.1f} ms | +{lat[over]:.1f} ms {'PASS' if lat[over] <= 3 else 'MISS'} |")
    print("\n| policy | robots at once | frames/s (all robots) | mean batch | vs 8 sequential in-process steps |")
    print("|---|---|---|---|---|")
    for row in rows:
        base = row["sequential"]
        print(f"| {row['case']} | 8 sequential, in-process{busy_mark(base)} | {base['fps']:.1f} | 1 | 1.00x |")
        print(f"| {row['case']} | 8 in one step_many batch, in-process (no network){' (busy)' if base['batched_busy'] else ''}"
              f" | {base['batched_fps']:.1f} | 8 | {base['batched_fps'] / base['fps']:.2f}x |")
        for robot in row["robots"]:
            ratio = robot["fps"] / base["fps"]
            goal = f" {'PASS' if ratio >= 2 else 'MISS'} (goal >= 2x)" if robot["robots"] == 8 else ""
            print(f"| {row['case']} | {robot['robots']} served{busy_mark(robot)} | {robot['fps']:.1f} | "
                  f"{robot['mean_batch']:.1f} | {ratio:.2f}x{goal} |")
    for row in rows:
        diffs = [row["latency"]["max_abs_diff"]] + [robot["max_abs_diff"] for robot in row["robots"]]
        verdict = "ok" if max(diffs) <= row["tolerance"] else "MISMATCH"
        print(f"{row['case']}: served actions vs in-process, max |diff| {max(diffs):.1e} (<= {row['tolerance']:.0e}): "
              f"{verdict}")
        if verdict != "ok":
            failed.append(f"{row['case']}: served actions differ from in-process ({max(diffs):.1e})")
    for row in rows:
        threads = row["threads"]
        print(f"{row['case']}: in-process step p50 {threads['main thread']:.1f} ms in the main thread, "
              f"{threads['worker thread']:.1f} ms in a worker thread{busy_mark(threads)}")
    if any(row["latency"]["busy"] or row["sequential"]["busy"] or any(r["busy"] for r in row["robots"]) for row in rows):
        print("(busy): other processes used the CPU during that measurement; rerun on a quiet machine")
    print(f"wall time {time.perf_counter() - started:.0f} s")
    return finish(args.json, rows, failed)


if __name__ == "__main__":
    sys.exit(main())
