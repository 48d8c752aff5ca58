"""How a policy is trained, in one validated record (the policy itself is `PolicyConfig`)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..policy.policy_config import PolicyConfig, config_error


# Every augmentation but the mirror off (the CPU preset's setting).
MIRROR_ONLY = dict(brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0, blur_prob=0.0, paraphrase_prob=0.0)


class TrainConfig(BaseModel):
    """AdamW with a cosine schedule and warm-up, gradient clipping and accumulation; augmentation
    (mirror, crop, colour, blur, instruction paraphrases); which epoch's policy is kept. A bad value raises a ValueError naming
    the field and what it accepts."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    epochs: int = Field(3, ge=1, description="passes over the training windows")
    batch_size: int = Field(2, ge=1, description="windows (or episodes) per step (compute.batch_size: auto may split windows)")
    batching: Literal["windows", "episodes"] = Field("windows", description=(
        "windows: an item is a window, so a frame is encoded once per window it is in; episodes: an "
        "item is a whole episode, each frame encoded once a step and its windows cut from the frames' "
        "features, trained with the same loss"))
    grad_accum: int = Field(4, ge=1, description="steps per optimizer step")
    lr: float = Field(1e-4, gt=0, description="AdamW learning rate, the peak of the cosine schedule")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay")
    warmup_steps: int = Field(10, ge=0, description="optimizer steps of linear warm-up")
    grad_clip: float = Field(1.0, gt=0, description="gradient norm clipped to this")
    seed: int = Field(0, description="shuffle order and augmentation draws")
    log_every: int = Field(10, ge=1, description="optimizer steps between progress lines")
    checkpoint_every: int = Field(50, ge=1, description="optimizer steps between checkpoints")
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps")
    loader_workers: int = Field(0, ge=0, description="data loader processes (the compute resource sets it)")
    # Augmentation (windows.Augmentation): the same change for all frames of a window; 0 turns one off.
    mirror_prob: float = Field(0.5, ge=0.0, le=1.0, description="flip image, linear_y and left/right together")
    brightness: float = Field(0.25, ge=0.0, lt=1.0, description="brightness factor drawn within 1 ± this")
    contrast: float = Field(0.2, ge=0.0, lt=1.0, description="contrast factor drawn within 1 ± this")
    saturation: float = Field(0.2, ge=0.0, lt=1.0, description="saturation factor drawn within 1 ± this")
    hue: float = Field(0.02, ge=0.0, le=0.5, description="hue shifted by up to this fraction of the colour circle")
    # Off by default: the crop moves the target in the frame, and where it stands is what the strafes follow.
    crop_scale: float = Field(1.0, gt=0.0, le=1.0, description=(
        "random resized crop: the smallest fraction of the frame's area kept, enlarged back (1: no crop)"))
    blur_prob: float = Field(0.2, ge=0.0, le=1.0, description="chance of a Gaussian blur, sigma 0.1–1.5 px")
    paraphrase_prob: float = Field(0.5, ge=0.0, le=1.0, description=(
        "chance the instruction is reworded with a template of data.instructions.TRAINING_PARAPHRASES"))
    # With few validation episodes their loss is noisy, while a cosine schedule ends on a settled model.
    keep: Literal["best", "last"] = Field("best", description="the policy of the best validation loss, or the last epoch's")

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as error:
            raise ValueError(f"training config: {config_error(error)}") from None

    @classmethod
    def cpu(cls, **overrides: Any) -> TrainConfig:
        """Training for `PolicyConfig.cpu()` on a CPU (benchmarks/learning.py): a high lr for a
        small model whose text side trains from scratch, 60 warm-up steps, the last epoch's policy kept, and the
        mirror as its only augmentation: the others buy robustness but take the demo's training
        from 329 s to 520 s, past its budget (docs/performance.md, "What augmentation buys")."""
        return cls(**{**dict(epochs=20, batch_size=8, grad_accum=1, lr=2e-3, warmup_steps=60, keep="last",
                             **MIRROR_ONLY), **overrides})

    def replace(self, **changes: Any) -> TrainConfig:
        return type(self)(**{**self.model_dump(), **changes})


def describe_setup(policy: PolicyConfig, train: TrainConfig) -> str:
    """What trains and how, in one line for the run log and MLflow."""
    if policy.lora_enable:
        what = f"LoRA r{policy.lora_r} ({policy.lora_targets}) on a frozen backbone"
    elif policy.freeze_backbone:
        what = "frozen backbone"
    else:
        what = "the whole backbone" if policy.train_vision else "the backbone but its vision tower"
        what += ", from its grounding-pretrained weights" if policy.preset == "grounded" else ", from its initial weights"
    head = f"{policy.action_head} head" + (f" ({policy.action_decode})" if policy.action_head != "regression" else "")
    extras = f", side probe ×{policy.side_loss_weight}" if policy.side_loss_weight else ""
    return (f"{what}; {head}{extras}; window {policy.window}, chunk {policy.chunk}; {train.epochs} epochs, "
            f"batch {train.batch_size} × {train.grad_accum}, lr {train.lr:g}, warm-up {train.warmup_steps} steps"
            + (" (the CPU preset's own setup, not the full-size default)" if policy.preset in ("small", "grounded") else ""))
