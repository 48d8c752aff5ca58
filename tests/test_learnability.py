"""The pipeline can learn what its data shows: a check of the whole training path that does not
depend on model capacity.

Synthetic episodes whose frames carry an unmistakable cue of the action recorded at that frame:
a bright horizontal band whose height encodes the key — top: forward, second: strafe, third:
back, bottom: stop. The strafe band is the same for left and right (a horizontal band also
looks the same mirrored), so the side must come from the instruction: "left" episodes strafe
left, "right" episodes strafe right. The CPU preset, trained through the real `train()` with
its defaults (its 20 epochs: after 6 or 10, one training seed in three had not yet learned "back",
15% of the frames, and scored 0.844), must then score through the real `evaluate()` on held-out cue
episodes: first-step direction accuracy ≥ 0.95 and instruction flip ≥ 0.90.

Shifting the targets by a frame, breaking mirror augmentation (image, action and text must
flip together) or cutting the instruction off the action token makes it fail.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import write_episode_file
from vla_pipeline.data.episodes import ValidationRules
from vla_pipeline.data.ingest import ingest_episodes
from vla_pipeline.data.schema import ACTION_SCALE
from vla_pipeline.evaluation.evaluate import evaluate
from vla_pipeline.policy.model import load_policy_dir
from vla_pipeline.policy.policy_config import ACTION_STATS_FILE, PolicyConfig
from vla_pipeline.training.train import train
from vla_pipeline.training.train_config import TrainConfig

FRAMES, HEIGHT, WIDTH = 18, 96, 128
BANDS = {"forward": 0, "strafe": 1, "back": 2, "stop": 3}  # band index from the top, of 4
KEYS = list(BANDS)
TRAIN_EPISODES, HELD_OUT_EPISODES = 24, 8


def cue_episode(path: Path, side: str, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    keys = ["stop"] + [KEYS[i] for i in rng.choice(4, FRAMES - 1, p=[0.4, 0.3, 0.15, 0.15])]
    images = np.full((FRAMES, HEIGHT, WIDTH, 3), 30, np.uint8)
    images += rng.integers(0, 20, images.shape, dtype=np.uint8)  # a little sensor noise
    actions = np.zeros((FRAMES, 3), np.float32)
    band = HEIGHT // 4
    for t, key in enumerate(keys):
        images[t, BANDS[key] * band : (BANDS[key] + 1) * band] = 230
        actions[t, :2] = {"forward": (ACTION_SCALE, 0.0), "back": (-ACTION_SCALE, 0.0), "stop": (0.0, 0.0),
                          "strafe": (0.0, ACTION_SCALE if side == "left" else -ACTION_SCALE)}[key]
    return write_episode_file(path, images=images, actions=actions)


def cue_store(folder: Path, count: int, first_seed: int, rules: ValidationRules) -> tuple[Path, list[str]]:
    paths = [cue_episode(folder / f"episode_20250614_{first_seed + i:06d}_1box_hori_{side}_core_medium.h5",
                         side, first_seed + i)
             for i in range(count) for side in [("left", "right")[i % 2]]]
    store = folder.parent / f"{folder.name}.zarr"
    ingest_episodes(paths, store, rules)
    return store, sorted(p.stem for p in paths)




@pytest.fixture(scope="module")
def learned(tmp_path_factory):
    root = tmp_path_factory.mktemp("learnability")
    policy_config = PolicyConfig.cpu()
    rules = ValidationRules(window=policy_config.window, chunk=policy_config.chunk)
    train_store, train_ids = cue_store(root / "train", TRAIN_EPISODES, 0, rules)
    held_store, held_ids = cue_store(root / "held", HELD_OUT_EPISODES, 1000, rules)
    train_config = TrainConfig.cpu()
    result = train(policy_config, train_config, train_store, train_ids, [], root / "run", log=lambda line: None)
    policy = load_policy_dir(result.output_dir / "policy")
    mean = json.loads((result.output_dir / "policy" / ACTION_STATS_FILE).read_text())["mean"]
    return result, evaluate(policy, held_store, held_ids, mean).metrics


def test_cues_are_learned_on_held_out_episodes(learned):
    _, metrics = learned
    accuracy = metrics["model"]["first"]["direction_accuracy"]
    best_constant = max(b["first"]["direction_accuracy"] for b in metrics["baselines"].values())
    assert accuracy >= 0.95, f"first-step direction accuracy {accuracy:.3f} (best constant {best_constant:.3f})"


def test_the_side_comes_from_the_instruction(learned):
    _, metrics = learned
    flip = metrics["instruction_sensitivity"]["flip_fraction_first"]
    assert flip >= 0.90, f"instruction flip {flip:.3f}"
