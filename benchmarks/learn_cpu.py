"""Does a small Kosmos-2 policy learn on this CPU? One training run, scored on the validation
episodes and on a store of another seed's episodes, printed as one JSON row.

    python benchmarks/learn_cpu.py --store S0.zarr --other S1234.zarr --out DIR \
        --vision 64x2 --patch 16 --image-size 112 --text 64x2 --latent 8 \
        --window 3 --chunk 1 --head classification --epochs 20 --lr 1e-3 --batch 8

Both stores need a saved split (`save_split`); the other store is scored on all its episodes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from vla_pipeline.data.store import WindowStore
from vla_pipeline.evaluation.evaluate import evaluate
from vla_pipeline.evaluation.metrics import direction_classes
from vla_pipeline.policy.model import _tiny_tokenizer, load_policy_dir
from vla_pipeline.policy.policy_config import PolicyConfig
from vla_pipeline.policy.preprocess import CLIP_MEAN, CLIP_STD
from vla_pipeline.training.split import load_split
from vla_pipeline.training.train import TrainConfig, train


def dims(text: str) -> tuple[int, int]:
    width, layers = text.lower().split("x")
    return int(width), int(layers)


def save_backbone(directory: Path, vision: str, text: str, patch: int, image_size: int, latent: int,
                  seed: int = 0, init_std: float = 0.1, latent_scale: float = 1.0, dense_std: float | None = None,
                  text_heads: int | None = None) -> Path:
    from transformers import CLIPImageProcessorPil, Kosmos2Config, Kosmos2Model, Kosmos2Processor

    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224},
                                            image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
    processor = Kosmos2Processor(image_processor, _tiny_tokenizer())
    (vw, vl), (tw, tl) = dims(vision), dims(text)
    config = Kosmos2Config(
        text_config=dict(vocab_size=len(processor.tokenizer), max_position_embeddings=256, embed_dim=tw, layers=tl,
                         ffn_dim=2 * tw, attention_heads=text_heads or max(2, tw // 32), init_std=init_std),
        vision_config=dict(hidden_size=vw, intermediate_size=2 * vw, num_hidden_layers=vl,
                           num_attention_heads=max(2, vw // 32), image_size=image_size, patch_size=patch),
        latent_query_num=latent,
    )
    torch.manual_seed(seed)
    model = Kosmos2Model(config)
    with torch.no_grad():  # Kosmos2Model's init drowns the image in the latent queries (see the report)
        model.image_to_text_projection.latent_query.mul_(latent_scale)
        if dense_std is not None:
            model.image_to_text_projection.dense.weight.normal_(0.0, dense_std)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def summarise(result: dict) -> dict:
    first = result["model"]["first"]
    base = {name: b["first"]["direction_accuracy"] for name, b in result["baselines"].items()}
    sens = result["instruction_sensitivity"]
    return {"acc": round(first["direction_accuracy"], 3), "best_const": round(max(base.values()), 3),
            "flip": round(sens.get("flip_fraction_first", float("nan")), 3), "n": result["predictions"],
            "recall": {k: (round(v, 2) if v is not None else None) for k, v in first["recall"].items()
                       if first["support"][k]}}


def argmax_accuracy(evaluation, scale: float) -> float:
    """First-step direction accuracy if every action were snapped to -1, 0, +1 × scale."""
    pred = np.concatenate([e.pred[:, :1] for e in evaluation.episodes])
    true = np.concatenate([e.true[:, :1] for e in evaluation.episodes])
    snapped = np.round(pred / scale).clip(-1, 1) * scale
    return float((direction_classes(snapped, scale) == direction_classes(true, scale)).mean())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--store", required=True)
    parser.add_argument("--other", default=None)
    parser.add_argument("--out", required=True)
    parser.add_argument("--vision", default="64x2")
    parser.add_argument("--text", default="64x2")
    parser.add_argument("--patch", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--latent", type=int, default=8)
    parser.add_argument("--backbone-seed", type=int, default=0)
    parser.add_argument("--init-std", type=float, default=0.1)
    parser.add_argument("--text-heads", type=int, default=None)
    parser.add_argument("--side-loss", type=float, default=0.0)
    parser.add_argument("--latent-scale", type=float, default=1.0)
    parser.add_argument("--dense-std", type=float, default=None)
    parser.add_argument("--window", type=int, default=3)
    parser.add_argument("--chunk", type=int, default=1)
    parser.add_argument("--head", default="regression")
    parser.add_argument("--lstm", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--accum", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--wd", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jitter", type=float, default=0.1)
    parser.add_argument("--mirror", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    backbone = save_backbone(out / "backbone", args.vision, args.text, args.patch, args.image_size, args.latent,
                             args.backbone_seed, args.init_std, args.latent_scale, args.dense_std, args.text_heads)
    policy_config = PolicyConfig.tiny(
        backbone=str(backbone), window=args.window, chunk=args.chunk, lstm_hidden=args.lstm, action_head=args.head, side_loss_weight=args.side_loss,
        lora_enable=False, train_vision=True, train_text_embedding=True, seed=args.seed)
    train_config = TrainConfig(epochs=args.epochs, batch_size=args.batch, grad_accum=args.accum, lr=args.lr,
                               warmup_steps=args.warmup, weight_decay=args.wd, seed=args.seed,
                               log_every=10**6, checkpoint_every=10**6, colour_jitter=args.jitter,
                               mirror_prob=args.mirror)
    split = load_split(WindowStore(args.store))
    started = time.perf_counter()

    def log(line: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f}s] {line}", file=sys.stderr, flush=True)

    result = train(policy_config, train_config, args.store, split.train, split.val, out / "run", log=log)
    train_seconds = time.perf_counter() - started
    policy = load_policy_dir(out / "run" / "policy")
    stats = json.loads((out / "run" / "policy" / "action_stats.json").read_text())
    row = {"tag": args.tag, **{k: v for k, v in vars(args).items() if k not in ("store", "other", "out", "tag")},
           "params": result.parameters["trainable"], "train_s": round(train_seconds, 1),
           "best_epoch": min(result.history, key=lambda r: r["val_loss"])["epoch"],
           "losses": [(round(r["train_loss"], 3), round(r["val_loss"], 3)) for r in result.history]}
    started = time.perf_counter()
    val = evaluate(policy, args.store, split.val, stats["mean"])
    row["eval_s"] = round(time.perf_counter() - started, 1)
    row["val"] = summarise(val.metrics)
    row["val"]["acc_snapped"] = round(argmax_accuracy(val, policy.config.action_scale), 3)
    if args.other:
        other = WindowStore(args.other)
        scored = evaluate(policy, args.other, other.episode_ids(), stats["mean"])
        row["other"] = summarise(scored.metrics)
        row["other"]["acc_snapped"] = round(argmax_accuracy(scored, policy.config.action_scale), 3)
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
