"""The Kosmos-2 policy on a tiny backbone built in-process (no downloads)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from vla_pipeline.policy.backbone import build_local_backbone, load_backbone
from vla_pipeline.policy.model import (
    ADAPTER_DIR,
    WEIGHTS_FILE,
    MobileVLAPolicy,
    build_policy,
    load_policy_dir,
    lora_target_modules,
    save_policy,
    trainable_breakdown,
    trainable_parameters,
)
from vla_pipeline.policy.policy_config import PolicyConfig
from vla_pipeline.training.train_config import TrainConfig
from vla_pipeline.policy.preprocess import encode_prompts, normalise_images, prompt_for
from vla_pipeline.data.schema import ACTION_SCALE, INSTRUCTION_TEMPLATE

LEFT = INSTRUCTION_TEMPLATE.format(side="left", target="cup")
RIGHT = INSTRUCTION_TEMPLATE.format(side="right", target="cup")
B, W, CHUNK = 2, 3, 2


@pytest.fixture(scope="module")
def fresh_kosmos(tiny_backbone_path):
    """The plain tiny backbone, for counting what each setup should train."""
    model, _ = load_backbone(PolicyConfig.tiny(backbone=str(tiny_backbone_path)))
    return model


def make_policy(tiny_backbone_path, **overrides) -> MobileVLAPolicy:
    return build_policy(PolicyConfig.tiny(backbone=str(tiny_backbone_path), window=W, chunk=CHUNK, **overrides))


def make_batch(seed: int = 0, batch: int = B) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "images": torch.randint(0, 256, (batch, W, 224, 224, 3), dtype=torch.uint8, generator=g),
        "instructions": [LEFT, RIGHT][:batch],
        "actions": torch.randint(-1, 2, (batch, W, CHUNK, 2), generator=g).float(),
        "action_mask": torch.ones(batch, W, CHUNK, dtype=torch.bool),
    }


def numel(params) -> int:
    return sum(p.numel() for p in params)


# ---------------------------------------------------------------- backbone, preprocessing


def test_tiny_backbone_round_trips_through_from_pretrained(tiny_backbone_path):
    from transformers import AutoProcessor, AutoTokenizer, Kosmos2Model

    built, processor = build_local_backbone("tiny")
    loaded = Kosmos2Model.from_pretrained(tiny_backbone_path)
    assert set(built.state_dict()) == set(loaded.state_dict())
    for name, tensor in built.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    inputs = processor(images=[np.full((224, 224, 3), 90, np.uint8)], text=[prompt_for(LEFT)],
                       num_image_tokens=built.config.latent_query_num, return_tensors="pt")
    outs = [model.eval()(**inputs).last_hidden_state for model in (built, loaded)]
    assert torch.equal(outs[0], outs[1])
    for tokenizer in (AutoProcessor.from_pretrained(tiny_backbone_path).tokenizer, AutoTokenizer.from_pretrained(tiny_backbone_path)):
        assert tokenizer(prompt_for(LEFT))["input_ids"] == processor.tokenizer(prompt_for(LEFT))["input_ids"]
        assert len(tokenizer) == built.config.text_config.vocab_size


def test_prompt_layout_and_pixels_match_kosmos2_processor(tiny_backbone_path):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_backbone_path)
    frames = np.random.default_rng(0).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
    texts = [LEFT, "Navigate around the obstacle on the right side and reach the basket"]
    reference = processor(images=list(frames), text=[prompt_for(t) for t in texts], num_image_tokens=8,
                          padding=True, return_tensors="pt")
    ours = encode_prompts(processor.tokenizer, texts, num_image_tokens=8)
    eos = processor.tokenizer.eos_token_id
    for i in range(2):
        n = int(ours.action_index[i])  # tokens before the action slot
        assert ours.input_ids[i, : n].tolist() == reference["input_ids"][i, : n].tolist()
        assert reference["attention_mask"][i].sum() == n and ours.input_ids[i, n] == eos
        assert ours.image_embeds_position_mask[i, : n].tolist() == reference["image_embeds_position_mask"][i, : n].tolist()
    assert (ours.image_embeds_position_mask.sum(1) == 8).all()
    assert (ours.input_ids[:, 11:] != processor.tokenizer.unk_token_id).all()  # every prompt word is known
    pixels = normalise_images(torch.from_numpy(frames))
    assert pixels.shape == (2, 3, 224, 224)
    torch.testing.assert_close(pixels, reference["pixel_values"], atol=1e-5, rtol=0)


def test_small_tower_pixels_are_the_full_size_pixels_area_averaged():
    """A smaller vision tower's input, averaged down before normalising, is the 224×224 input
    averaged down after, in every layout the policy takes (one frame, frames, windows)."""
    frames = torch.randint(0, 256, (2, 3, 224, 224, 3), dtype=torch.uint8)
    full = normalise_images(frames).flatten(0, 1)
    expected = torch.nn.functional.interpolate(full, size=(112, 112), mode="area").view(2, 3, 3, 112, 112)
    small = normalise_images(frames, size=112)
    assert small.shape == (2, 3, 3, 112, 112)
    torch.testing.assert_close(small, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(normalise_images(frames[0, 0], size=112), expected[0, 0], atol=1e-5, rtol=0)
    assert not torch.equal(small[0, 0], small[0, 1])  # each frame its own pixels


# ---------------------------------------------------------------- forward, gradients


def test_forward_gives_scalar_loss_and_grads_reach_token_and_head(tiny_backbone_path):
    policy = make_policy(tiny_backbone_path)
    loss, info = policy(make_batch())
    assert loss.dim() == 0 and torch.isfinite(loss) and info["valid_steps"] == B * W * CHUNK
    loss.backward()
    assert policy.action_token.grad is not None and policy.action_token.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.head.parameters())
    lora = [p for n, p in policy.kosmos.named_parameters() if "lora_B" in n]
    assert lora and all(p.grad is not None for p in lora)
    assert policy.head(torch.zeros(B, W, 64)).shape == (B, W, CHUNK, 2)


def test_frozen_backbone_gets_no_grads(tiny_backbone_path):
    policy = make_policy(tiny_backbone_path, freeze_backbone=True, lora_enable=False, train_vision=False)
    loss, _ = policy(make_batch())
    loss.backward()
    assert all(p.grad is None for p in policy.kosmos.parameters())
    assert policy.action_token.grad.abs().sum() > 0


def test_backbone_hidden_equals_kosmos2_forward(tiny_backbone_path):
    """The gather that places the image embeddings (capturable in a CUDA graph) gives exactly
    Kosmos2Model.forward's hidden states, right-padded prompts included."""
    policy = make_policy(tiny_backbone_path).eval()
    pixels = normalise_images(torch.randint(0, 256, (2, 224, 224, 3), dtype=torch.uint8))
    pixels = torch.nn.functional.interpolate(pixels, size=(policy.kosmos.config.vision_config.image_size,) * 2,
                                             mode="area")
    prompts = policy.prompt_batch((LEFT, "Stop"), "cpu")
    assert prompts.attention_mask.min() == 0  # the shorter prompt is padded
    embeds = policy.kosmos.get_input_embeddings()(prompts.input_ids)
    with torch.no_grad():
        ours = policy.backbone_hidden(pixels, embeds, prompts.attention_mask, prompts.image_embeds_position_mask,
                                      prompts.position_ids)
        theirs = policy.kosmos(pixel_values=pixels, inputs_embeds=embeds.clone(), attention_mask=prompts.attention_mask,
                               image_embeds_position_mask=prompts.image_embeds_position_mask,
                               position_ids=prompts.position_ids, use_cache=False).last_hidden_state
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_activation_checkpointing_recomputes_and_gives_the_same_gradients(tiny_backbone_path):
    grads, calls = [], []
    for checkpointing in (False, True):
        policy = make_policy(tiny_backbone_path, gradient_checkpointing=checkpointing).train()
        for module in policy.kosmos.modules():  # no dropout, so both runs compute the same thing
            for name in ("dropout", "activation_dropout"):
                if isinstance(getattr(module, name, None), float):
                    setattr(module, name, 0.0)
        count = []
        # transformers 5.23 checkpoints a layer's `forward`, so hook a module inside the layer
        policy.kosmos.text_model.model.layers[0].ffn.register_forward_pre_hook(lambda *_: count.append(1))
        loss, _ = policy(make_batch())
        loss.backward()
        calls.append(len(count))
        grads.append(torch.cat([p.grad.flatten() for p in policy.parameters() if p.grad is not None]))
    assert calls == [1, 2]  # the checkpointed layer runs again in the backward pass
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-4)


def test_loss_ignores_masked_steps(tiny_backbone_path):
    policy = make_policy(tiny_backbone_path).eval()
    batch = make_batch()
    batch["action_mask"][0, :, 1] = False
    batch["action_mask"][1, 2] = False
    garbage = dict(batch, actions=batch["actions"].clone())
    garbage["actions"][~batch["action_mask"]] = 50.0
    loss, info = policy(batch)
    assert info["valid_steps"] == int(batch["action_mask"].sum())
    assert torch.equal(loss, policy(garbage)[0])


def test_features_do_not_depend_on_batch_padding(tiny_backbone_path):
    policy = make_policy(tiny_backbone_path).eval()
    images = make_batch()["images"]
    with torch.no_grad():
        pair = policy.encode_frames(images, [LEFT, LEFT + " and go back"])
        alone = policy.encode_frames(images[:1], [LEFT])
    torch.testing.assert_close(pair[:1], alone, atol=1e-5, rtol=1e-5)


def test_left_and_right_give_different_features(tiny_backbone_path):
    policy = make_policy(tiny_backbone_path).eval()
    images = make_batch()["images"][:1]
    with torch.no_grad():
        left, left_again, right = (policy.encode_frames(images, [text]) for text in (LEFT, LEFT, RIGHT))
        as_floats = policy.encode_frames(normalise_images(images), [LEFT])  # (B, W, 3, 224, 224) input
    assert torch.equal(left, left_again) and torch.equal(left, as_floats)
    assert (left - right).abs().max() > 1e-4


# ---------------------------------------------------------------- what trains


def lora_count(kosmos, targets: str, r: int) -> int:
    modules = dict(kosmos.named_modules())
    return sum(r * (modules[n].in_features + modules[n].out_features) for n in lora_target_modules(kosmos, targets))


def test_lora_target_sets(fresh_kosmos):
    text, text_vision, every = (set(lora_target_modules(fresh_kosmos, t)) for t in ("text", "text+vision", "all-linear"))
    linears = {n for n, m in fresh_kosmos.named_modules() if isinstance(m, torch.nn.Linear)}
    assert every == linears and text < text_vision < every
    assert all(n.startswith("text_model.model.layers.") for n in text)
    assert all(n.startswith("vision_model.model.encoder.layers.") for n in text_vision - text)
    assert every - text_vision == {
        "image_to_text_projection.dense",
        *(f"image_to_text_projection.x_attn.{p}_proj" for p in ("q", "k", "v", "out")),
    }
    assert len(text) == 6 * fresh_kosmos.config.text_config.layers


SETUPS = {
    "freeze": dict(freeze_backbone=True, lora_enable=False, train_vision=False),
    "lora-text": dict(lora_targets="text", train_vision=False),
    "lora-text+vision": dict(lora_targets="text+vision", train_vision=False),
    "lora-all-linear": dict(lora_targets="all-linear", train_vision=False),
    "lora+train_vision": dict(lora_targets="all-linear", train_vision=True),
    "lora+train_text_embedding": dict(lora_targets="text", train_vision=False, train_text_embedding=True),
    "freeze+train_decoder_layers=1": dict(freeze_backbone=True, lora_enable=False, train_vision=False,
                                          train_decoder_layers=1),
    "full": dict(freeze_backbone=False, lora_enable=False, train_vision=True, train_text_embedding=True),
}


@pytest.mark.parametrize("setup", SETUPS)
def test_trainable_counts(tiny_backbone_path, fresh_kosmos, setup):
    config = PolicyConfig.tiny(backbone=str(tiny_backbone_path), **SETUPS[setup])
    policy = build_policy(config)
    counts = trainable_parameters(policy)
    always = numel(policy.head.parameters()) + policy.action_token.numel()
    lora = lora_count(fresh_kosmos, config.lora_targets, config.lora_r) if config.lora_enable else 0
    backbone_total = numel(fresh_kosmos.parameters())
    expected = always + lora
    if config.train_vision:
        expected += numel(fresh_kosmos.vision_model.parameters())
    if config.train_text_embedding:
        expected += fresh_kosmos.get_input_embeddings().weight.numel()
    if config.train_decoder_layers > 0:
        expected += numel(fresh_kosmos.text_model.model.layers[-config.train_decoder_layers :].parameters())
    if setup == "full":
        expected = counts["total"]
    assert counts["trainable"] == expected
    assert counts["total"] == backbone_total + lora + always
    breakdown = trainable_breakdown(policy)
    assert sum(breakdown.values()) == counts["trainable"] and breakdown["lora"] == lora
    if setup == "freeze":
        assert counts["trainable"] == always


# ---------------------------------------------------------------- training, saving


def test_loss_falls_when_overfitting_two_windows(tiny_backbone_path):
    torch.manual_seed(0)
    policy = make_policy(tiny_backbone_path, lora_dropout=0.0).train()
    batch = make_batch()
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(30):
        loss, _ = policy(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses  # random targets: ~0.44 here, ~0 after 150 steps


SAVE_SETUPS = {
    "lora+vision+decoder+embedding": dict(lora_targets="all-linear", train_vision=True, train_decoder_layers=1,
                                          train_text_embedding=True),
    "lora-text": dict(lora_targets="text", train_vision=False),
    "freeze": dict(freeze_backbone=True, lora_enable=False, train_vision=False),
}


@pytest.mark.parametrize("setup", SAVE_SETUPS)
def test_save_then_load_reproduces_predictions(tiny_backbone_path, tmp_path, setup):
    from safetensors import safe_open

    policy = make_policy(tiny_backbone_path, **SAVE_SETUPS[setup])
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-2)
    for seed in range(2):  # move every trained weight away from its (seeded) initial value
        loss, _ = policy(make_batch(seed))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    batch = make_batch(7)
    expected = policy.predict(batch["images"], batch["instructions"])
    assert expected.shape == (B, CHUNK, 2) and expected.abs().max() <= ACTION_SCALE

    save_policy(policy, tmp_path / "policy")
    loaded = load_policy_dir(tmp_path / "policy")
    assert loaded.config == policy.config and not loaded.training
    torch.testing.assert_close(loaded.predict(batch["images"], batch["instructions"]), expected, atol=1e-6, rtol=0)
    fresh = make_policy(tiny_backbone_path, **SAVE_SETUPS[setup])
    assert not torch.allclose(fresh.predict(batch["images"], batch["instructions"]), expected)
    assert trainable_parameters(loaded) == trainable_parameters(policy)
    # in place (resuming): same parameter objects, the saved values
    params = list(fresh.parameters())
    assert load_policy_dir(tmp_path / "policy", into=fresh) is fresh
    assert all(a is b for a, b in zip(fresh.parameters(), params, strict=True))
    torch.testing.assert_close(fresh.predict(batch["images"], batch["instructions"]), expected, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="differs"):
        load_policy_dir(tmp_path / "policy", into=make_policy(tiny_backbone_path, **SAVE_SETUPS[setup], lstm_hidden=16))

    # only what trains is saved: the stored tensors add up to the trainable count exactly
    stored = 0
    files = [tmp_path / "policy" / WEIGHTS_FILE]
    if policy.config.lora_enable:
        files.append(tmp_path / "policy" / ADAPTER_DIR / "adapter_model.safetensors")
    for path in files:
        with safe_open(str(path), "pt") as f:
            stored += sum(int(np.prod(f.get_slice(key).get_shape())) for key in f.keys())
    assert stored == trainable_parameters(policy)["trainable"]
    saved_bytes = sum(p.stat().st_size for p in (tmp_path / "policy").rglob("*") if p.is_file())
    backbone_bytes = (tiny_backbone_path / "model.safetensors").stat().st_size
    if setup != "lora+vision+decoder+embedding":
        assert saved_bytes < 0.25 * backbone_bytes
    assert json.loads((tmp_path / "policy" / "policy_config.json").read_text())["lora_targets"] == policy.config.lora_targets


def test_config_round_trips_and_rejects_unknown_keys():
    config = PolicyConfig.tiny(lora_targets="text+vision", train_decoder_layers=2)
    assert PolicyConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert PolicyConfig().action_scale == ACTION_SCALE
    with pytest.raises(ValueError, match="unknown"):
        PolicyConfig.from_dict({**config.to_dict(), "lora_rank": 8})
    with pytest.raises(ValueError, match="lora_targets: Input should be 'text', 'text\\+vision' or 'all-linear'"):
        PolicyConfig(lora_targets="vision")
    with pytest.raises(ValueError, match=r"^policy config: lora_r: Input should be greater than or equal to 1$"):
        PolicyConfig(lora_r=0)
    with pytest.raises(ValueError, match=r"^training config: epochs: .*; keep: Input should be 'best' or 'last'$"):
        TrainConfig(epochs=0, keep="first")


def test_tiny_preset_without_a_directory_uses_the_cached_build(tmp_path, monkeypatch, tiny_backbone_path):
    monkeypatch.setenv("VLA_TINY_BACKBONE", str(tmp_path / "cache"))
    policy = build_policy(PolicyConfig.tiny())  # backbone "tiny" is no directory
    assert (tmp_path / "cache" / "model.safetensors").is_file()
    assert (tmp_path / "cache" / "model.safetensors").read_bytes() == (tiny_backbone_path / "model.safetensors").read_bytes()
    assert policy.num_image_tokens == 8


# ---------------------------------------------------------------- full size


@pytest.mark.slow
def test_full_size_lora_step_bf16():
    """Random weights, the real Kosmos-2 architecture: LoRA r 32 on every Linear, bf16 on CPU."""
    from transformers import Kosmos2Config, Kosmos2Model

    _, processor = build_local_backbone("tiny")  # its ids all fit the real vocabulary
    backbone = Kosmos2Model._from_config(Kosmos2Config(), dtype=torch.bfloat16)
    config = PolicyConfig(lora_r=32, lora_targets="all-linear", train_vision=False, window=2, chunk=10)
    policy = MobileVLAPolicy(config, backbone, processor.tokenizer)
    breakdown = trainable_breakdown(policy)
    assert breakdown["lora"] == lora_count(policy.kosmos, "all-linear", 32) == 43_089_920
    assert trainable_parameters(policy)["trainable"] == sum(breakdown.values())
    g = torch.Generator().manual_seed(0)
    batch = {
        "images": torch.randint(0, 256, (1, 2, 224, 224, 3), dtype=torch.uint8, generator=g),
        "instructions": [LEFT],
        "actions": torch.zeros(1, 2, 10, 2),
    }
    loss, _ = policy(batch)
    loss.backward()
    assert torch.isfinite(loss) and policy.action_token.grad.abs().sum() > 0
    assert all(p.grad is not None for n, p in policy.kosmos.named_parameters() if "lora_B" in n)
