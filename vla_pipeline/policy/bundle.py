"""The deploy bundle: one self-contained folder the robot loads with torch and transformers alone.

    bundle/
      config.json, model.safetensors   the Kosmos-2 backbone, LoRA adapter merged in
      tokenizer.json, processor/…      its tokenizer and processor (save_pretrained)
      policy.safetensors               the action token and the head
      policy_config.json               the PolicyConfig, LoRA off, backbone: this folder
      bundle.json                      what it was exported from, and the weights' dtype

The adapter is merged in float32 and the result cast to the bundle's dtype afterwards:
merging into bf16 weights directly is off by about 2%. `serving.load_bundle` loads it.
"""

from __future__ import annotations

import json
import shutil
from datetime import datetime, timezone
from pathlib import Path

import torch

from ..data.atomic import replace_directory
from .backbone import load_processor
from .model import load_policy_dir, save_policy
from .policy_config import CONFIG_FILE, read_policy_config

BUNDLE_FILE = "bundle.json"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def export_bundle(policy_dir: Path | str, out_dir: Path | str, dtype: str = "fp16", source: str | None = None) -> Path:
    """Write the bundle of the policy in `policy_dir` (a lora_adapter output) into `out_dir`."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    policy_dir, out_dir = Path(policy_dir), Path(out_dir)
    trained = read_policy_config(policy_dir)
    policy = load_policy_dir(policy_dir)  # float32: the merge happens at full precision
    kosmos = policy.backbone.merge_and_unload() if trained.lora_enable else policy.backbone
    kosmos.requires_grad_(False)
    staging = out_dir.parent / f".{out_dir.name}.exporting"
    shutil.rmtree(staging, ignore_errors=True)
    kosmos.to(DTYPES[dtype]).save_pretrained(staging)
    load_processor(policy.config).save_pretrained(staging)  # the backbone it was loaded from
    # What trained in the backbone is now part of it: the bundle's policy trains nothing there.
    deployed = trained.replace(lora_enable=False, freeze_backbone=True, train_vision=False, train_text_embedding=False,
                               train_decoder_layers=-1, gradient_checkpointing=False, backbone=".")
    policy.config, policy.backbone = deployed, kosmos
    save_policy(policy, staging)
    (staging / CONFIG_FILE).write_text(deployed.to_json() + "\n")
    (staging / BUNDLE_FILE).write_text(json.dumps({
        "dtype": dtype, "exported_from": str(source or policy_dir), "trained_backbone": trained.backbone,
        "merged_lora": trained.lora_enable, "exported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }, indent=1) + "\n")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    replace_directory(staging, out_dir)
    return out_dir


def bundle_dtype(bundle_dir: Path | str) -> torch.dtype:
    info = Path(bundle_dir) / BUNDLE_FILE
    if not info.is_file():
        raise FileNotFoundError(f"{bundle_dir}: not a deploy bundle (no {BUNDLE_FILE}); "
                                "write one with `vla-pipeline export MODEL_URI OUT_DIR`")
    return DTYPES[json.loads(info.read_text())["dtype"]]
