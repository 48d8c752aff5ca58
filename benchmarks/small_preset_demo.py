"""The CPU preset end to end, as the demo runs it: sample episodes -> ingest (the preset's
window/chunk rules) -> split -> train (PolicyConfig.small(), TrainConfig.small()) -> scored on
the validation episodes and on episodes of another seed, with the head's "expected" and
"argmax" decodes. Prints one JSON row per training seed.

    python benchmarks/small_preset_demo.py WORKDIR --seeds 0 1 2 [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from vla_pipeline.data.episodes import ValidationRules
from vla_pipeline.data.ingest import ingest_episodes
from vla_pipeline.data.samples import write_sample_episodes
from vla_pipeline.data.store import WindowStore
from vla_pipeline.evaluation.evaluate import evaluate
from vla_pipeline.policy.model import load_policy_dir
from vla_pipeline.policy.policy_config import PolicyConfig
from vla_pipeline.training.split import load_split, save_split, split_from_store
from vla_pipeline.training.train import TrainConfig, train


def store_of(folder: Path, n: int, seed: int, rules: ValidationRules) -> tuple[Path, float]:
    store = folder / f"store_{seed}.zarr"
    started = time.perf_counter()
    if not store.exists():
        paths = write_sample_episodes(folder / f"episodes_{seed}", n, seed=seed)
        ingest_episodes(paths, store, rules=rules, workers=2)
        save_split(WindowStore(store), split_from_store(WindowStore(store)))
    return store, time.perf_counter() - started


def scores(result: dict, lateral_flip: float) -> dict:
    first = result["model"]["first"]
    best = max(b["first"]["direction_accuracy"] for b in result["baselines"].values())
    return {"acc": round(first["direction_accuracy"], 3), "best_const": round(best, 3),
            "flip": round(result["instruction_sensitivity"]["flip_fraction_first"], 3),
            "flip_when_lateral": round(lateral_flip, 3), "n": result["predictions"]}


def score(policy, store: Path, ids, mean) -> dict:
    evaluation = evaluate(policy, store, ids, mean)
    a = np.concatenate([e.pred[:, 0, 1] for e in evaluation.episodes if e.pred_swapped is not None])
    b = np.concatenate([e.pred_swapped[:, 0, 1] for e in evaluation.episodes if e.pred_swapped is not None])
    scale = policy.config.action_scale
    lateral = (np.abs(a) > 0.3 * scale) | (np.abs(b) > 0.3 * scale)  # the metrics' dead band
    return scores(evaluation.metrics, float((a * b < 0)[lateral].mean()) if lateral.any() else float("nan"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--episodes", type=int, default=40)
    parser.add_argument("--other-seed", type=int, default=1234)
    parser.add_argument("--other-episodes", type=int, default=12)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base = PolicyConfig.small()
    rules = ValidationRules(window=base.window, chunk=base.chunk)
    args.workdir.mkdir(parents=True, exist_ok=True)
    store, prepare_s = store_of(args.workdir, args.episodes, 0, rules)
    other, _ = store_of(args.workdir, args.other_episodes, args.other_seed, rules)
    split = load_split(WindowStore(store))
    for seed in args.seeds:
        out = args.workdir / f"run_{seed}"
        started = time.perf_counter()
        result = train(base.replace(seed=seed), TrainConfig.small(seed=seed), store, split.train, split.val, out,
                       log=lambda line: None)
        train_s = time.perf_counter() - started
        stats = json.loads((out / "policy" / "action_stats.json").read_text())
        row = {"seed": seed, "params": result.parameters["trainable"], "prepare_s": round(prepare_s, 1),
               "train_s": round(train_s, 1), "train": len(split.train), "val": len(split.val)}
        for decode in ("expected", "argmax"):
            policy = load_policy_dir(out / "policy")
            policy.head.decode_mode = decode
            started = time.perf_counter()
            row[decode] = {"val": score(policy, store, split.val, stats["mean"]),
                           "other": score(policy, other, WindowStore(other).episode_ids(), stats["mean"])}
            row[decode]["eval_s"] = round(time.perf_counter() - started, 1)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
