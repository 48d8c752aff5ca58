"""Training throughput on this machine: the window loader, the tiny policy and the full-size one.

    .venv/bin/python benchmarks/train_throughput.py [--n 6 --seed 0] [--windows 48] [--steps 30] [--json PATH]
    .venv/bin/python benchmarks/train_throughput.py --full [--full-window 2 --full-steps 4] [--json PATH]
        (--full is also spelled --model microsoft/kosmos-2-patch14-224 --random-init)

Default run, on a temp Zarr store ingested from --n sample episodes (720x1280, as the collector writes):
  1 loader  WindowDataset (train=False; train=True: mirror + jitter) vs HDF5WindowDataset (opens the HDF5
            file and resizes every frame per item), same windows, one process    target >= 50x origin
  2 tiny    PolicyConfig.tiny() forward+backward+AdamW, batch 2, after a warm-up step; then train()
--full (only that, so the peak RSS is its own): Kosmos2Model(Kosmos2Config()), random bf16 weights, saved
  by a child process, loaded by build_policy (from_pretrained), trained on random frames with the seeds'
  setup (LoRA r32 all-linear, LSTM 512x4, chunk 10), batch 1. Each measurement waits up to --quiet-wait s
  for a quiet CPU and is marked "busy" if other processes competed (the check of benchmarks/ingest.py).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import multiprocessing
import os
import re
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from vla_pipeline.data.ingest import episode_files, ingest_episodes
from vla_pipeline.policy.backbone import build_local_backbone
from vla_pipeline.policy.model import build_policy, trainable_parameters
from vla_pipeline.policy.policy_config import DEFAULT_BACKBONE, PolicyConfig
from vla_pipeline.policy.preprocess import encode_prompts
from vla_pipeline.data.schema import INSTRUCTION_TEMPLATE
from vla_pipeline.training.train import train
from vla_pipeline.training.train_config import TrainConfig
from vla_pipeline.training.windows import HDF5WindowDataset, WindowDataset, make_loader

from ingest import OUT, competitors, finish, sample_folder, snapshot, wait_for_quiet  # benchmarks/ingest.py, beside this script

INSTRUCTION = INSTRUCTION_TEMPLATE.format(side="left", target="cup")


def measured(work, quiet_wait: float):
    """(work(), the processes that competed for the CPU meanwhile), after waiting for a quiet CPU."""
    with contextlib.redirect_stdout(io.StringIO()) as waited:  # one line a second: summarised below
        wait_for_quiet(quiet_wait)
    if seconds := waited.getvalue().count("\n"):
        print(f"  waited {seconds} s for other processes to leave the CPU", flush=True)
    before, started = snapshot(), time.perf_counter()
    result = work()
    return result, competitors(before, snapshot(), time.perf_counter() - started)


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB on Linux


def loader_pass(dataset, indices: list[int], repeat: int = 2) -> float:
    """Seconds of the best pass over dataset[i] for i in indices (>= `repeat` passes and >= 1 s)."""
    dataset[indices[0]]  # open handles outside the clock
    times = []
    while len(times) < repeat or sum(times) < 1.0:
        started = time.perf_counter()
        for i in indices:
            dataset[i]
        times.append(time.perf_counter() - started)
    return min(times)


def train_steps(policy, batches: list[dict], log=None) -> list[float]:
    """Seconds of each forward+backward+clip+AdamW step, one per batch (as train() does them)."""
    trained = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=1e-4, weight_decay=0.01)
    policy.train()
    times = []
    for batch in batches:
        started = time.perf_counter()
        policy(batch)[0].backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - started)
        if log:
            log(f"  step {len(times)}: {times[-1]:.1f} s, peak RSS {peak_rss_gib():.1f} GiB")
    return times


def bench_loader(store: Path, ids: list[str], paths: list[Path], args) -> list[dict]:
    window, chunk = (8, 10) if len(WindowDataset(store, ids, 8, 10)) >= 16 else (8, 1)
    zarr, origin = WindowDataset(store, ids, window, chunk), HDF5WindowDataset(paths, window, chunk)
    assert zarr.index == origin.index, "the two loaders list different windows"
    indices = np.random.default_rng(args.seed).integers(0, len(zarr), args.windows).tolist()
    same = all(np.array_equal(zarr[i]["images"], origin[i]["images"]) for i in indices[:3])
    args.setting = f"window {window}, chunk {chunk}" + ("" if chunk == 10 else " (< 16 windows at chunk 10)")
    print(f"[1] loader, {args.setting}: {len(zarr)} windows stored, the same {len(indices)} random ones "
          f"for each loader; same pixels as the origin loader: {'yes' if same else 'NO'}", flush=True)
    rows = []
    for name, dataset in [("HDF5WindowDataset (origin)", origin), ("WindowDataset train=False", zarr),
                          ("WindowDataset train=True (aug)", WindowDataset(store, ids, window, chunk, train=True))]:
        seconds, busy = measured(lambda: loader_pass(dataset, indices), args.quiet_wait)
        rows.append({"measurement": name, "windows": len(indices), "seconds": round(seconds, 4),
                     "windows_per_s": round(len(indices) / seconds, 2), "busy": busy})
        print(f"  {name}: {rows[-1]['windows_per_s']:.1f} windows/s", flush=True)
    for row in rows[1:]:
        row["ratio"] = round(row["windows_per_s"] / rows[0]["windows_per_s"], 1)
        row["target"], row["pass"] = ">= 50x origin", row["ratio"] >= 50
    return rows


def bench_tiny(store: Path, ids: list[str], args) -> list[dict]:
    config = PolicyConfig.tiny()
    print(f"[2] tiny: window {config.window}, chunk {config.chunk}, LoRA r{config.lora_r} {config.lora_targets}, "
          f"batch 2, {args.steps} steps, fp32, {torch.get_num_threads()} torch threads", flush=True)
    policy = build_policy(config)
    dataset = WindowDataset(store, ids, config.window, config.chunk, config.action_scale, train=True)
    batches, epoch = [], 0
    while len(batches) < args.steps + 1:
        dataset.set_epoch(epoch)
        batches += [{"images": b["images"], "instructions": b["instruction"], "actions": b["actions"],
                     "action_mask": b["action_mask"]} for b in make_loader(dataset, 2, True, seed=epoch)
                    if len(b["instruction"]) == 2]
        epoch += 1
    times, busy = measured(lambda: train_steps(policy, batches[: args.steps + 1])[1:], args.quiet_wait)
    own = {"measurement": "tiny steps (own loop)", "windows": 2 * len(times), "seconds": round(sum(times), 3),
           "windows_per_s": round(2 * len(times) / sum(times), 2), "s_per_step": round(float(np.mean(times)), 4),
           "s_per_step_median": round(float(np.median(times)), 4), "busy": busy, **trainable_parameters(policy)}
    print(f"  own loop: {own['windows_per_s']:.1f} windows/s", flush=True)
    logged = []
    with tempfile.TemporaryDirectory(prefix="train-", dir=OUT) as scratch:
        run = TrainConfig(epochs=1, batch_size=2, grad_accum=1, max_steps=args.steps, log_every=args.steps,
                          checkpoint_every=10**9)
        result, busy = measured(lambda: train(config, run, store, ids, [], scratch, log=lambda line: (
            logged.append(line), print(f"  train(): {line}", flush=True))), args.quiet_wait)
    rate = [float(m[1]) for line in logged if (m := re.search(r"([\d.]+) windows/s", line))]
    return [own, {"measurement": "tiny train() (its log)", "windows": 2 * result.steps, "steps": result.steps,
                  "windows_per_s": rate[-1] if rate else None, "busy": busy}]


def _save_random_kosmos(directory: str) -> None:
    """In a child process: Kosmos-2 at its default size with random bf16 weights, and the tiny tokenizer."""
    from transformers import Kosmos2Config, Kosmos2Model

    torch.set_default_dtype(torch.bfloat16)  # never materialise an fp32 copy (~6.7 GB)
    torch.manual_seed(0)
    Kosmos2Model(Kosmos2Config()).save_pretrained(directory)
    build_local_backbone("tiny")[1].save_pretrained(directory)


def random_full_policy(**config) -> tuple:
    """(policy, load seconds): the full-size architecture with random bf16 weights, built and
    saved by a child process (so its memory is not this process's peak), then loaded through
    build_policy like any local checkpoint. `config` overrides PolicyConfig fields."""
    scratch = Path(tempfile.mkdtemp(prefix="kosmos2-random-", dir=OUT))
    try:
        started = time.perf_counter()
        child = multiprocessing.get_context("spawn").Process(target=_save_random_kosmos, args=(str(scratch),))
        child.start()
        child.join()
        if child.exitcode != 0:
            raise RuntimeError(f"building the random Kosmos-2 failed (exit code {child.exitcode})")
        print(f"  built and saved by a child process in {time.perf_counter() - started:.0f} s", flush=True)
        started = time.perf_counter()
        policy = build_policy(PolicyConfig(backbone=str(scratch), preset="full", **config), dtype=torch.bfloat16)
        return policy, time.perf_counter() - started
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def bench_full(args) -> dict:
    window, chunk = args.full_window, 10
    print(f"[3] full size: Kosmos2Config() defaults, random bf16 weights, LoRA r32 all-linear, window {window}, "
          f"chunk {chunk}, batch 1, {args.full_steps} steps on random frames", flush=True)
    policy, load_s = random_full_policy(window=window, chunk=chunk)
    tokens = encode_prompts(policy.tokenizer, [INSTRUCTION], policy.num_image_tokens).input_ids.shape[1]
    counts = trainable_parameters(policy)
    print(f"  loaded by build_policy in {load_s:.0f} s; {counts['trainable']:,} trainable of {counts['total']:,}; "
          f"{tokens} tokens per frame", flush=True)
    g = torch.Generator().manual_seed(0)
    batch = {"images": torch.randint(0, 256, (1, window, 224, 224, 3), dtype=torch.uint8, generator=g),
             "instructions": [INSTRUCTION], "actions": torch.rand(1, window, chunk, 2, generator=g) * 2 - 1,
             "action_mask": torch.ones(1, window, chunk, dtype=torch.bool)}
    times, busy = measured(lambda: train_steps(policy, [batch] * args.full_steps, log=print), args.quiet_wait)
    step_s = float(np.mean(times[1:] if len(times) > 1 else times))
    return {"window": window, "chunk": chunk, "batch": 1, "tokens_per_frame": tokens, "load_s": round(load_s, 1),
            "step_times_s": [round(t, 2) for t in times], "s_per_step": round(step_s, 2),
            "s_per_frame_fwd_bwd": round(step_s / window, 2), "peak_rss_gib": round(peak_rss_gib(), 2),
            "busy": busy, **counts}


def print_table(figures: dict) -> None:
    if full := figures.get("full"):
        print(f"""
full-size Kosmos-2, random init, bf16 on the CPU   window {full['window']} x batch 1, chunk {full['chunk']}
parameters trainable / total          {full['trainable']:,} / {full['total']:,}
tokens per frame (tiny tokenizer*)    {full['tokens_per_frame']}
load by build_policy                  {full['load_s']:.0f} s
s per optimizer step (mean after 1st) {full['s_per_step']:.1f} s   (all steps: {full['step_times_s']})
s per frame forward+backward          {full['s_per_frame_fwd_bwd']:.1f} s
peak RSS (ru_maxrss)                  {full['peak_rss_gib']:.1f} GiB
busy (others used the CPU meanwhile)  {', '.join(full['busy']) or 'no'}
* no real Kosmos-2 tokenizer offline: the tiny word-level one gives about the same prompt length
  (64 image slots + ~22 words), and the sequence length is what the throughput depends on""")
        return
    print(f"\n{'measurement':<32}{'windows/s':>10}{'s/step':>8}{'ratio':>8}  {'target':<15}result")
    for row in figures["rows"]:
        rate = "" if row["windows_per_s"] is None else f"{row['windows_per_s']:.1f}"
        step = f"{row['s_per_step']:.3f}" if "s_per_step" in row else ""
        ratio = f"{row['ratio']:.1f}x" if "ratio" in row else ""
        result = ("" if "pass" not in row else "PASS" if row["pass"] else "MISS") + (" (busy)" if row["busy"] else "")
        print(f"{row['measurement']:<32}{rate:>10}{step:>8}{ratio:>8}  {row.get('target', ''):<15}{result}")
    print(f"loader: {figures['setting']}, one process; tiny: batch 2, fp32, {figures['rows'][3]['trainable']:,} "
          f"of {figures['rows'][3]['total']:,} parameters train")
    if any(row["busy"] for row in figures["rows"]):
        print("(busy): other processes used the CPU during that measurement; rerun on a quiet machine")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=6, help="sample episodes for the store (default 6)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--windows", type=int, default=48, help="random windows per loader pass (default 48)")
    parser.add_argument("--steps", type=int, default=30, help="tiny optimizer steps after a warm-up (default 30)")
    parser.add_argument("--full", action="store_true", help="only the full-size Kosmos-2 measurement")
    parser.add_argument("--model", help=f"with --random-init: {DEFAULT_BACKBONE}, the same as --full")
    parser.add_argument("--random-init", action="store_true")
    parser.add_argument("--full-window", type=int, default=2, help="frames per window with --full (default 2)")
    parser.add_argument("--full-steps", type=int, default=4, help="optimizer steps with --full (default 4)")
    parser.add_argument("--quiet-wait", type=float, default=60, help="max s to wait for a quiet CPU (60)")
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    args = parser.parse_args()
    if args.model is not None or args.random_init:
        if not args.random_init or args.model != DEFAULT_BACKBONE:
            parser.error(f"nothing is downloaded: only --model {DEFAULT_BACKBONE} --random-init is supported")
        args.full = True

    OUT.mkdir(parents=True, exist_ok=True)
    figures: dict = {"cores": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    print(f"machine: {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)", flush=True)
    if args.full:
        figures["full"] = bench_full(args)
    else:
        folder = sample_folder(args.n, args.seed)
        with tempfile.TemporaryDirectory(prefix="store-", dir=OUT) as scratch:
            store, files = Path(scratch) / "store.zarr", episode_files(folder)
            outcomes = ingest_episodes(files, store)
            stored = [(path, o.episode_id) for path, o in zip(files, outcomes) if o.status == "stored"]
            print(f"store: {len(stored)} of {len(files)} episodes from {folder}", *(
                f"\n  left out {o.episode_id}: {o.reason}" for o in outcomes if o.status != "stored"), flush=True)
            paths, ids = [p for p, _ in stored], [i for _, i in stored]
            for path in paths:  # the page cache holds the HDF5 files, as it holds the fresh store
                path.read_bytes()
            figures["rows"] = bench_loader(store, ids, paths, args) + bench_tiny(store, ids, args)
            figures["setting"] = args.setting
    print_table(figures)
    return finish(args.json, figures)


if __name__ == "__main__":
    sys.exit(main())
