"""The GPU figures of the README, in one run of at most ~8 minutes on a GPU machine.

    python benchmarks/gpu.py OUTDIR [--quick] [--no-probe] [--serve-only]

Full-size Kosmos-2 architecture (random bf16 weights: no hub needed), LoRA r32 all-linear,
window 8, chunk 10, through the project's own code:
  env     card, versions, the measured bf16 matmul rate (the MFU denominator)
  train   train() at batch 2 × 4 (the seeds' setup): peak GPU memory, steady windows/s;
          a pure training step (no loader) timed with its FLOPs counted by
          torch.utils.flop_counter: MFU at batch 2 and at the `batch_size: auto` batch
  serve   StreamingPolicy.step on 720p BGR frames, bf16: the registry policy (LoRA unmerged) and
          the merged deploy bundle, each eager and compiled (CUDA graphs), in Hz; then the bundle's
          CUDA-graph streaming against its eager streaming, step by step, over 20+ frames of a
          rendered rollout (the scripted guide in the simulated room), within COMPILED_TOLERANCE
Prints a table against the targets and writes OUTDIR/gpu.json after every section.
--quick: small sizes, runs on a CPU in about a minute (a dry run of the script itself).
"""

from __future__ import annotations

import json
import shutil
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

from vla_pipeline.data.ingest import ingest_episodes
from vla_pipeline.data.store import WindowStore
from vla_pipeline.policy.backbone import build_local_backbone
from vla_pipeline.policy.bundle import export_bundle
from vla_pipeline.policy.model import build_policy, load_policy_dir
from vla_pipeline.policy.policy_config import PolicyConfig
from vla_pipeline.policy.serving import COMPILED_TOLERANCE, StreamingPolicy, compiled_vs_eager, load_bundle
from vla_pipeline.sim.operator import write_sample_episodes
from vla_pipeline.sim.rollout import guide_camera_frames
from vla_pipeline.training.compute import plan_compute
from vla_pipeline.training.split import split_from_store
from vla_pipeline.training.autobatch import probe_largest_batch, synthetic_batch
from vla_pipeline.training.compute import half_dtype
from vla_pipeline.training.train import keep_trained_in_fp32, train
from vla_pipeline.training.train_config import TrainConfig

OUT = Path(sys.argv[1]) if len(sys.argv) > 1 and not sys.argv[1].startswith("--") else Path("benchmarks/out/gpu")
QUICK = "--quick" in sys.argv
PROBE = "--no-probe" not in sys.argv  # --no-probe: skip the batch probe and the pure steps at the auto batch
# --serve-only: no training; the serve section on an untrained policy (random weights time the same)
SERVE_ONLY = "--serve-only" in sys.argv
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
WORK = Path("/tmp/vla-gpu-bench")
LEFT = "Navigate around the obstacle on the left side and reach the cup"
RESULTS: dict = {}
TARGETS = {"peak_gib_b2": 12.0, "mfu_auto": 0.35, "bundle_hz": 100.0}


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def section(name: str, run) -> None:
    started = time.perf_counter()
    print(f"\n=== {name}", flush=True)
    RESULTS[name] = {}
    try:
        run(RESULTS[name])  # fills its dict as it goes: a late failure keeps the earlier figures
    except Exception as error:
        traceback.print_exc()
        RESULTS[name] = {"error": f"{type(error).__name__}: {error}"[:500]}
    RESULTS[name]["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(RESULTS[name], default=str)[:2000], flush=True)
    (OUT / "gpu.json").write_text(json.dumps(RESULTS, indent=1, default=str))


def env(result: dict) -> None:
    import peft
    import transformers

    result.update({"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
                   "device": torch.cuda.get_device_name(0) if CUDA else "cpu"})
    if CUDA:
        n = 8192
        a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        for _ in range(3):
            a @ b
        sync()
        started = time.perf_counter()
        for _ in range(10):
            a @ b
        sync()
        result["bf16_matmul_tflops"] = round(2 * n**3 / ((time.perf_counter() - started) / 10) / 1e12, 1)
        result["memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)


def random_backbone() -> Path:
    """The full-size Kosmos-2 architecture with random weights, saved with save_pretrained (bf16)."""
    from transformers import Kosmos2Config, Kosmos2Model

    folder = WORK / "kosmos2-random"
    config = Kosmos2Config()
    if QUICK:
        config = Kosmos2Config(text_config=dict(embed_dim=256, layers=2, ffn_dim=512, attention_heads=4),
                               vision_config=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                                  num_attention_heads=4))
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(DEVICE):
            model = Kosmos2Model(config)
    finally:
        torch.set_default_dtype(default)
    model.save_pretrained(folder)
    build_local_backbone("tiny")[1].save_pretrained(folder)  # a processor; its ids fit the real vocabulary
    del model
    return folder


def full_config(backbone: Path, checkpointing: bool = False) -> PolicyConfig:
    return PolicyConfig(backbone=str(backbone), preset="full", window=8, chunk=10, gradient_checkpointing=checkpointing)


def train_section(out: dict) -> None:
    from torch.utils.flop_counter import FlopCounterMode

    backbone = random_backbone()
    config = full_config(backbone)
    episodes = WORK / "episodes"
    write_sample_episodes(episodes, 6 if QUICK else 16, seed=0, height=180 if QUICK else 720, width=320 if QUICK else 1280)
    store = WORK / "store.zarr"
    ingest_episodes(sorted(episodes.glob("*.h5")), store, workers=4)
    split = split_from_store(WindowStore(store))
    compute = plan_compute("auto", "auto")
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    lines: list[str] = []
    result = train(config, TrainConfig(epochs=20, batch_size=2, grad_accum=1 if QUICK else 4, max_steps=2 if QUICK else 8,
                                       log_every=1, checkpoint_every=10**9, loader_workers=4),
                   store, split.train, split.val, WORK / "train-b2", compute=compute,
                   log=lambda line: (lines.append(line), print("  ", line, flush=True)))
    out["train_b2x4"] = {"peak_gib": result.peak_memory_gib, "steady_windows_per_s": result.steady_windows_per_s,
                         "device": result.device, "precision": result.precision, "parameters": result.parameters}
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    result = train(full_config(backbone, checkpointing=True),
                   TrainConfig(epochs=20, batch_size=2, grad_accum=1 if QUICK else 4, max_steps=2, log_every=1,
                               checkpoint_every=10**9, loader_workers=4),
                   store, split.train, split.val, WORK / "train-b2-checkpointing", compute=compute)
    out["train_b2x4_checkpointing"] = {"peak_gib": result.peak_memory_gib}

    peak = RESULTS.get("env", {}).get("bf16_matmul_tflops")
    # Activation checkpointing with LoRA: the memory it saves at batch 2, and what it costs.
    checkpointed = keep_trained_in_fp32(build_policy(config.replace(gradient_checkpointing=True),
                                                     dtype=half_dtype(compute.precision))).to(DEVICE)
    out["checkpointed_modules"] = sum(bool(getattr(m, "gradient_checkpointing", False))
                                      for m in checkpointed.kosmos.modules())
    out["checkpointing_b2"] = pure_step(checkpointed, config, 2, peak, FlopCounterMode)
    del checkpointed
    if not PROBE:
        return
    policy = keep_trained_in_fp32(build_policy(config, dtype=half_dtype(compute.precision))).to(DEVICE)
    # The `compute.batch_size: auto` probe itself (real steps until 85% of the card is used).
    auto = probe_largest_batch(policy, config, compute.precision) if CUDA else 2
    out["auto_batch"] = auto
    for size in sorted({2, auto}):
        out[f"pure_step_b{size}"] = pure_step(policy, config, size, peak, FlopCounterMode)
    policy.cpu()
    del policy
    if CUDA:
        torch.cuda.empty_cache()


def pure_step(policy, config: PolicyConfig, size: int, peak_tflops, counter_mode) -> dict:
    """A training step (forward, backward, fused AdamW) on synthetic windows, no loader: time,
    FLOPs (torch.utils.flop_counter), MFU against the measured bf16 matmul rate, peak memory."""
    policy.train()  # dropout and activation checkpointing act in training mode only
    trained = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=1e-4, fused=CUDA)
    batch = synthetic_batch(config, size)

    def step() -> None:
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            loss, _ = policy(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    if CUDA:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    step()
    step()
    sync()
    with counter_mode(display=False) as counter:
        step()
    repeats = 2 if QUICK else 6
    sync()
    started = time.perf_counter()
    for _ in range(repeats):
        step()
    sync()
    seconds = (time.perf_counter() - started) / repeats
    flops = counter.get_total_flops()
    optimizer.state.clear()
    return {"s_per_step": round(seconds, 4), "windows_per_s": round(size / seconds, 2),
            "tflop_per_step": round(flops / 1e12, 3), "achieved_tflops": round(flops / seconds / 1e12, 1),
            "mfu": round(flops / seconds / 1e12 / peak_tflops, 3) if peak_tflops else None,
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if CUDA else None}


def step_hz(policy: StreamingPolicy, repeats: int) -> float:
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (720, 1280, 3), dtype=np.uint8) for _ in range(4)]
    for i in range(12):  # warm-up: compilation and graph capture happen here
        policy.step(frames[i % 4], LEFT)
    sync()
    times = []
    for i in range(repeats):
        started = time.perf_counter()
        policy.step(frames[i % 4], LEFT)
        sync()
        times.append(time.perf_counter() - started)
    return round(1 / float(np.median(times)), 1)


def step_breakdown(policy: StreamingPolicy, repeats: int) -> dict:
    """Where a streaming step's time goes (ms, medians): the camera frame to normalised pixels on
    the CPU, the backbone on the new frame (GPU, synchronised), the head over the window and the
    copy of the actions back."""
    from collections import deque

    rng = np.random.default_rng(2)
    frames = [rng.integers(0, 256, (720, 1280, 3), dtype=np.uint8) for _ in range(4)]
    inner, config = policy.policy, policy.config
    features = deque(maxlen=config.window)
    parts = {"preprocess_ms": [], "backbone_ms": [], "head_and_copy_ms": []}
    with torch.no_grad():
        for i in range(repeats + 8):
            started = time.perf_counter()
            pixels = policy.preprocess(frames[i % 4])
            sync()
            preprocessed = time.perf_counter()
            features.append(policy._encode(pixels[None], [LEFT])[0])
            sync()
            encoded = time.perf_counter()
            (inner.head(torch.stack(list(features))[None])[0, -1] * config.action_scale).float().cpu().numpy()
            done = time.perf_counter()
            if i >= 8:
                parts["preprocess_ms"].append(preprocessed - started)
                parts["backbone_ms"].append(encoded - preprocessed)
                parts["head_and_copy_ms"].append(done - encoded)
    return {key: round(1000 * float(np.median(values)), 2) for key, values in parts.items()}


def untrained_policy_dir() -> Path:
    """The full-size policy with random weights, saved as training would save it (no training)."""
    from vla_pipeline.policy.model import save_policy

    backbone = random_backbone()
    policy = build_policy(full_config(backbone), dtype=torch.bfloat16)
    return save_policy(policy, WORK / "train-b2" / "policy")


def serve_section(out: dict) -> None:
    policy_dir = untrained_policy_dir() if SERVE_ONLY else WORK / "train-b2" / "policy"
    bundle = export_bundle(policy_dir, WORK / "bundle", dtype="bf16")
    out.update({"bundle_mib": round(sum(f.stat().st_size for f in bundle.rglob("*") if f.is_file()) / 2**20, 1),
                "policy_dir_mib": round(sum(f.stat().st_size for f in policy_dir.rglob("*") if f.is_file()) / 2**20, 1)})
    repeats = 4 if QUICK else 60
    for compiled in (False, True) if CUDA else (False,):
        name = "compiled" if compiled else "eager"
        registry = StreamingPolicy(load_policy_dir(policy_dir, dtype=torch.bfloat16).to(DEVICE), compiled=compiled)
        out[f"registry_{name}_hz"] = step_hz(registry, repeats)
        del registry
        deployed = load_bundle(bundle, device=DEVICE, compiled=compiled)
        out[f"bundle_{name}_hz"] = step_hz(deployed, repeats)
        out[f"bundle_{name}_breakdown"] = step_breakdown(deployed, repeats)
        print(json.dumps({k: v for k, v in out.items() if name in k}), flush=True)
        (OUT / "gpu.json").write_text(json.dumps(RESULTS, indent=1, default=str))  # kept if a later step dies
        out[f"bundle_{name}_metadata"] = {k: v for k, v in deployed.metadata.items() if k != "bundle"}
        del deployed
        if CUDA:
            torch.cuda.empty_cache()
    if CUDA:
        # Real-looking frames, not noise: noise frames give near-identical features, so a window that
        # held one frame's feature eight times would pass unseen.
        episodes = guide_camera_frames(20, seed=3, env_kwargs={"height": 720, "width": 1280})
        deployed = load_bundle(bundle, device=DEVICE, compiled=False)
        difference = compiled_vs_eager(deployed.policy, episodes)
        tolerance = COMPILED_TOLERANCE[torch.bfloat16]
        out["bundle_compiled_vs_eager"] = {"frames": sum(len(frames) for frames, _ in episodes),
                                           "max_abs_diff": difference, "tolerance": tolerance,
                                           "equal": difference <= tolerance}


def table() -> None:
    env_, train_, serve_ = (RESULTS.get(k, {}) for k in ("env", "train", "serve"))
    auto = train_.get("auto_batch")
    rows = [
        ("peak GPU memory, batch 2 × 4", f"{train_.get('train_b2x4', {}).get('peak_gib')} GiB", f"≤ {TARGETS['peak_gib_b2']:.0f} GiB"),
        ("peak GPU memory, batch 2 × 4, gradient checkpointing", f"{train_.get('train_b2x4_checkpointing', {}).get('peak_gib')} GiB", ""),
        ("steady windows/s in train(), batch 2 × 4", train_.get("train_b2x4", {}).get("steady_windows_per_s"), ""),
        ("gradient checkpointing, batch 2: peak GiB, s/step", f"{train_.get('checkpointing_b2', {}).get('peak_gib')}, "
                                                            f"{train_.get('checkpointing_b2', {}).get('s_per_step')} "
                                                            f"(without: {train_.get('pure_step_b2', {}).get('peak_gib')}, "
                                                            f"{train_.get('pure_step_b2', {}).get('s_per_step')})", ""),
        ("pure step, batch 2: windows/s, MFU", f"{train_.get('pure_step_b2', {}).get('windows_per_s')}, "
                                               f"{train_.get('pure_step_b2', {}).get('mfu')}", ""),
        (f"pure step, auto batch {auto}: windows/s, MFU", f"{train_.get(f'pure_step_b{auto}', {}).get('windows_per_s')}, "
                                                        f"{train_.get(f'pure_step_b{auto}', {}).get('mfu')}",
         f"MFU ≥ {TARGETS['mfu_auto']:.2f}"),
        ("registry policy step (LoRA unmerged), eager / compiled", f"{serve_.get('registry_eager_hz')} / "
                                                                 f"{serve_.get('registry_compiled_hz')} Hz", ""),
        ("bundle step (merged), eager / compiled", f"{serve_.get('bundle_eager_hz')} / {serve_.get('bundle_compiled_hz')} Hz",
         f"≥ {TARGETS['bundle_hz']:.0f} Hz"),
        ("bundle step (graphs): preprocess / backbone / head+copy ms",
         " / ".join(str(serve_.get("bundle_compiled_breakdown", {}).get(k)) for k in
                    ("preprocess_ms", "backbone_ms", "head_and_copy_ms")), ""),
        ("bundle streaming, CUDA graphs vs eager over a rendered rollout: frames, max |difference|",
         f"{serve_.get('bundle_compiled_vs_eager', {}).get('frames')}, "
         f"{serve_.get('bundle_compiled_vs_eager', {}).get('max_abs_diff')}",
         f"≤ {COMPILED_TOLERANCE[torch.bfloat16]} (bf16): "
         f"{'met' if serve_.get('bundle_compiled_vs_eager', {}).get('equal') else 'NOT MET'}"),
        ("policy directory / bundle size", f"{serve_.get('policy_dir_mib')} / {serve_.get('bundle_mib')} MiB", ""),
    ]
    print(f"\n{env_.get('device')}: bf16 matmul {env_.get('bf16_matmul_tflops')} TFLOP/s, torch {env_.get('torch')}")
    print(f"{'measured':<58} {'figure':<26} target")
    for label, figure, target in rows:
        print(f"{label:<58} {str(figure):<26} {target}")


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    section("env", env)
    if not SERVE_ONLY:
        section("train", train_section)
    section("serve", serve_section)
    table()
    return 0


if __name__ == "__main__":
    sys.exit(main())
