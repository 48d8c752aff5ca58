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
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from transformers import get_cosine_schedule_with_warmup

from ..data.schema import ACTION_DIMS
from ..data.store import WindowStore
from ..policy.model import build_policy, trainable_parameters
from ..policy.policy_config import ACTION_STATS_FILE, PolicyConfig
from .autobatch import batch_split
from .checkpoint import PICKLED_STATE, has_checkpoint, load_checkpoint, publish_policy, save_checkpoint
from .compute import ComputePlan, half_dtype, plan_compute
from .train_config import TrainConfig
from .windows import Augmentation, EpisodeDataset, WindowDataset, make_loader

CHECKPOINT = "checkpoint"
WARMUP_STEPS = 3  # optimizer steps left out of the steady-state windows/s (allocation, autotuning)


def keep_trained_in_fp32(policy: torch.nn.Module) -> torch.nn.Module:
    """Trainable parameters in float32, whatever the frozen ones were loaded in."""
    for param in policy.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    return policy


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
        "lengths": batch.get("lengths"),  # whole episodes (TrainConfig.batching "episodes")
    }


def windows_in(batch: dict, window: int) -> int:
    """The training windows a batch holds: its windows, or those of its whole episodes (so the
    windows/s of both batchings compare, an epoch being the same windows)."""
    lengths = batch.get("lengths")
    if lengths is None:
        return len(batch["instruction"])
    return int((torch.as_tensor(lengths) - window + 1).clamp_min(0).sum())


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
    policy = keep_trained_in_fp32(build_policy(policy_config, dtype=half_dtype(compute.precision)))
    counts = trainable_parameters(policy)
    per_step, accumulation, batch_note = batch_split(policy, policy_config, config, compute)

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
        kind = EpisodeDataset if config.batching == "episodes" else WindowDataset
        return kind(
            store_path, ids, policy_config.window, policy_config.chunk, policy_config.action_scale,
            train=train, augmentation=Augmentation.of(config), seed=config.seed,
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
    rates = Throughput(resumed_from)
    while epoch < config.epochs and step < total_steps:
        train_set.set_epoch(epoch)
        train_loader.set_epoch(epoch)
        running, seen = 0.0, 0
        epoch_loader = accelerator.skip_first_batches(train_loader, batches_done) if batches_done else train_loader
        rates.resume_timing(step)
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
            rates.add(windows_in(batch, policy_config.window) * processes)
            if not accelerator.sync_gradients:
                continue
            step += 1
            rates.step_done(step)
            if step % config.log_every == 0 or step == total_steps:
                log(f"step {step}/{total_steps}  loss {running / seen:.4f}  lr {scheduler.get_last_lr()[0]:.2e}  "
                    f"{rates.since_last_line()}" + (f"  peak {peak_gib(accelerator):.1f} GiB" if cuda else ""))
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

    steady_rate = rates.steady_rate()
    peak = peak_gib(accelerator) if cuda else math.nan
    log(f"trained {step - resumed_from} steps in {time.perf_counter() - started:.0f} s"
        + (f": {steady_rate:.1f} windows/s on average after the warm-up steps" if math.isfinite(steady_rate) else ""))
    if main:
        (output_dir / "training.json").write_text(json.dumps(
            {"train_config": config.model_dump(), "history": history, "steps": step, "processes": processes,
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


class Throughput:
    """Windows/s of every process together, counted between optimizer steps only (validation
    passes and checkpoints are not training time) and from the (WARMUP_STEPS + 1)-th step of this
    run on: over the whole run (`steady_rate`) and since the last progress line."""

    def __init__(self, resumed_from: int):
        self.resumed_from, self.started = resumed_from, time.perf_counter()
        self.windows = 0  # every window since the start, the warm-up ones included
        self.step_windows = 0  # windows of the optimizer step under way
        self.since: float | None = None  # when the step under way began; None: not timed
        self.steady, self.recent = [0, 0.0], [0, 0.0]  # [windows, seconds]

    def resume_timing(self, step: int) -> None:
        """At an epoch's start: what ran since the last step (validation, checkpoint) is not counted."""
        self.since = time.perf_counter() if step - self.resumed_from >= WARMUP_STEPS else None

    def add(self, windows: int) -> None:
        self.windows += windows
        self.step_windows += windows

    def step_done(self, step: int) -> None:
        now = time.perf_counter()
        if step - self.resumed_from > WARMUP_STEPS and self.since is not None:
            for rate in (self.steady, self.recent):
                rate[0], rate[1] = rate[0] + self.step_windows, rate[1] + now - self.since
        if step - self.resumed_from >= WARMUP_STEPS:
            self.since = now
        self.step_windows = 0

    def since_last_line(self) -> str:
        windows, seconds = self.recent
        self.recent = [0, 0.0]
        if seconds > 0:
            return f"{windows / seconds:.1f} windows/s"
        return f"{self.windows / (time.perf_counter() - self.started):.1f} windows/s (warming up)"

    def steady_rate(self) -> float:
        return self.steady[0] / self.steady[1] if self.steady[1] > 0 else math.nan


def peak_gib(accelerator: Accelerator) -> float:
    return torch.cuda.max_memory_allocated(accelerator.device) / 2**30
