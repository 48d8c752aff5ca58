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

from .checkpoint import PICKLED_STATE, has_checkpoint, load_checkpoint, publish_policy, save_checkpoint
from .compute import ComputePlan, plan_compute
from ..policy.model import build_policy, trainable_parameters
from ..policy.policy_config import ACTION_STATS_FILE, PolicyConfig
from ..data.schema import ACTION_DIMS
from ..data.store import WindowStore
from .windows import WindowDataset, make_loader

CHECKPOINT = "checkpoint"
HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}


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
    total, count = 0.0, 0
    for batch in loader:
        loss, _ = policy(_to_model_batch(batch))
        size = len(batch["instruction"])
        total += float(accelerator.gather_for_metrics(loss.detach().reshape(1)).mean()) * size
        count += size
    policy.train()
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
    for leftover in output_dir.glob(".*.tmp"):  # the half-written checkpoint or policy of a killed run
        shutil.rmtree(leftover, ignore_errors=True)
    compute = compute or plan_compute()
    log(compute.note)
    accelerator = Accelerator(
        cpu=compute.device == "cpu",
        mixed_precision=compute.mixed_precision,
        gradient_accumulation_steps=config.grad_accum,
        # A shuffle order fixed by (seed, epoch), so a resumed epoch skips exactly the batches done.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    set_seed(config.seed)

    # Frozen weights in the compute precision (half the memory on a GPU); what trains keeps fp32
    # master weights, which the optimizer updates (autocast runs the matmuls in half precision).
    policy = keep_trained_in_fp32(build_policy(policy_config, dtype=HALF.get(compute.precision)))
    counts = trainable_parameters(policy)
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
    train_loader = make_loader(train_set, config.batch_size, True, config.loader_workers, config.seed)
    val_loader = make_loader(val_set, config.batch_size, False, config.loader_workers, config.seed)
    steps_per_epoch = math.ceil(len(train_loader) / config.grad_accum)
    total_steps = min(config.max_steps or 10**12, config.epochs * steps_per_epoch)
    trained = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, min(config.warmup_steps, total_steps // 2), total_steps)
    policy, optimizer, train_loader, val_loader, scheduler = accelerator.prepare(
        policy, optimizer, train_loader, val_loader, scheduler
    )

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

    def checkpoint_now() -> None:
        save_checkpoint(checkpoint, accelerator.unwrap_model(policy), optimizer, scheduler, {
            "step": step, "epoch": epoch, "batches_done": batches_done, "best_val": best_val, "history": history})

    policy.train()
    window_count, clock = 0, time.perf_counter()
    while epoch < config.epochs and step < total_steps:
        train_set.set_epoch(epoch)
        train_loader.set_epoch(epoch)
        running, seen = 0.0, 0
        epoch_loader = accelerator.skip_first_batches(train_loader, batches_done) if batches_done else train_loader
        for batch in epoch_loader:
            with accelerator.accumulate(policy):
                loss, _ = policy(_to_model_batch(batch))
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(trained, config.grad_clip)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            batches_done += 1
            running += float(loss.detach())
            seen += 1
            window_count += len(batch["instruction"])
            if not accelerator.sync_gradients:
                continue
            step += 1
            if step % config.log_every == 0 or step == total_steps:
                rate = window_count / (time.perf_counter() - clock)
                log(f"step {step}/{total_steps}  loss {running / seen:.4f}  "
                    f"lr {scheduler.get_last_lr()[0]:.2e}  {rate:.1f} windows/s")
            if step % config.checkpoint_every == 0:
                checkpoint_now()
            if step >= total_steps:
                break
        val_loss = evaluate_loss(policy, val_loader, accelerator) if len(val_set) else math.nan
        record = {"epoch": epoch + 1, "step": step, "train_loss": running / max(seen, 1), "val_loss": val_loss}
        history.append(record)
        log(f"epoch {epoch + 1}: train loss {record['train_loss']:.4f}, val loss {val_loss:.4f}")
        if on_epoch:  # the record, and the policy as it stands after this epoch
            on_epoch(record, accelerator.unwrap_model(policy))
        improved = not val_loss > best_val  # also true for the first epoch and without validation
        best_val = val_loss if improved and not math.isnan(val_loss) else best_val
        if improved or config.keep == "last":
            publish_policy(accelerator.unwrap_model(policy), output_dir / "policy",
                           {ACTION_STATS_FILE: json.dumps(action_stats, indent=1)})
        epoch, batches_done = epoch + 1, 0
        checkpoint_now()

    (output_dir / "training.json").write_text(json.dumps(
        {"train_config": asdict(config), "history": history, "steps": step}, indent=1))
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
    )
