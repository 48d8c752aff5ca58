"""The grounded preset: the small backbone's image path pretrained on rendered rooms."""

from __future__ import annotations

import math

import pytest
import torch

from vla_pipeline.policy import grounding
from vla_pipeline.policy.backbone import LOCAL_BACKBONES, build_local_backbone
from vla_pipeline.policy.grounding import LABELS, grounding_frames, pose_labels
from vla_pipeline.policy.policy_config import PolicyConfig
from vla_pipeline.sim import varied

BOX = [(1.5, 1.9, -0.3, 0.3)]  # one box straight ahead
HALF_VIEW = 1 / (2 * 0.55)  # the camera's focal length is 0.55 × the frame's width


def labels(pose, target, obstacles=BOX) -> dict:
    return dict(zip(LABELS, pose_labels(pose, obstacles, target, HALF_VIEW)))


def test_a_target_behind_the_box_is_not_seen_and_its_place_not_labelled():
    hidden = labels((0.0, 0.0), (5.0, 0.0))
    assert hidden["target_seen"] == 0.0 and hidden["target_inverse_depth"] == hidden["target_column"] == 0.0
    beside = labels((0.0, 1.0), (5.0, 1.5))
    assert beside["target_seen"] == 1.0
    assert beside["target_inverse_depth"] == pytest.approx(1 / 5.0)
    assert beside["target_column"] == pytest.approx(0.5 / 5.0)  # to the left: positive


def test_a_target_outside_the_field_of_view_is_not_seen():
    assert labels((2.5, 0.0), (3.0, 1.0))["target_seen"] == 0.0  # 63° to the left of an 85° view


def test_the_obstacle_is_labelled_while_it_is_ahead():
    ahead = labels((0.0, 0.0), (5.0, 2.0))
    assert ahead["obstacle_ahead"] == 1.0 and ahead["obstacle_inverse_depth"] == pytest.approx(1 / 1.5)
    assert ahead["obstacle_left_column"] == pytest.approx(0.3 / 1.5)
    assert ahead["obstacle_right_column"] == pytest.approx(-0.3 / 1.5)
    assert labels((1.6, 0.8), (5.0, 0.0))["obstacle_ahead"] == 0.0


def test_the_arrival_label_is_the_worlds_own_judgement():
    target = (4.0, 0.4)
    stop = (target[0] - 0.9, 0.4)
    assert labels(stop, target)["arrived"] == 1.0 and varied.arrival(stop, target) is None
    assert labels((target[0] - 1.36, 0.4), target)["arrived"] == 0.0  # one press early
    assert labels((target[0] - 0.9, 0.4 + 0.46), target)["arrived"] == 0.0  # one strafe off


def test_frames_come_as_the_store_holds_them():
    frames, found = grounding_frames(2, seed=3, log=lambda line: None)
    assert frames.dtype.name == "uint8" and frames.shape[1:] == (224, 224, 3)
    assert found.shape == (len(frames), len(LABELS)) and len(frames) > 20
    assert set(found[:, 0].tolist()) == {0.0, 1.0}  # the target both hidden and seen
    assert found[:, -1].sum() >= 1  # the operator's last pose before his stop is an arrival


def test_the_grounded_preset_pretrains_the_image_path_only(monkeypatch):
    assert {k: v for k, v in LOCAL_BACKBONES["grounded"].items() if k not in ("grounding", "version")} == {
        k: v for k, v in LOCAL_BACKBONES["small"].items() if k != "version"}
    monkeypatch.setitem(LOCAL_BACKBONES, "grounded", dict(LOCAL_BACKBONES["grounded"],
                                                          grounding=dict(scenes=3, epochs=2, seed=0)))
    small, _ = build_local_backbone("small")
    grounded, _ = build_local_backbone("grounded")
    small_state, grounded_state = small.state_dict(), grounded.state_dict()
    for name, value in grounded_state.items():
        same = torch.equal(value, small_state[name])
        if name.startswith(("vision_model.", "image_to_text_projection.")) and value.dtype.is_floating_point:
            if name.endswith("weight") and "norm" not in name:
                assert not same, f"{name} did not train"
        else:
            assert same, f"{name} changed"
    assert PolicyConfig(preset="grounded", backbone="grounded").preset == "grounded"


def test_pretraining_reports_held_out_scores():
    model, _ = build_local_backbone("small")
    lines = []
    scores = grounding.pretrain_grounding(model, scenes=3, epochs=1, log=lines.append)
    assert set(scores) == {"loss", "target_column_error", "arrival_recall", "arrival_precision"}
    assert math.isfinite(scores["loss"]) and 0 <= scores["arrival_recall"] <= 1
    assert any("epoch 1/1" in line for line in lines) and any("rooms rendered" in line for line in lines)
    assert not model.training


def test_the_run_log_says_what_trains_on_the_grounded_backbone():
    from vla_pipeline.training.train_config import TrainConfig, describe_setup

    assert describe_setup(PolicyConfig.cpu(), TrainConfig.cpu()).startswith(
        "the backbone but its vision tower, from its grounding-pretrained weights;")
    random = PolicyConfig.cpu(preset="small", backbone="small", train_vision=True)
    assert describe_setup(random, TrainConfig.cpu()).startswith("the whole backbone, from its initial weights;")
