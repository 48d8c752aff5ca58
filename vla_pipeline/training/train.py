"""The training loop: one readable function, top to bottom (nanoGPT style).

accelerate handles device placement, mixed precision, gradient accumulation and
multi-GPU (`accelerate launch` / torchrun); the rest is plain PyTorch. Checkpoints hold
only what trains (adapter, action token, head, trained backbone parts) plus the
optimizer, scheduler and position, so a killed run resumes where it stopped
(`checkpoint.py`: safetensors and JSON, swapped in whole).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from transformers import get_cosine_schedule_with_warmup

from .autobatch import DEFAULT_MARGIN, cache_key, largest_fitting_batch, memory_fits, plan_batch
from .checkpoint import PICKLED_STATE, has_checkpoint, load_checkpoint, publish_policy, save_checkpoint
from .compute import ComputePlan, plan_compute
from ..policy.model import build_policy, trainable_parameters
from ..policy.policy_config import ACTION_STATS_FILE, PolicyConfig
from ..data.schema import ACTION_DIMS
from ..data.store import WindowStore
from .windows import WindowDataset, make_loader

CHECKPOINT = "checkpoint"
HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}
WARMUP_STEPS = 3  # optimizer steps left out of the steady-state windows/s (allocation, autotuning)


def keep_trained_in_fp32(policy: torch.nn.Module) -> torch.nn.Module:
    """Trainable parameters in float32, whatever the frozen ones were loaded in."""
    for param in policy.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    return policy


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 3
    batch_size: int = 2
    grad_accum: int = 4
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup_steps: int = 10
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 50  # optimizer steps
    max_steps: int | None = None
    loader_workers: int = 0
    mirror_prob: float = 0.5
    colour_jitter: float = 0.1
    # Which epoch's policy is kept: "best" validation loss, or the "last" one (with few validation
    # episodes their loss is noisy, while a cosine schedule ends on a settled model).
    keep: str = "best"

    def __post_init__(self) -> None:
        if self.keep not in ("best", "last"):
            raise ValueError(f"keep must be 'best' or 'last', not {self.keep!r}")

    @classmethod
    def small(cls, **overrides) -> TrainConfig:
        """Training for `PolicyConfig.small()` on a CPU (benchmarks/learning.py): a high lr for a
        small model trained from scratch, 60 warm-up steps, the last epoch's policy kept."""
        values = dict(epochs=20, batch_size=8, grad_accum=1, lr=2e-3, warmup_steps=60, keep="last")
        values.update(overrides)
        return cls(**values)


def describe_setup(policy: PolicyConfig, train: TrainConfig) -> str:
    """What trains and how, in one line for the run log and MLflow."""
    if policy.lora_enable:
        what = f"LoRA r{policy.lora_r} ({policy.lora_targets}) on a frozen backbone"
    elif policy.freeze_backbone:
        what = "frozen backbone"
    else:
        what = "the whole backbone, from its initial weights"
    head = f"{policy.action_head} head" + (f" ({policy.action_decode})" if policy.action_head == "classification" else "")
    extras = f", side probe ×{policy.side_loss_weight}" if policy.side_loss_weight else ""
    return (f"{what}; {head}{extras}; window {policy.window}, chunk {policy.chunk}; {train.epochs} epochs, "
            f"batch {train.batch_size} × {train.grad_accum}, lr {train.lr:g}, warm-up {train.warmup_steps} steps"
            + (" (the CPU preset's own setup, not the full-size default)" if policy.preset == "small" else ""))


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    epochs: int
    best_val_loss: float
    history: list[dict] = field(default_factory=list)
    parameters: dict = field(default_factory=dict)
    device: str = ""
    precision: str = ""
    seconds: float = 0.0
    resumed_from_step: int = 0
    steady_windows_per_s: float = math.nan  # after the first WARMUP_STEPS optimizer steps, all processes
    peak_memory_gib: float = math.nan  # CUDA only: the most GPU memory allocated at once
    batch_size: int = 0  # the per-step batch and accumulation that ran (batch_size auto decides them)
    grad_accum: int = 0
    already_trained: bool = False  # the same training had finished before: nothing ran


def _to_model_batch(batch: dict) -> dict:
    return {
        "images": batch["images"],
        "instructions": list(batch["instruction"]),
        "actions": batch["actions"],
        "action_mask": batch["action_mask"],
        "sides": list(batch.get("side") or []) or None,
    }


@torch.no_grad()
def evaluate_loss(policy, loader, accelerator: Accelerator) -> float:
    policy.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=accelerator.device)  # loss × windows, windows
    for batch in loader:
        loss, _ = policy(_to_model_batch(batch))
        size = len(batch["instruction"])
        sums += torch.tensor([float(loss) * size, size], dtype=torch.float64, device=accelerator.device)
    policy.train()
    total, count = accelerator.reduce(sums, reduction="sum").tolist()  # every process's windows
    return total / max(count, 1)


def synthetic_batch(config: PolicyConfig, size: int, instruction: str = "Navigate around the obstacle "
                    "on the left side and reach the cup") -> dict:
    """`size` windows of random frames and actions, shaped as the loader's (for the batch probe)."""
    from ..data.schema import IMAGE_SIZE

    generator = torch.Generator().manual_seed(size)
    shape = (size, config.window, IMAGE_SIZE, IMAGE_SIZE, 3)
    return {
        "images": torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator),
        "instructions": [instruction] * size,
        "actions": torch.randint(-1, 2, (size, config.window, config.chunk, len(ACTION_DIMS)),
                                 generator=generator).float(),
        "action_mask": torch.ones(size, config.window, config.chunk, dtype=torch.bool),
        "sides": ["left"] * size,
    }


def probe_largest_batch(policy: torch.nn.Module, policy_config: PolicyConfig, precision: str,
                        margin: float = DEFAULT_MARGIN) -> int:
    """The largest per-step batch of windows whose training step (forward, backward, AdamW) on
    this GPU peaks below `1 - margin` of its memory. Changes no weight (lr 0)."""
    device = torch.device("cuda", torch.cuda.current_device())
    policy.to(device)
    trained = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=0.0, weight_decay=0.0, fused=True)

    def step(size: int) -> None:
        with torch.autocast("cuda", dtype=HALF.get(precision, torch.float32), enabled=precision in HALF):
            loss, _ = policy(synthetic_batch(policy_config, size))
        loss.backward()
        optimizer.step()

    def reset() -> None:
        optimizer.zero_grad(set_to_none=True)
        optimizer.state.clear()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)

    total = torch.cuda.get_device_properties(device).total_memory
    fits = memory_fits(step, lambda: torch.cuda.max_memory_allocated(device), reset, int((1 - margin) * total))
    try:
        return largest_fitting_batch(fits)
    finally:
        reset()


def train(
    policy_config: PolicyConfig,
    config: TrainConfig,
    store_path: Path | str,
    train_ids: list[str],
    val_ids: list[str],
    output_dir: Path | str,
    compute: ComputePlan | None = None,
    log: Callable[[str], None] = print,
    on_epoch: Callable[[dict, torch.nn.Module], None] | None = None,
) -> TrainResult:
    """Train on the training episodes' windows; keep the best-by-validation policy in output_dir."""
    started = time.perf_counter()
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    compute = compute or plan_compute()
    set_seed(config.seed)

    # Frozen weights in the compute precision (half the memory on a GPU); what trains keeps fp32
    # master weights, which the optimizer updates (autocast runs the matmuls in half precision).
    policy = keep_trained_in_fp32(build_policy(policy_config, dtype=HALF.get(compute.precision)))
    counts = trainable_parameters(policy)
    per_step, accumulation, batch_note = config.batch_size, config.grad_accum, None
    if compute.auto_batch and compute.device == "cuda":
        key = cache_key(torch.cuda.get_device_name(), torch.cuda.get_device_properties(0).total_memory,
                        policy_config.to_dict(), compute.precision, DEFAULT_MARGIN)
        plan = plan_batch(config.batch_size * config.grad_accum, key,
                          lambda: probe_largest_batch(policy, policy_config, compute.precision))
        per_step, accumulation, batch_note = plan.per_step, plan.grad_accum, plan.note
    elif compute.auto_batch:
        batch_note = f"batch auto: no GPU to probe, keeping {per_step} × {accumulation} accumulation"

    accelerator = Accelerator(
        cpu=compute.device == "cpu",
        mixed_precision=compute.mixed_precision,
        gradient_accumulation_steps=accumulation,
        # A shuffle order fixed by (seed, epoch), so a resumed epoch skips exactly the batches done.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    main = accelerator.is_main_process
    if not main:  # one process speaks for all of them
        log = lambda line: None  # noqa: E731
    processes = accelerator.num_processes
    log(compute.note + (f"; {processes} processes" if processes > 1 else ""))
    if batch_note:
        log(batch_note)
    log(f"parameters: {counts['trainable']:,} trainable of {counts['total']:,}")

    def windows(ids, train):
        return WindowDataset(
            store_path, ids, policy_config.window, policy_config.chunk, policy_config.action_scale,
            train=train, mirror_prob=config.mirror_prob, colour_jitter=config.colour_jitter, seed=config.seed,
        )

    train_set, val_set = windows(train_ids, True), windows(val_ids, False)
    # Saved with the policy: the training actions it was fitted to, in robot units.
    action_stats = {"action_scale": policy_config.action_scale, "dims": list(ACTION_DIMS),
                    **WindowStore(store_path).action_stats(train_ids).to_dict()} if train_ids else {}
    if len(train_set) == 0:
        raise ValueError("no training windows: ingest episodes with at least window + chunk frames first")
    train_loader = make_loader(train_set, per_step, True, config.loader_workers, config.seed)
    val_loader = make_loader(val_set, per_step, False, config.loader_workers, config.seed)
    trained = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=config.lr, weight_decay=config.weight_decay,
                                  fused=compute.device == "cuda")
    # The loaders are sharded per process by prepare(): each process sees 1/N of the windows.
    policy, optimizer, train_loader, val_loader = accelerator.prepare(policy, optimizer, train_loader, val_loader)
    steps_per_epoch = math.ceil(len(train_loader) / accumulation)
    total_steps = min(config.max_steps or 10**12, config.epochs * steps_per_epoch)
    # Built after prepare() on the per-process step count, and not prepared itself: it steps
    # once per optimizer step, the same on every process.
    scheduler = get_cosine_schedule_with_warmup(optimizer, min(config.warmup_steps, total_steps // 2), total_steps)
    if main:
        for leftover in output_dir.glob(".*.tmp"):  # the half-written checkpoint or policy of a killed run
            shutil.rmtree(leftover, ignore_errors=True)
    accelerator.wait_for_everyone()

    # Resume: the trained weights, optimizer, schedule and position of the last checkpoint.
    step, epoch, batches_done, best_val, history = 0, 0, 0, math.inf, []
    checkpoint = output_dir / CHECKPOINT
    if has_checkpoint(checkpoint):
        progress = load_checkpoint(checkpoint, accelerator.unwrap_model(policy), optimizer, scheduler)
        step, epoch, batches_done = progress["step"], progress["epoch"], progress["batches_done"]
        best_val, history = progress["best_val"], progress["history"]
        log(f"resumed from step {step} (epoch {epoch + 1}, batch {batches_done})")
    elif (checkpoint / PICKLED_STATE).is_file():
        log(f"{checkpoint} is from an earlier release (pickled trainer state, never loaded): starting over")
    resumed_from = step
    finished = output_dir / "training.json"
    if (epoch >= config.epochs or step >= total_steps) and finished.is_file():
        record = json.loads(finished.read_text())
        log(f"already trained: step {step} of {total_steps} ({epoch} epochs) finished earlier in {output_dir}; "
            "nothing to train")
        accelerator.wait_for_everyone()
        return TrainResult(
            output_dir=output_dir, steps=step, epochs=epoch, best_val_loss=best_val, history=history,
            parameters=counts, device=compute.device, precision=compute.precision,
            seconds=time.perf_counter() - started, resumed_from_step=step,
            steady_windows_per_s=record.get("steady_windows_per_s", math.nan),
            peak_memory_gib=record.get("peak_memory_gib", math.nan),
            batch_size=per_step, grad_accum=accumulation, already_trained=True,
        )

    def checkpoint_now() -> None:
        if main:  # the others wait, so none runs ahead of a checkpoint it could resume from
            save_checkpoint(checkpoint, accelerator.unwrap_model(policy), optimizer, scheduler, {
                "step": step, "epoch": epoch, "batches_done": batches_done, "best_val": best_val,
                "history": history})
        accelerator.wait_for_everyone()

    cuda = accelerator.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(accelerator.device)
    policy.train()
    # Steady state: the windows and seconds of optimizer steps after the warm-up ones, between
    # steps only (validation passes and checkpoints are not training time).
    window_count, clock, steady, recent = 0, time.perf_counter(), [0, 0.0], [0, 0.0]
    step_windows, since = 0, None
    while epoch < config.epochs and step < total_steps:
        train_set.set_epoch(epoch)
        train_loader.set_epoch(epoch)
        running, seen = 0.0, 0
        epoch_loader = accelerator.skip_first_batches(train_loader, batches_done) if batches_done else train_loader
        since = None if step - resumed_from < WARMUP_STEPS else time.perf_counter()
        for batch in epoch_loader:
            with accelerator.accumulate(policy):
                loss, _ = policy(_to_model_batch(batch))
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(trained, config.grad_clip)
                optimizer.step()
                if accelerator.sync_gradients:
                    scheduler.step()
                optimizer.zero_grad()
            batches_done += 1
            running += float(loss.detach())
            seen += 1
            window_count += len(batch["instruction"]) * processes
            step_windows += len(batch["instruction"]) * processes
            if not accelerator.sync_gradients:
                continue
            step += 1
            now = time.perf_counter()
            if step - resumed_from > WARMUP_STEPS and since is not None:
                for rate in (steady, recent):  # the run's and the last log interval's
                    rate[0], rate[1] = rate[0] + step_windows, rate[1] + now - since
            if step - resumed_from >= WARMUP_STEPS:
                since = now
            step_windows = 0
            if step % config.log_every == 0 or step == total_steps:
                log(f"step {step}/{total_steps}  loss {running / seen:.4f}  lr {scheduler.get_last_lr()[0]:.2e}  "
                    f"{throughput(window_count, clock, recent)}" + (f"  peak {peak_gib(accelerator):.1f} GiB" if cuda else ""))
                recent = [0, 0.0]
            if step % config.checkpoint_every == 0:
                checkpoint_now()
            if step >= total_steps:
                break
        val_loss = evaluate_loss(policy, val_loader, accelerator) if len(val_set) else math.nan
        record = {"epoch": epoch + 1, "step": step, "train_loss": running / max(seen, 1), "val_loss": val_loss}
        history.append(record)
        log(f"epoch {epoch + 1}: train loss {record['train_loss']:.4f}, val loss {val_loss:.4f}")
        if on_epoch and main:  # the record, and the policy as it stands after this epoch
            on_epoch(record, accelerator.unwrap_model(policy))
        improved = not val_loss > best_val  # also true for the first epoch and without validation
        best_val = val_loss if improved and not math.isnan(val_loss) else best_val
        if main and (improved or config.keep == "last"):
            publish_policy(accelerator.unwrap_model(policy), output_dir / "policy",
                           {ACTION_STATS_FILE: json.dumps(action_stats, indent=1)})
        epoch, batches_done = epoch + 1, 0
        checkpoint_now()

    steady_rate = steady[0] / steady[1] if steady[1] > 0 else math.nan
    peak = peak_gib(accelerator) if cuda else math.nan
    log(f"trained {step - resumed_from} steps in {time.perf_counter() - started:.0f} s"
        + (f": {steady_rate:.1f} windows/s on average after the warm-up steps" if steady[1] > 0 else ""))
    if main:
        (output_dir / "training.json").write_text(json.dumps(
            {"train_config": asdict(config), "history": history, "steps": step, "processes": processes,
             "batch": [per_step, accumulation], "steady_windows_per_s": steady_rate,
             "peak_memory_gib": peak}, indent=1))
    accelerator.wait_for_everyone()
    return TrainResult(
        output_dir=output_dir,
        steps=step,
        epochs=epoch,
        best_val_loss=best_val,
        history=history,
        parameters=counts,
        device=compute.device,
        precision=compute.precision,
        seconds=time.perf_counter() - started,
        resumed_from_step=resumed_from,
        steady_windows_per_s=steady_rate,
        peak_memory_gib=peak,
        batch_size=per_step,
        grad_accum=accumulation,
    )


def throughput(windows: int, clock: float, recent: list) -> str:
    """Windows/s of every process together: over the steps since the last log line once the
    warm-up steps are done, before that since the start."""
    if recent[1] > 0:
        return f"{recent[0] / recent[1]:.1f} windows/s"
    return f"{windows / (time.perf_counter() - clock):.1f} windows/s (warming up)"


def peak_gib(accelerator: Accelerator) -> float:
    return torch.cuda.max_memory_allocated(accelerator.device) / 2**30
