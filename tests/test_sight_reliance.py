"""Sight ablations: the offline evaluation shown the episode's first frame alone, and another
validation episode's frames, scored on the same targets. Stand-in policies whose every answer is
worked out by hand: one that reads its action off the frame, one that drives on the instruction."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import scripted_actions, write_episode_file
from test_serving import set_constant_output

from vla_pipeline.data.ingest import ingest_episodes
from vla_pipeline.data.schema import ACTION_SCALE
from vla_pipeline.evaluation import metrics
from vla_pipeline.evaluation.evaluate import evaluate, headline, other_episodes
from vla_pipeline.policy.model import build_policy
from vla_pipeline.policy.policy_config import PolicyConfig
from vla_pipeline.policy.preprocess import IMAGE_SIZE, normalise_images

LEFT, RIGHT = "episode_20250614_101502_1box_hori_left_core_medium", "episode_20250614_101503_1box_hori_right_core_medium"


def _showing(actions: np.ndarray, seed: int) -> np.ndarray:
    """Frames that show their own action: green is linear_x, red and blue linear_y (28, 128 or 228
    for -1, 0, +1 key presses, whichever colour order the file is read in), noise at the top."""
    frames = np.empty((len(actions), 72, 128, 3), np.uint8)
    keys = np.rint(actions[:, :2] / ACTION_SCALE)
    frames[..., 1] = (128 + 100 * keys[:, 0])[:, None, None]
    frames[..., 0] = frames[..., 2] = (128 + 100 * keys[:, 1])[:, None, None]
    frames[:, :8] = np.random.default_rng(seed).integers(0, 256, (len(actions), 8, 128, 3))  # not a blank frame
    return frames


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """LEFT (22 frames) and RIGHT (18 frames, its last one a right strafe that only the windows whose
    chunk runs past the last action cover: scored all the same)."""
    left, right = scripted_actions("left", frames=22), scripted_actions("right")
    right[17, :2] = [0.0, -ACTION_SCALE]
    folder = tmp_path_factory.mktemp("sight")
    paths = [write_episode_file(folder / f"{LEFT}.h5", actions=left, images=_showing(left, 0)),
             write_episode_file(folder / f"{RIGHT}.h5", actions=right, images=_showing(right, 1))]
    assert ingest_episodes(paths, folder / "store.zarr")
    return folder / "store.zarr", {LEFT: left[:, :2], RIGHT: right[:, :2]}


class StandIn(torch.nn.Module):
    """What `evaluate` needs of a policy: `config`, `normalise`, `encode_images` and `head`."""

    def __init__(self):
        super().__init__()
        self.config = PolicyConfig.tiny()

    def normalise(self, images) -> torch.Tensor:
        return normalise_images(images)

    def head(self, windows: torch.Tensor) -> torch.Tensor:
        """(B, W, 2) features, already the normalised action -> (B, W, chunk, 2)."""
        return windows[:, :, None, :].expand(-1, -1, self.config.chunk, -1)


class ReadsTheFrame(StandIn):
    """Sends the action its frame shows (`_showing`): on the real frames, every first step is right."""

    def __init__(self):
        super().__init__()
        grey = [normalise_images(np.full((1, IMAGE_SIZE, IMAGE_SIZE, 3), level, np.uint8))[0, :, 0, 0]
                for level in (128, 228)]
        self.zero, self.unit = grey[0], grey[1] - grey[0]

    def encode_images(self, pixel_values, instructions):
        centre = (pixel_values[:, :, IMAGE_SIZE // 2, IMAGE_SIZE // 2] - self.zero) / self.unit
        return torch.round(centre[:, [1, 0]])  # (linear_x, linear_y) keys


class DrivesOnTheInstruction(StandIn):
    """Never looks: forward when told "left", strafes right when told "right"."""

    def encode_images(self, pixel_values, instructions):
        return torch.tensor([[1.0, 0.0] if " left " in text else [0.0, -1.0] for text in instructions])


def _direction_accuracy(pred_keys: np.ndarray, true: np.ndarray) -> float:
    return float(np.mean(metrics.direction_classes(pred_keys * ACTION_SCALE, ACTION_SCALE)
                         == metrics.direction_classes(true, ACTION_SCALE)))


def test_each_episode_is_shown_the_next_ones_frames_the_last_the_firsts():
    assert other_episodes(["a", "b", "c"]) == {"a": "b", "b": "c", "c": "a"}
    assert other_episodes(["a"]) == {} and other_episodes(["a", "a"]) == {}


def test_the_ablations_show_other_frames_at_the_same_indices(store):
    path, actions = store
    evaluation = evaluate(ReadsTheFrame(), path, [LEFT, RIGHT], train_mean=(0.5, 0.0))
    left, right = evaluation.episodes
    assert (left.other_episode_id, right.other_episode_id) == (RIGHT, LEFT)
    # Each prediction is the action of the frame shown: its own, the first frame's, the other episode's.
    np.testing.assert_array_equal(left.pred[:, 0], actions[LEFT][left.frames])
    np.testing.assert_array_equal(left.pred_first_frame[:, 0], np.zeros((len(left.frames), 2)))
    # RIGHT has 18 frames: LEFT's frames 17 … 21 are shown its last one (a right strafe).
    np.testing.assert_array_equal(left.pred_other_episode[:, 0], actions[RIGHT][np.minimum(left.frames, 17)])
    np.testing.assert_array_equal(right.pred_other_episode[:, 0], actions[LEFT][right.frames])

    sight = evaluation.metrics["sight_reliance"]
    # Every command is scored, each episode's last one included.
    assert left.frames.tolist() == list(range(1, 22)) and right.frames.tolist() == list(range(1, 18))
    # On LEFT's frames 1…21 RIGHT's frames are wrong at 4, 5, 8, 9 (the other side) and 17 … 21
    # (the strafe): 12 of 21 right; on RIGHT's 1…17 LEFT's are wrong at 4, 5, 8, 9 and 17: 12 of 17.
    assert sight["other_episodes"] == pytest.approx((12 + 12) / 38)
    assert sight["real"] == 1.0 and sight["first_frame"] == 0.0  # the first frame shows STOP, never recorded after it
    assert sight["drop"] == pytest.approx(1.0 - 24 / 38)  # the smaller drop
    assert sight["other_episodes_skipped"] is None and sight["other_episode_of"] == {LEFT: RIGHT, RIGHT: LEFT}
    numbers = headline(evaluation.metrics)
    assert numbers["direction_accuracy_first"] == 1.0 and numbers["direction_accuracy_first_frame"] == 0.0
    assert numbers["direction_accuracy_other_episode"] == pytest.approx(24 / 38)
    assert numbers["sight_reliance"] == pytest.approx(14 / 38)


def test_a_policy_that_does_not_look_loses_nothing_and_keeps_its_instruction(store):
    path, actions = store
    sight = evaluate(DrivesOnTheInstruction(), path, [LEFT, RIGHT], train_mean=(0.5, 0.0)).metrics["sight_reliance"]
    # LEFT: forward, right at 17 of its 21 frames; RIGHT: strafing right, at 4, 5 and 17 of its 17.
    # Told the other episode's instruction it would score LEFT 2/21 (8, 9) and RIGHT 14/17 instead.
    true_left, true_right = actions[LEFT][1:22], actions[RIGHT][1:18]
    real = (_direction_accuracy(np.tile([1.0, 0.0], (21, 1)), true_left) * 21
            + _direction_accuracy(np.tile([0.0, -1.0], (17, 1)), true_right) * 17) / 38
    assert real == pytest.approx(20 / 38)
    assert sight == {"real": pytest.approx(real), "first_frame": pytest.approx(real),
                     "other_episodes": pytest.approx(real), "drop": 0.0, "other_episodes_skipped": None,
                     "other_episode_of": {LEFT: RIGHT, RIGHT: LEFT}}


def test_one_validation_episode_has_no_other_episode_to_be_shown(store):
    path, _ = store
    evaluation = evaluate(ReadsTheFrame(), path, [LEFT], train_mean=(0.5, 0.0))
    sight = evaluation.metrics["sight_reliance"]
    assert sight["other_episodes"] is None and "one validation episode" in sight["other_episodes_skipped"]
    assert sight["drop"] == 1.0  # real 1.0 − first frame 0.0, the only ablation measured
    assert evaluation.episodes[0].pred_other_episode is None
    numbers = headline(evaluation.metrics)
    assert "direction_accuracy_other_episode" not in numbers  # not recorded, never written as 0
    assert numbers["sight_reliance"] == 1.0


def test_without_ablations_nothing_is_reported(store):
    path, _ = store
    evaluation = evaluate(ReadsTheFrame(), path, [LEFT, RIGHT], train_mean=(0.5, 0.0), sight_ablations=False)
    assert evaluation.metrics["sight_reliance"] is None
    assert evaluation.episodes[0].pred_first_frame is None and evaluation.episodes[0].pred_other_episode is None
    assert not {"sight_reliance", "direction_accuracy_first_frame"} & set(headline(evaluation.metrics))


def test_the_backbone_sees_the_ablated_frames(store, tiny_backbone_path):
    path, _ = store
    policy = build_policy(PolicyConfig.tiny(backbone=str(tiny_backbone_path)))
    episode = evaluate(policy, path, [LEFT, RIGHT], train_mean=(0.5, 0.0)).episodes[0]
    assert not np.allclose(episode.pred_first_frame, episode.pred)
    assert not np.allclose(episode.pred_other_episode, episode.pred)
    set_constant_output(policy, 20.0, 0.0)  # the head ignores its features: always forward
    sight = evaluate(policy, path, [LEFT, RIGHT], train_mean=(0.5, 0.0)).metrics["sight_reliance"]
    assert sight["drop"] == 0.0 and sight["first_frame"] == sight["other_episodes"] == sight["real"]


def test_sight_reliance_is_the_smaller_drop():
    assert metrics.sight_reliance(0.9, 0.5, 0.7)["drop"] == pytest.approx(0.2)
    assert metrics.sight_reliance(0.9, 0.7, 0.5)["drop"] == pytest.approx(0.2)
    assert metrics.sight_reliance(0.9, 0.6, None) == {"real": 0.9, "first_frame": 0.6, "other_episodes": None,
                                                      "drop": pytest.approx(0.3)}
    assert metrics.sight_reliance(0.5, 0.6, 0.4)["drop"] == pytest.approx(-0.1)  # kept as measured
