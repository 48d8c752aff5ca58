"""The CPU preset's small backbone (random, as "small"; its image path pretrained, as "grounded"), the
classification head and the downsampled vision tower."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vla_pipeline.data.schema import ACTION_SCALE, INSTRUCTION_TEMPLATE
from vla_pipeline.policy.backbone import build_local_backbone, save_local_backbone
from vla_pipeline.policy.model import build_policy, load_policy_dir, save_policy
from vla_pipeline.policy.policy_config import PolicyConfig
from vla_pipeline.policy.serving import sliding_window_actions

LEFT = INSTRUCTION_TEMPLATE.format(side="left", target="cup")
RIGHT = INSTRUCTION_TEMPLATE.format(side="right", target="cup")
W = 3


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory):
    return save_local_backbone(tmp_path_factory.mktemp("kosmos2-small"), "small")


def make_batch(chunk: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "images": torch.randint(0, 256, (2, W, 224, 224, 3), dtype=torch.uint8, generator=g),
        "instructions": [LEFT, RIGHT],
        "actions": torch.randint(-1, 2, (2, W, chunk, 2), generator=g).float(),
        "action_mask": torch.ones(2, W, chunk, dtype=torch.bool),
    }


def test_small_backbone_is_deterministic_and_sees_112_pixel_frames():
    first, _ = build_local_backbone("small")
    second, _ = build_local_backbone("small")
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), name
    assert first.config.vision_config.image_size == 112
    # image_signal_init: unit-size projection weights, small latent queries
    projection = first.image_to_text_projection
    assert 0.8 < float(projection.dense.weight.detach().std()) < 1.2
    assert float(projection.latent_query.detach().std()) < 0.2


def test_image_reaches_the_action_token_at_init(small_dir):
    """With Kosmos-2's own init the action token's feature hardly depends on the frame."""
    policy = build_policy(PolicyConfig.cpu(backbone=str(small_dir))).eval()
    frames = torch.randint(0, 256, (6, 1, 224, 224, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        features = policy.encode_frames(frames, [LEFT] * 6)[:, 0]
    assert float(features.std(0).mean() / features.std(1).mean()) > 0.02


def test_the_cpu_preset_trains_all_but_the_vision_tower(small_dir):
    policy = build_policy(PolicyConfig.cpu(backbone=str(small_dir)))
    for name, param in policy.named_parameters():
        assert param.requires_grad != name.startswith("backbone.vision_model."), name
    assert any(name.startswith("backbone.vision_model.") for name, _ in policy.named_parameters())
    everything = build_policy(PolicyConfig.cpu(backbone=str(small_dir), preset="small", train_vision=True))
    assert all(p.requires_grad for p in everything.parameters())


@pytest.mark.parametrize("chunk", [1, 2])
def test_classification_head_loss_and_actions(small_dir, chunk):
    policy = build_policy(PolicyConfig.cpu(backbone=str(small_dir), chunk=chunk))
    batch = make_batch(chunk)
    loss, info = policy(batch)
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert loss.item() == pytest.approx(np.log(3), abs=0.3)  # near-uniform logits at init
    loss.backward()
    assert policy.head.mlp[-1].weight.grad.abs().sum() > 0 and policy.action_token.grad.abs().sum() > 0
    assert policy.head.mlp[-1].out_features == chunk * 2 * 3
    actions = policy.predict(batch["images"], batch["instructions"])
    assert actions.shape == (2, chunk, 2) and float(actions.abs().max()) <= ACTION_SCALE


def test_classification_loss_ignores_masked_steps(small_dir):
    policy = build_policy(PolicyConfig.cpu(backbone=str(small_dir), chunk=2))
    batch = make_batch(2)
    batch["action_mask"][:, :, 1] = False
    loss, _ = policy(batch)
    batch["actions"][:, :, 1] = -batch["actions"][:, :, 1] + 1  # change only the masked steps
    assert policy(batch)[0].item() == pytest.approx(loss.item())


def test_classification_loss_falls_when_overfitting(small_dir):
    torch.manual_seed(0)
    policy = build_policy(PolicyConfig.cpu(backbone=str(small_dir)))
    batch = make_batch(1)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=2e-3)
    first = None
    for _ in range(80):
        loss, _ = policy(batch)
        first = first if first is not None else loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.2 * first
    predicted = policy.predict(batch["images"], batch["instructions"])[:, 0] / ACTION_SCALE
    assert torch.equal(predicted.round(), batch["actions"][:, -1, 0])


def test_small_policy_round_trips(small_dir, tmp_path):
    policy = build_policy(PolicyConfig.cpu(backbone=str(small_dir))).eval()
    with torch.no_grad():
        for param in policy.parameters():  # as if trained
            param.add_(torch.randn_like(param) * 0.01)
    batch = make_batch(1)
    before = policy.predict(batch["images"], batch["instructions"])
    save_policy(policy, tmp_path / "policy")
    loaded = load_policy_dir(tmp_path / "policy")
    assert loaded.config.action_head == "classification"
    assert torch.allclose(loaded.predict(batch["images"], batch["instructions"]), before, atol=1e-6)
    features = loaded.encode_images(torch.zeros(4, 3, 224, 224), [LEFT] * 4)
    assert sliding_window_actions(loaded, features).shape == (4, 1, 2)


def test_small_preset_without_a_directory_uses_the_cached_build(tmp_path, monkeypatch):
    monkeypatch.setenv("VLA_SMALL_BACKBONE", str(tmp_path / "cache"))
    policy = build_policy(PolicyConfig.cpu(preset="small", backbone="small"))
    assert (tmp_path / "cache" / "config.json").is_file()
    assert policy.kosmos.config.vision_config.hidden_size == 64


def test_side_probe_loss_joins_only_with_known_sides(small_dir):
    policy = build_policy(PolicyConfig.cpu(backbone=str(small_dir)))
    assert policy.head.side_probe is not None
    batch = make_batch(1)
    without, info = policy(batch)
    assert "side_loss" not in info
    with_sides, info = policy({**batch, "sides": ["left", "right"]})
    assert info["side_loss"] > 0 and with_sides.item() == pytest.approx(without.item() + 0.5 * info["side_loss"], rel=1e-5)
    unknown, info = policy({**batch, "sides": [None, None]})
    assert "side_loss" not in info and unknown.item() == pytest.approx(without.item())
    with_sides.backward()
    assert policy.head.side_probe.weight.grad.abs().sum() > 0
    assert build_policy(PolicyConfig.cpu(backbone=str(small_dir), side_loss_weight=0.0)).head.side_probe is None


def test_joint_head_decodes_one_action_where_the_axes_apart_make_a_stop():
    """Unsure whether to strafe left or right while not driving forward: the axes' separate
    argmaxes combine into a stop nobody pressed; the joint head's most likely combination is
    the forward press it is surest of."""
    from vla_pipeline.policy.model import PolicyHead

    joint = PolicyHead(4, 8, 1, chunk=1, action_dim=2, kind="joint", decode="argmax")
    combos = [tuple(c) for c in joint.combinations.tolist()]
    probs = torch.zeros(9)
    for action, p in {(1.0, 0.0): 0.4, (0.0, 1.0): 0.25, (0.0, -1.0): 0.25, (0.0, 0.0): 0.1}.items():
        probs[combos.index(action)] = p
    assert joint.decode(probs.clamp_min(1e-6).log()[None]).tolist() == [[1.0, 0.0]]
    # the same beliefs as each axis's own 3 classes (-1, 0, +1)
    marginals = torch.stack([torch.tensor([sum(p for c, p in zip(combos, probs.tolist()) if c[axis] == v)
                                           for v in PolicyHead.CLASS_VALUES]) for axis in (0, 1)])
    apart = PolicyHead(4, 8, 1, chunk=1, action_dim=2, kind="classification", decode="argmax")
    assert apart.decode(marginals.log()[None]).tolist() == [[0.0, 0.0]]


def test_joint_head_loss_is_the_cross_entropy_of_the_pressed_combination(small_dir):
    policy = build_policy(PolicyConfig.cpu(backbone=str(small_dir), chunk=2, action_head="joint", stop_loss_weight=3.0))
    assert policy.head.mlp[-1].out_features == 2 * 9
    batch = make_batch(2)
    batch["action_mask"][0, :, 1] = False
    loss, _ = policy(batch)
    with torch.no_grad():
        raw = policy.head.raw(policy.encode_frames(batch["images"], batch["instructions"]))
    combos = policy.head.combinations.tolist()
    target = torch.tensor([[[combos.index(step) for step in window] for window in episode]
                           for episode in batch["actions"].tolist()])  # (B, W, chunk)
    weight = batch["action_mask"].float() * torch.where((batch["actions"] == 0).all(-1), 3.0, 1.0)
    per_step = torch.nn.functional.cross_entropy(raw.flatten(0, -2), target.flatten(), reduction="none")
    assert loss.item() == pytest.approx(float((per_step * weight.flatten()).sum() / weight.sum()), rel=1e-5)
    loss.backward()
    assert policy.head.mlp[-1].weight.grad.abs().sum() > 0
    actions = policy.predict(batch["images"], batch["instructions"]) / ACTION_SCALE
    assert actions.shape == (2, 2, 2) and all([round(v, 4) for v in step] in combos for step in actions.flatten(0, 1).tolist())


def test_a_grounded_policy_keeps_the_frozen_tower_it_trained_with(small_dir, tmp_path):
    """The grounded build trains into a cache folder (not bit-for-bit the same on another machine or
    version): the policy folder holds the tower it was trained with, and still loads without it."""
    from safetensors.torch import load_file, save_file

    from vla_pipeline.policy.policy_config import WEIGHTS_FILE

    policy = build_policy(PolicyConfig.cpu(backbone=str(small_dir))).eval()
    with torch.no_grad():
        for param in policy.backbone.vision_model.parameters():  # a tower unlike the folder's
            param.add_(torch.randn_like(param) * 0.05)
    pixels = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = policy.encode_images(pixels, [LEFT, RIGHT])
    save_policy(policy, tmp_path / "policy")
    with torch.no_grad():
        torch.testing.assert_close(load_policy_dir(tmp_path / "policy").encode_images(pixels, [LEFT, RIGHT]), before)

    weights = tmp_path / "policy" / WEIGHTS_FILE
    trained = {k: v for k, v in load_file(str(weights)).items() if not k.startswith("backbone.vision_model.")}
    save_file(trained, str(weights))  # as written before the frozen parts were kept: the build's tower
    with torch.no_grad():
        assert not torch.allclose(load_policy_dir(tmp_path / "policy").encode_images(pixels, [LEFT, RIGHT]), before)

    random_preset = build_policy(PolicyConfig.cpu(backbone=str(small_dir), preset="small"))
    save_policy(random_preset, tmp_path / "small")  # its build is a seeded init: only what trains is kept
    assert not any(k.startswith("backbone.vision_model.") for k in load_file(str(tmp_path / "small" / WEIGHTS_FILE)))


def test_a_grounded_policy_folder_loads_without_the_grounded_build(small_dir, tmp_path, monkeypatch):
    """It holds its whole backbone, so a machine without the grounded build (minutes of pretraining)
    loads it on the small build's architecture and processor instead, and predicts the same."""
    import json

    from vla_pipeline.policy.policy_config import CONFIG_FILE

    policy = build_policy(PolicyConfig.cpu(backbone=str(small_dir))).eval()
    with torch.no_grad():
        for param in policy.parameters():  # as if trained and pretrained
            param.add_(torch.randn_like(param) * 0.05)
    pixels = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = policy.encode_images(pixels, [LEFT, RIGHT])
    save_policy(policy, tmp_path / "policy")
    config = json.loads((tmp_path / "policy" / CONFIG_FILE).read_text())
    (tmp_path / "policy" / CONFIG_FILE).write_text(json.dumps({**config, "backbone": "grounded"}))  # as trained
    monkeypatch.setenv("VLA_GROUNDED_BACKBONE", str(tmp_path / "no-grounded-build"))
    loaded = load_policy_dir(tmp_path / "policy")
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_images(pixels, [LEFT, RIGHT]), before)
    assert loaded.config.preset == "grounded" and not (tmp_path / "no-grounded-build").exists()
