"""The scripted-replay baseline on hand-made episodes, alone and inside the evaluation."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import scripted_actions, write_episode_file

from vla_pipeline.data.ingest import ingest_episodes
from vla_pipeline.data.store import WindowStore
from vla_pipeline.evaluation.evaluate import evaluate
from vla_pipeline.evaluation.gate import decide_promotion
from vla_pipeline.evaluation.replay import ScriptedReplay
from vla_pipeline.policy.model import build_policy
from vla_pipeline.policy.policy_config import PolicyConfig

W, A, D, S = (np.array(a, np.float32) for a in ((1.15, 0.0), (0.0, 1.15), (0.0, -1.15), (0.0, 0.0)))


def keys(*actions) -> np.ndarray:
    return np.array(actions, np.float32)


@pytest.fixture
def replay() -> ScriptedReplay:
    return ScriptedReplay.from_episodes([
        ("left", "close", keys(S, W, A, A, W)),
        ("left", "close", keys(S, W, A, W)),
        ("left", "close", keys(S, A, A, W, W, W)),
        ("left", "far", keys(S, W, W, W, W, A, A, W)),
        ("right", "close", keys(S, W, D, D, W)),
    ])


def test_most_common_action_per_frame_index_of_the_same_course(replay):
    # frame 1: W twice, A once; frame 2: A three times; frame 3: A, W, W; frame 4: W, W; frame 5: only the long one
    expected = keys(S, W, A, W, W, W)
    np.testing.assert_array_equal([replay.action("left", "close", t) for t in range(6)], expected)
    np.testing.assert_array_equal(replay.action("right", "close", 2), D)


def test_falls_back_to_the_side_then_to_everything_then_to_stop(replay):
    # left/close has no frame 6: the only left episode that long is left/far, an A there
    np.testing.assert_array_equal(replay.action("left", "close", 6), A)
    np.testing.assert_array_equal(replay.action("left", None, 2), A)  # distance unknown: the side's mode
    np.testing.assert_array_equal(replay.action("right", "medium", 2), D)  # no right/medium episode: the side
    np.testing.assert_array_equal(replay.action(None, None, 7), W)  # unknown course: every episode
    np.testing.assert_array_equal(replay.action("left", "far", 8), S)  # past every recording: no motion


def test_predicts_chunks_like_the_evaluation_targets(replay):
    chunks = replay.predict("left", "close", frames=range(4), chunk=2)
    assert chunks.shape == (4, 2, 2)
    np.testing.assert_array_equal(chunks[:, 0], keys(S, W, A, W))
    np.testing.assert_array_equal(chunks[:, 1], keys(W, A, W, W))


def test_evaluation_scores_the_replay_of_the_training_episodes(tmp_path, tiny_backbone_path):
    paths = []
    for i, (side, distance) in enumerate([("left", "close"), ("left", "close"), ("right", "close"), ("right", "close")]):
        name = f"episode_20250614_10150{i}_1box_hori_{side}_core_{distance}.h5"
        paths.append(write_episode_file(tmp_path / "episodes" / name, actions=scripted_actions(side), seed=i))
    ingest_episodes(paths, tmp_path / "store.zarr")
    ids = sorted(p.stem for p in paths)
    train, val = [ids[0], ids[2]], [ids[1], ids[3]]  # each val episode replays a training one exactly
    policy = build_policy(PolicyConfig.tiny(backbone=str(tiny_backbone_path)))
    replay = ScriptedReplay.from_store(WindowStore(tmp_path / "store.zarr"), train)
    result = evaluate(policy, tmp_path / "store.zarr", val, train_mean=(0.5, 0.0), replay=replay).metrics
    assert result["scripted_replay"]["first"]["direction_accuracy"] == 1.0
    assert result["scripted_replay"]["all"]["mse"] == 0.0
    assert "scripted_replay" not in result["baselines"]  # the gate's best constant stays a constant
    assert result["margin_over_replay"]["first"] == pytest.approx(result["model"]["first"]["direction_accuracy"] - 1.0)
    assert evaluate(policy, tmp_path / "store.zarr", val, train_mean=(0.5, 0.0)).metrics["scripted_replay"] is None


def test_gate_can_require_beating_the_replay():
    assert decide_promotion(0.85, "always_forward", 0.70, 0.05).promoted
    held = decide_promotion(0.85, "always_forward", 0.70, 0.05, replay_accuracy=0.90)
    assert not held.promoted and "scripted replay 0.900: not beaten" in held.reason
    assert decide_promotion(0.92, "always_forward", 0.70, 0.05, replay_accuracy=0.90).promoted
