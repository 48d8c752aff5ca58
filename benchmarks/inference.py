"""Serving latency: one streaming step vs a whole-window recompute, for the tiny and the full-size policy.

    .venv/bin/python benchmarks/inference.py [--steps 30 --repeats 30] [--full-steps 5 --full-repeats 3]
    .venv/bin/python benchmarks/inference.py --skip-full        (only the tiny case)
    .venv/bin/python benchmarks/inference.py --only merged      (the deploy bundle vs the registry policy)

Each case runs in its own subprocess (`--case tiny|full`), so its peak RSS (ru_maxrss) is its own:
  recompute   policy.predict on one full window (B=1, W=window): the backbone encodes all W frames
  streaming   StreamingPolicy(colour_order="RGB").step, after `window` warm-up steps have filled the
              window: the backbone encodes the new frame only; cached features for the rest
              target <= 0.2x recompute, ideal 1/window
Both paths get the same random 224x224 RGB uint8 frames (so model_frame's resize is a same-size copy);
streaming steps and predict calls alternate, so both see the same load, and the median of each
(time.perf_counter) is reported; the warm-up steps also warm the backbone for predict. The last streaming step's actions must equal
policy.predict on the same window (max |diff| <= 1e-4 tiny fp32, <= --bf16-tol full bf16): exit code 1 if not.
  tiny  PolicyConfig.tiny() (window 3, chunk 2), fp32
  full  Kosmos2Model(Kosmos2Config()), the microsoft/kosmos-2-patch14-224 architecture with random bf16
        weights, saved by a child process and loaded by build_policy as `train_throughput.py --full` does;
        the default PolicyConfig (window 8, chunk 10, LoRA r32 all-linear, LSTM 512x4)
  merged the full-size policy (LoRA B matrices randomised, so the adapter changes the actions) saved,
        exported as a bf16 deploy bundle (`vla-pipeline export`: merged in fp32, then cast) and loaded
        with serving.load_bundle; its streaming step against the unmerged policy's on the same frames,
        in turn. Target: merged <= 0.7x unmerged; actions equal within --bf16-tol
Torch uses one thread per core (--threads). Each timing waits up to --quiet-wait s for a quiet CPU and is marked
"busy" if other processes competed (the check of benchmarks/ingest.py).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from vla_pipeline.policy.model import build_policy
from vla_pipeline.policy.policy_config import PolicyConfig
from vla_pipeline.policy.serving import StreamingPolicy

from ingest import OUT, finish  # benchmarks/ingest.py, beside this script
from train_throughput import INSTRUCTION, measured, random_full_policy

TOLERANCE = {"tiny": 1e-4}


def interleaved(stream, new_frames, predict, steps: int, repeats: int):
    """(streaming step seconds, recompute seconds, last actions of each): one of each in turn, so that both
    see the same load. The first predict call is timed too (its median absorbs it)."""
    stream_s, recompute_s, last = [], [], [None, None]
    for i in range(max(steps, repeats)):
        if i < steps:
            started = time.perf_counter()
            last[0] = stream.step(new_frames[i], INSTRUCTION)
            stream_s.append(time.perf_counter() - started)
        if i < repeats:
            started = time.perf_counter()
            last[1] = predict()
            recompute_s.append(time.perf_counter() - started)
    return stream_s, recompute_s, last


def run_merged(args) -> dict:
    """The deploy bundle's streaming step against the registry policy's (LoRA unmerged)."""
    from train_throughput import _save_random_kosmos

    from vla_pipeline.policy.bundle import export_bundle
    from vla_pipeline.policy.model import save_policy
    from vla_pipeline.policy.serving import load_bundle

    steps = args.full_steps
    with tempfile.TemporaryDirectory(dir=OUT) as scratch:
        scratch = Path(scratch)
        started = time.perf_counter()
        _save_random_kosmos(str(scratch / "backbone"))
        torch.set_default_dtype(torch.float32)
        policy = build_policy(PolicyConfig(backbone=str(scratch / "backbone"), preset="full"), dtype=torch.bfloat16)
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():  # a trained adapter: LoRA B is zero only before training
            for name, param in policy.backbone.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
        save_policy(policy, scratch / "policy")
        built = time.perf_counter() - started
        started = time.perf_counter()
        export_bundle(scratch / "policy", scratch / "bundle", dtype="bf16")
        exported = time.perf_counter() - started
        merged = load_bundle(scratch / "bundle", colour_order="RGB", device="cpu")
        bundle_bytes = sum(p.stat().st_size for p in (scratch / "bundle").rglob("*") if p.is_file())
        print(f"[merged] built in {built:.0f} s, exported in {exported:.0f} s; bundle {size(bundle_bytes)}; "
              f"{torch.get_num_threads()} torch threads", flush=True)
        window = policy.config.window
        frames = np.random.default_rng(0).integers(0, 256, (window + steps, 224, 224, 3), dtype=np.uint8)
        unmerged = StreamingPolicy(policy, colour_order="RGB")
        for stream in (unmerged, merged):
            stream.reset()
            for frame in frames[:window]:
                stream.step(frame, INSTRUCTION)

        def alternate():
            times, last = {"unmerged": [], "merged": []}, {}
            for frame in frames[window:]:
                for name, stream in (("unmerged", unmerged), ("merged", merged)):
                    begun = time.perf_counter()
                    last[name] = np.asarray(stream.step(frame, INSTRUCTION), dtype=np.float32)
                    times[name].append(time.perf_counter() - begun)
            return times, last

        (times, last), busy = measured(alternate, args.quiet_wait)
    for name, values in times.items():
        print(f"  {len(values)} {name} streaming steps: {', '.join(f'{t * 1e3:.0f}' for t in values)} ms", flush=True)
    diff = float(np.abs(last["merged"] - last["unmerged"]).max())
    return {"case": "merged", "steps": steps, "unmerged_ms": float(np.median(times["unmerged"])) * 1e3,
            "merged_ms": float(np.median(times["merged"])) * 1e3, "max_abs_diff": diff,
            "tolerance": args.bf16_tol, "match": diff <= args.bf16_tol, "busy": busy, "bundle_bytes": bundle_bytes,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def run_case(args) -> dict:
    torch.set_num_threads(args.threads)
    if args.case == "merged":
        return run_merged(args)
    steps, repeats = (args.full_steps, args.full_repeats) if args.case == "full" else (args.steps, args.repeats)
    started = time.perf_counter()
    policy = random_full_policy()[0] if args.case == "full" else build_policy(PolicyConfig.tiny())
    config, dtype = policy.config, next(policy.kosmos.parameters()).dtype
    print(f"[{args.case}] window {config.window}, chunk {config.chunk}, {str(dtype).removeprefix('torch.')}, "
          f"{torch.get_num_threads()} torch threads; built in {time.perf_counter() - started:.0f} s", flush=True)
    window = config.window
    frames = np.random.default_rng(0).integers(0, 256, (window + steps, 224, 224, 3), dtype=np.uint8)
    stream = StreamingPolicy(policy, colour_order="RGB")
    stream.reset()
    for frame in frames[:window]:
        stream.step(frame, INSTRUCTION)
    images = torch.from_numpy(frames[-window:].copy())[None]
    recompute = lambda: policy.predict(images, [INSTRUCTION])[0].float().numpy()  # noqa: E731
    (stream_s, recompute_s, (last, reference)), busy = measured(
        lambda: interleaved(stream, frames[window:], recompute, steps, repeats), args.quiet_wait)
    assert stream.frames_in_window == window
    for name, times in [("streaming steps", stream_s), ("recompute predict calls", recompute_s)]:
        print(f"  {len(times)} {name}: {', '.join(f'{t * 1e3:.1f}' for t in times)} ms", flush=True)
    diff = float(np.abs(last - reference).max())
    tolerance = TOLERANCE.get(args.case, args.bf16_tol)
    print(f"  last streaming step vs predict on the same window: max |diff| {diff:.2e} "
          f"(tolerance {tolerance:.0e}) {'ok' if diff <= tolerance else 'MISMATCH'}", flush=True)
    return {"case": args.case, "window": window, "chunk": config.chunk, "dtype": str(dtype).removeprefix("torch."),
            "steps": steps, "repeats": repeats, "recompute_ms": float(np.median(recompute_s)) * 1e3,
            "streaming_ms": float(np.median(stream_s)) * 1e3, "max_abs_diff": diff, "tolerance": tolerance,
            "match": diff <= tolerance, "busy": busy,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}  # KiB on Linux


def size(nbytes: int) -> str:
    return f"{nbytes / 1024**3:.2f} GiB" if nbytes >= 1024**3 else f"{nbytes / 1024**2:.0f} MiB"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30, help="tiny: timed streaming steps (default 30)")
    parser.add_argument("--repeats", type=int, default=30, help="tiny: timed predict calls (default 30)")
    parser.add_argument("--full-steps", type=int, default=5, help="full: timed streaming steps (default 5)")
    parser.add_argument("--full-repeats", type=int, default=3, help="full: timed predict calls (default 3)")
    parser.add_argument("--bf16-tol", type=float, default=2e-2, help="full: max |diff| of the actions (2e-2)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: cores)")
    parser.add_argument("--skip-full", action="store_true", help="only the tiny case")
    parser.add_argument("--quiet-wait", type=float, default=30, help="max s to wait for a quiet CPU (30)")
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    parser.add_argument("--skip-merged", action="store_true", help="leave out the merged-bundle case")
    parser.add_argument("--only", choices=["tiny", "full", "merged"], help="run this case alone")
    parser.add_argument("--case", choices=["tiny", "full", "merged"], help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    if args.case:
        args.result.write_text(json.dumps(run_case(args)))
        return 0

    started = time.perf_counter()
    print(f"command: {shlex.join([Path(sys.executable).name, *sys.argv])}")
    print(f"machine: {os.cpu_count()} cores, torch {torch.__version__} ({args.threads} torch threads in each case); "
          f"input 224x224 RGB uint8 frames to both paths", flush=True)
    rows, failed = [], []
    cases = ["tiny"] + ([] if args.skip_full else ["full"]) + ([] if args.skip_full or args.skip_merged else ["merged"])
    cases = [args.only] if args.only else cases
    for case in cases:
        with tempfile.TemporaryDirectory(dir=OUT) as scratch:
            result = Path(scratch) / "result.json"
            child = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--case", case, "--result", str(result)])
            if child.returncode != 0 or not result.is_file():
                failed.append(f"{case}: the subprocess exited {child.returncode}")
                continue
            rows.append(json.loads(result.read_text()))
    merged = [row for row in rows if row["case"] == "merged"]
    rows = [row for row in rows if row["case"] != "merged"]

    if rows:
        print("\n| case | window | recompute ms/step | streaming ms/step | ratio | ideal 1/W | peak RSS |")
        print("|---|---|---|---|---|---|---|")
        for row in rows:
            row["ratio"] = row["streaming_ms"] / row["recompute_ms"]
            name = f"{row['case']} ({row['dtype']})" + (" (busy)" if row["busy"] else "")
            print(f"| {name} | {row['window']} | {row['recompute_ms']:.1f} | {row['streaming_ms']:.1f} | "
                  f"{row['ratio']:.3f}x | {1 / row['window']:.3f}x | {size(row['peak_rss_bytes'])} |")
        print("median of the repeats; target <= 0.2x (the tiny preset's window 3 allows at best 0.33x)")
    for row in rows:
        print(f"{row['case']}: streaming vs predict, max |diff| {row['max_abs_diff']:.2e} "
              f"(<= {row['tolerance']:.0e}): {'ok' if row['match'] else 'MISMATCH'}; "
              f"{row['steps']} streaming steps, {row['repeats']} predict calls"
              + (f"; busy: {', '.join(row['busy'])}" if row["busy"] else ""))
    for row in merged:
        row["ratio"] = row["merged_ms"] / row["unmerged_ms"]
        print("\n| full-size bf16 streaming step | unmerged (registry policy, peft) | merged (deploy bundle) | ratio | bundle |")
        print("|---|---|---|---|---|")
        print(f"| median of {row['steps']}{' (busy)' if row['busy'] else ''} | {row['unmerged_ms']:.0f} ms | "
              f"{row['merged_ms']:.0f} ms | {row['ratio']:.3f}x (target <= 0.7x) | {size(row['bundle_bytes'])} |")
        print(f"merged vs unmerged actions: max |diff| {row['max_abs_diff']:.2e} (<= {row['tolerance']:.0e}): "
              f"{'ok' if row['match'] else 'MISMATCH'}; peak RSS {size(row['peak_rss_bytes'])}")
    failed += [f"{row['case']}: streaming actions differ ({row['max_abs_diff']:.2e})"
               for row in rows + merged if not row["match"]]
    print(f"wall time {time.perf_counter() - started:.0f} s")
    return finish(args.json, rows + merged, failed)


if __name__ == "__main__":
    sys.exit(main())
