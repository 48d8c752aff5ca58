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

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..data.schema import ACTION_DIMS, ACTION_SCALE

DEFAULT_BACKBONE = "microsoft/kosmos-2-patch14-224"
PRESETS = ("full", "tiny", "small")
LORA_TARGETS = ("text", "text+vision", "all-linear")
ACTION_HEADS = ("regression", "classification")
ACTION_DECODES = ("expected", "argmax")
CONFIG_VERSION = 1

# The policy directory: what training writes and serving reads.
CONFIG_FILE = "policy_config.json"  # this PolicyConfig
WEIGHTS_FILE = "policy.safetensors"  # action token, head and any fully trained backbone part
ADAPTER_DIR = "adapter"  # the LoRA adapter (peft)
ACTION_STATS_FILE = "action_stats.json"  # the training set's action statistics


@dataclass(frozen=True)
class PolicyConfig:
    """A Kosmos-2 policy with an LSTM policy head (RoboVLMs "policy-head history").

    `backbone` is a hub id or a local directory loaded with `from_pretrained`. With
    preset "tiny" or "small" it must be a directory written by `save_local_backbone`, or
    anything else (e.g. the default hub id), in which case the preset's deterministic backbone
    is built into a cache directory first and loaded from there.
    """

    backbone: str = DEFAULT_BACKBONE
    preset: str = "full"
    window: int = 8
    chunk: int = 10
    action_dim: int = len(ACTION_DIMS)
    action_scale: float = ACTION_SCALE
    lstm_hidden: int = 512
    lstm_layers: int = 4
    huber_delta: float = 1.0
    # "regression": tanh outputs, Huber loss; "classification": per chunk step and axis 3 logits
    # for -1, 0, +1 (× action_scale), cross-entropy loss, the expected value as the action
    action_head: str = "regression"
    # > 0: a linear probe must read the instruction's side (left/right) from every frame's
    # feature during training; its BCE loss, times this weight, joins the action loss
    side_loss_weight: float = 0.0
    # classification head only: the action is the softmax's "expected" value, or the "argmax"
    # class (exactly 0 or ±action_scale, like the teleop keys)
    action_decode: str = "expected"
    # training setup (RoboVLMs names)
    freeze_backbone: bool = False
    lora_enable: bool = True
    lora_r: int = 32
    lora_alpha: int = 16
    lora_dropout: float = 0.1
    lora_targets: str = "all-linear"
    train_vision: bool = False
    train_text_embedding: bool = False
    train_decoder_layers: int = -1
    # recompute each layer's activations in the backward pass: full size at batch 2 × 4 peaks at
    # 7.9 GiB instead of 14.7 (H200, benchmarks/gpu.py); the small presets have no need of it
    gradient_checkpointing: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {PRESETS}, not {self.preset!r}")
        if self.action_head not in ACTION_HEADS:
            raise ValueError(f"action_head must be one of {ACTION_HEADS}, not {self.action_head!r}")
        if self.action_decode not in ACTION_DECODES:
            raise ValueError(f"action_decode must be one of {ACTION_DECODES}, not {self.action_decode!r}")
        if self.lora_targets not in LORA_TARGETS:
            raise ValueError(f"lora_targets must be one of {LORA_TARGETS}, not {self.lora_targets!r}")
        for name in ("window", "chunk", "action_dim", "lstm_hidden", "lora_r"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, not {getattr(self, name)!r}")
        if not 1 <= self.lstm_layers <= 4:
            raise ValueError(f"lstm_layers must be 1..4, not {self.lstm_layers!r}")
        if self.train_decoder_layers < -1:
            raise ValueError(f"train_decoder_layers must be >= -1, not {self.train_decoder_layers!r}")
        if not self.action_scale > 0:
            raise ValueError(f"action_scale must be > 0, not {self.action_scale!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), not {self.lora_dropout!r}")
        if not self.side_loss_weight >= 0:
            raise ValueError(f"side_loss_weight must be >= 0, not {self.side_loss_weight!r}")
        if not self.huber_delta > 0:
            raise ValueError(f"huber_delta must be > 0, not {self.huber_delta!r}")

    @classmethod
    def tiny(cls, **overrides: Any) -> PolicyConfig:
        """The small test/CI policy: tiny backbone, short window and chunk, small head."""
        values: dict[str, Any] = dict(
            preset="tiny", backbone="tiny", window=3, chunk=2, lstm_hidden=32, lstm_layers=1, lora_r=4,
            lora_alpha=8, lora_dropout=0.0, gradient_checkpointing=False,
        )
        values.update(overrides)
        return cls(**values)

    @classmethod
    def small(cls, **overrides: Any) -> PolicyConfig:
        """The CPU preset (`VLA_MODEL=tiny` or `small`): a small random Kosmos-2 trained in full —
        LoRA on random weights learns nothing — with a classification head, the side probe and
        the most likely class as the action; learns the task in about two minutes on 2 cores with
        `TrainConfig.small()` (benchmarks/learning.py measures it)."""
        values: dict[str, Any] = dict(
            preset="small", backbone="small", window=8, chunk=1, lstm_hidden=64, lstm_layers=1,
            action_head="classification", side_loss_weight=0.5, action_decode="argmax", lora_enable=False,
            train_vision=True, train_text_embedding=True, gradient_checkpointing=False,
        )
        values.update(overrides)
        return cls(**values)

    def replace(self, **changes: Any) -> PolicyConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {"config_version": CONFIG_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PolicyConfig:
        data = dict(data)
        version = data.pop("config_version", CONFIG_VERSION)
        if version != CONFIG_VERSION:
            raise ValueError(f"policy config version {version} is not supported (expected {CONFIG_VERSION})")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown policy config keys: {', '.join(unknown)}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> PolicyConfig:
        return cls.from_dict(json.loads(text))


def read_policy_config(directory) -> PolicyConfig:
    return PolicyConfig.from_dict(json.loads((Path(directory) / CONFIG_FILE).read_text()))
