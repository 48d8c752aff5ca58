"""Everything that defines a policy (backbone, head, what trains), in one JSON-safe record.

Training-setup names follow RoboVLMs. Which backbone parameters train is decided by these
rules, applied in this order (`vla_pipeline.policy.model.apply_trainability` implements them):

1. base weights: all trainable unless `freeze_backbone` or `lora_enable` (then all frozen);
2. the vision tower (`vision_model`): trainable iff `train_vision` — in full, base weights
   included, also when LoRA is on (unlike RoboVLMs);
3. the word embeddings (`text_model.model.embed_tokens`): trainable iff `train_text_embedding`;
4. the last `train_decoder_layers` text decoder layers (`text_model.model.layers[-N:]`):
   trainable in full (-1 or 0: none);
5. LoRA matrices (when `lora_enable`) on the Linear layers of `lora_targets`:
   "text" (text decoder layers), "text+vision" (+ vision encoder layers), "all-linear"
   (every Linear of the backbone, the image-to-text projection included; Kosmos2Model has
   no lm_head) — always trainable.

The learnable action token and the LSTM head always train.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..data.schema import ACTION_DIMS, ACTION_SCALE

DEFAULT_BACKBONE = "microsoft/kosmos-2-patch14-224"
# "full": Kosmos-2 as given; "small": the CPU preset's small Kosmos-2 built in-process ("grounded": the
# same, its image path pretrained on rendered rooms, `grounding.py`); "tiny": the
# test-size one. The CPU preset is the small backbone plus its own training setup (`cpu()`).
Preset = Literal["full", "tiny", "small", "grounded"]
CONFIG_VERSION = 1

# The policy directory: what training writes and serving reads.
CONFIG_FILE = "policy_config.json"  # this PolicyConfig
WEIGHTS_FILE = "policy.safetensors"  # action token, head, any fully trained backbone part (grounded: all of it)
ADAPTER_DIR = "adapter"  # the LoRA adapter (peft)
ACTION_STATS_FILE = "action_stats.json"  # the training set's action statistics


def config_error(error: ValidationError, prefix: str = "") -> str:
    """A pydantic error in one line, field by field: `lora_r: Input should be greater than or equal to 1`."""
    def message(item: dict) -> str:
        return "unknown setting (no such field)" if item["type"] == "extra_forbidden" else item["msg"]

    return "; ".join(f"{prefix}{'.'.join(map(str, item['loc']))}: {message(item)}" for item in error.errors())


class PolicyConfig(BaseModel):
    """A Kosmos-2 policy with an LSTM policy head (RoboVLMs "policy-head history").

    `backbone` is a hub id or a local directory loaded with `from_pretrained`. With
    preset "tiny", "small" or "grounded" it must be a directory written by `save_local_backbone`, or
    anything else (e.g. the default hub id), in which case the preset's deterministic backbone
    is built into a cache directory first and loaded from there. A bad value raises a
    ValueError naming the field and what it accepts.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    backbone: str = Field(DEFAULT_BACKBONE, description="hub id or save_pretrained folder")
    preset: Preset = Field("full", description=(
        "full: Kosmos-2 as given; tiny / small: built in-process; grounded: small, its image path "
        "pretrained on rendered rooms"))
    window: int = Field(8, ge=1, description="frames the head sees")
    chunk: int = Field(10, ge=1, description="actions predicted per frame")
    action_dim: int = Field(len(ACTION_DIMS), ge=1, description="actions per step: (linear_x, linear_y)")
    action_scale: float = Field(ACTION_SCALE, gt=0, description="robot units of a full key press")
    lstm_hidden: int = Field(512, ge=1, description="the head's LSTM width")
    lstm_layers: int = Field(4, ge=1, le=4, description="the head's LSTM layers")
    huber_delta: float = Field(1.0, gt=0, description="the regression head's Huber (smooth L1) threshold")
    action_head: Literal["regression", "classification", "joint"] = Field("regression", description=(
        "regression: tanh outputs, Huber loss; classification: 3 logits per chunk step and axis for "
        "-1, 0, +1 (× action_scale), cross-entropy, the expected value as the action; joint: one logit "
        "per chunk step for each combination of -1, 0, +1 on every axis (9 for 2 axes), cross-entropy"))
    side_loss_weight: float = Field(0.0, ge=0, description=(
        "> 0: a linear probe must read the instruction's side from every frame's feature; its BCE "
        "loss, times this weight, joins the action loss"))
    stop_loss_weight: float = Field(1.0, ge=0, description=(
        "the loss weight of a chunk step whose recorded action is a stop (zero on both axes) against "
        "1 for a move: an episode ends with one stop among ~18 moves, so a policy can score a low loss "
        "and never stop"))
    action_decode: Literal["expected", "argmax"] = Field("expected", description=(
        "classification head: the softmax's expected value, or the most likely class (0 or ±scale)"))
    # training setup (RoboVLMs names)
    freeze_backbone: bool = Field(False, description="no backbone weight trains (unless a rule below trains it)")
    lora_enable: bool = Field(True, description="LoRA matrices on a frozen backbone")
    lora_r: int = Field(32, ge=1, description="LoRA rank")
    lora_alpha: int = Field(16, ge=1, description="LoRA scaling numerator (alpha / r)")
    lora_dropout: float = Field(0.1, ge=0.0, lt=1.0, description="dropout on the LoRA input")
    lora_targets: Literal["text", "text+vision", "all-linear"] = Field(
        "all-linear", description="which Linear layers get LoRA (all-linear: every one, the projection too)")
    train_vision: bool = Field(False, description="the vision tower trains in full")
    train_text_embedding: bool = Field(False, description="the word embeddings train")
    train_decoder_layers: int = Field(-1, ge=-1, description="the last N text decoder layers trained in full")
    # recompute each layer's activations in the backward pass: full size at batch 2 × 4 peaks at
    # 7.9 GiB instead of 14.7 (H200, benchmarks/gpu.py); the small presets have no need of it
    gradient_checkpointing: bool = Field(True, description="recompute activations in the backward pass")
    seed: int = Field(0, description="initialisation of the action token and head")

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as error:  # one line naming the field, not pydantic's block
            raise ValueError(f"policy config: {config_error(error)}") from None

    @classmethod
    def tiny(cls, **overrides: Any) -> PolicyConfig:
        """The small test/CI policy: tiny backbone, short window and chunk, small head."""
        values: dict[str, Any] = dict(
            preset="tiny", backbone="tiny", window=3, chunk=2, lstm_hidden=32, lstm_layers=1, lora_r=4,
            lora_alpha=8, lora_dropout=0.0, gradient_checkpointing=False,
        )
        return cls(**{**values, **overrides})

    @classmethod
    def cpu(cls, **overrides: Any) -> PolicyConfig:
        """The CPU preset (`VLA_MODEL=cpu`): the grounded small Kosmos-2 (its image path pretrained
        on rendered rooms; its vision tower kept so) with the rest trained in full — LoRA on random weights
        learns nothing — with a classification head, the side probe and the most likely class as
        the action, and the episode's closing stop weighted ×6 (one step among ~20: unweighted, the
        policy never stops); learns the task in a few minutes on 2 cores with `TrainConfig.cpu()`
        (benchmarks/learning.py measures it). `preset="small", train_vision=True`: the same model
        from a random backbone, its vision tower trained too."""
        values: dict[str, Any] = dict(
            preset="grounded", backbone="grounded", window=8, chunk=1, lstm_hidden=64, lstm_layers=1,
            action_head="classification", side_loss_weight=0.5, action_decode="argmax", lora_enable=False,
            stop_loss_weight=6.0,
            train_vision=False, train_text_embedding=True, gradient_checkpointing=False,
        )
        return cls(**{**values, **overrides})

    def replace(self, **changes: Any) -> PolicyConfig:
        """A copy with `changes`, validated like a new config."""
        return type(self)(**{**self.model_dump(), **changes})

    def to_dict(self) -> dict[str, Any]:
        return {"config_version": CONFIG_VERSION, **self.model_dump()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PolicyConfig:
        data = dict(data)
        version = data.pop("config_version", CONFIG_VERSION)
        if version != CONFIG_VERSION:
            raise ValueError(f"policy config version {version} is not supported (expected {CONFIG_VERSION})")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def read_policy_config(directory) -> PolicyConfig:
    return PolicyConfig.from_dict(json.loads((Path(directory) / CONFIG_FILE).read_text()))
