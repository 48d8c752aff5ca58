"""Kosmos-2 policy with a learnable action token and an LSTM policy head over the window.

Every frame of a window is encoded on its own with the instruction prompt
(`vla_pipeline.policy.preprocess` defines the layout); the last hidden state at the action-token
slot is the frame's feature. The head runs an LSTM over the window's features and emits,
at every frame, a chunk of `chunk` actions (linear_x, linear_y) in normalised units
[-1, 1] (tanh); robot units are normalised units × `config.action_scale`.

Batch for `MobileVLAPolicy.forward` (B windows of W frames):
    images        uint8 (B, W, 224, 224, 3) RGB, or float (B, W, 3, 224, 224) already
                  normalised with `normalise_images`
    instructions  list[str] of length B
    actions       float (B, W, chunk, 2): normalised targets, the chunk starting at each frame
    action_mask   bool (B, W, chunk), optional: False for steps beyond the episode end
"""

from __future__ import annotations

import contextlib
import itertools

import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from .backbone import load_backbone, local_backbone_dir, uses_local_build
from .policy_config import ADAPTER_DIR, CONFIG_FILE, WEIGHTS_FILE, PolicyConfig, read_policy_config
from .preprocess import PROMPT_TEMPLATE, encode_prompts, normalise_images
from ..data.schema import DEAD_BAND, IMAGE_SIZE


def lora_target_modules(kosmos: nn.Module, targets: str) -> list[str]:
    """Names of the Linear layers LoRA wraps for a `lora_targets` value (also on a model
    that already has LoRA injected: a wrapped layer is reported by its own name)."""
    prefixes = {"text": ("text_model.",), "text+vision": ("text_model.", "vision_model."), "all-linear": ("",)}
    if targets not in prefixes:
        raise ValueError(f"unknown lora_targets {targets!r}")
    names = []
    for name, module in kosmos.named_modules():
        if not isinstance(module, nn.Linear) or ".lora_" in name or name.endswith("lm_head"):
            continue
        name = name.removesuffix(".base_layer")
        if name.startswith(prefixes[targets]):
            names.append(name)
    return names


# ---------------------------------------------------------------- the policy


class PolicyHead(nn.Module):
    """LSTM over per-frame features -> MLP -> actions (B, W, chunk, action_dim) in [-1, 1].

    "regression": the MLP emits one value per chunk step and axis, squashed by tanh.
    "classification": it emits 3 logits per chunk step and axis for the normalised values
    (-1, 0, +1) (teleop actions are only 0 and ±scale), trained by cross-entropy; the action
    is the expected value under their softmax (decode "expected") or the most likely value
    ("argmax").
    "joint": it emits 3 ** action_dim logits per chunk step, one per combination of (-1, 0, +1)
    on every axis (a key press, or the stop), trained by cross-entropy: the most likely
    combination is one action, where the axes' separate most likely values can combine into an
    action nobody pressed (unsure between strafing left and right while not driving forward, the
    separate argmaxes make a stop).
    """

    CLASS_VALUES = (-1.0, 0.0, 1.0)

    def __init__(self, in_dim: int, hidden: int, layers: int, chunk: int, action_dim: int,
                 kind: str = "regression", side_probe: bool = False, decode: str = "expected"):
        super().__init__()
        self.chunk, self.action_dim, self.kind, self.decode_mode = chunk, action_dim, kind, decode
        self.outputs_per_action = len(self.CLASS_VALUES) if kind == "classification" else 1
        outputs = chunk * (len(self.CLASS_VALUES) ** action_dim if kind == "joint" else action_dim * self.outputs_per_action)
        # "joint": the combinations' values (3 ** action_dim, action_dim), the first axis slowest,
        # and each axis's place in a combination's index.
        self.register_buffer("combinations", torch.tensor(list(itertools.product(self.CLASS_VALUES, repeat=action_dim))),
                             persistent=False)
        self.register_buffer("places", len(self.CLASS_VALUES) ** torch.arange(action_dim - 1, -1, -1), persistent=False)
        self.lstm = nn.LSTM(in_dim, hidden, num_layers=layers, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, outputs))
        # Training only: a linear read-out of the instruction's side from each frame's feature.
        self.side_probe = nn.Linear(in_dim, 1) if side_probe else None

    def raw(self, features: torch.Tensor) -> torch.Tensor:
        """Pre-activation outputs: (B, W, chunk, action_dim); classifying, (..., 3) logits; joint,
        (B, W, chunk, 3 ** action_dim) logits."""
        batch, window = features.shape[:2]
        # On a CPU, autocast would run the LSTM in bf16 through oneDNN, which has no bf16 LSTM on
        # CPUs without bf16 instructions ("could not create a primitive descriptor"); the head is
        # small and trained in fp32 anyway, so there it runs in fp32.
        with torch.autocast("cpu", enabled=False) if features.device.type == "cpu" else contextlib.nullcontext():
            out, _ = self.lstm(features.float())
        if self.kind == "joint":
            return self.mlp(out).view(batch, window, self.chunk, len(self.combinations))
        out = self.mlp(out).view(batch, window, self.chunk, self.action_dim, self.outputs_per_action)
        return out if self.kind == "classification" else out.squeeze(-1)

    def decode(self, raw: torch.Tensor) -> torch.Tensor:
        if self.kind in ("classification", "joint"):
            values = self.combinations.to(raw.dtype) if self.kind == "joint" else raw.new_tensor(self.CLASS_VALUES)
            return values[raw.argmax(-1)] if self.decode_mode == "argmax" else raw.softmax(-1) @ values
        return torch.tanh(raw)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.decode(self.raw(features))


def _param_group(name: str) -> str:
    if "lora_" in name:
        return "lora"
    if name.startswith("vision_model."):
        return "vision"
    if name.startswith("text_model.model.embed_tokens."):
        return "text_embedding"
    if name.startswith("text_model.model.layers."):
        return "decoder_layers"
    return "other"


class MobileVLAPolicy(nn.Module):
    """Kosmos-2 backbone (optionally LoRA-wrapped) + action token + LSTM head.

    Build with `build_policy(config)`; `adapter_dir` loads a saved LoRA adapter instead of
    initialising a fresh one. Parameter initialisation is seeded by `config.seed` without
    touching the global RNG.
    """

    def __init__(self, config: PolicyConfig, backbone: nn.Module, tokenizer, adapter_dir=None):
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer
        self.num_image_tokens = int(backbone.config.latent_query_num)
        hidden = int(backbone.config.text_config.embed_dim)
        device = next(backbone.parameters()).device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), warnings.catch_warnings():
            # peft 0.21 reads the `is_gradient_checkpointing` alias that transformers 5.23 deprecates
            warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
            torch.manual_seed(config.seed)
            self.action_token = nn.Parameter(torch.randn(hidden) * 0.02)
            self.head = PolicyHead(hidden, config.lstm_hidden, config.lstm_layers, config.chunk, config.action_dim,
                                   config.action_head, side_probe=config.side_loss_weight > 0,
                                   decode=config.action_decode)
            if config.lora_enable:
                from peft import LoraConfig, PeftModel, get_peft_model

                if adapter_dir is not None:
                    backbone = PeftModel.from_pretrained(backbone, str(adapter_dir), is_trainable=True)
                else:
                    lora = LoraConfig(
                        r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                        target_modules=lora_target_modules(backbone, config.lora_targets), bias="none",
                    )
                    backbone = get_peft_model(backbone, lora)
        self.backbone = backbone
        self._prompts: dict = {}  # (instructions, device) -> PromptBatch: each prompt tokenised once
        self.backbone_call = None  # a compiled backbone (`compile_backbone`), else the module itself
        if config.gradient_checkpointing:
            # transformers 5.23 renamed gradient_checkpointing_enable; older 5.x has the old name only.
            (getattr(self.kosmos, "activation_checkpointing_enable", None) or self.kosmos.gradient_checkpointing_enable)()
        apply_trainability(self)

    @property
    def kosmos(self) -> nn.Module:
        """The Kosmos2Model itself (LoRA layers injected in place when enabled)."""
        return self.backbone.get_base_model() if self.config.lora_enable else self.backbone

    # -- encoding ------------------------------------------------------------------

    def normalise(self, images) -> torch.Tensor:
        """uint8 RGB frames (..., 224, 224, 3) -> normalised pixels (..., 3, S, S) at the vision
        tower's size S (224, or a CPU preset's smaller one, area-averaged down before normalising)."""
        return normalise_images(images, size=int(self.kosmos.config.vision_config.image_size))

    def encode_images(self, pixel_values: torch.Tensor, instructions: list[str], compiled: bool = True) -> torch.Tensor:
        """Normalised frames (N, 3, 224, 224), or at the vision tower's size (`normalise`), + one
        instruction each -> features (N, hidden).
        `compiled=False` runs the backbone eagerly even where `compile_backbone` was called."""
        if len(instructions) != len(pixel_values):
            raise ValueError(f"{len(pixel_values)} frames but {len(instructions)} instructions")
        device = self.action_token.device
        prompts = self.prompt_batch(tuple(instructions), device)
        kosmos = self.kosmos
        vision_dtype = kosmos.vision_model.model.embeddings.patch_embedding.weight.dtype
        pixel_values = pixel_values.to(device=device, dtype=vision_dtype)
        size = int(kosmos.config.vision_config.image_size)
        if tuple(pixel_values.shape[-2:]) != (size, size):
            # A vision tower for smaller images (a CPU preset): area-average the 224×224 frames down.
            pixel_values = F.interpolate(pixel_values, size=(size, size), mode="area")
        call = self.backbone_call if compiled and self.backbone_call is not None else self.frame_features
        return call(
            pixel_values, prompts.input_ids, prompts.attention_mask, prompts.image_embeds_position_mask,
            prompts.position_ids, prompts.action_index,
        )

    def frame_features(self, pixel_values, input_ids, attention_mask, image_mask, position_ids,
                       action_index) -> torch.Tensor:
        """The backbone's last hidden state at each prompt's action slot (N, hidden), in fp32."""
        tokens = self.kosmos.get_input_embeddings()(input_ids)
        slot = F.one_hot(action_index, tokens.shape[1]).bool().unsqueeze(-1)
        inputs_embeds = torch.where(slot, self.action_token.to(tokens.dtype), tokens)
        hidden = self.backbone_hidden(pixel_values, inputs_embeds, attention_mask, image_mask, position_ids)
        rows = torch.arange(len(pixel_values), device=hidden.device)
        return hidden[rows, action_index].float()

    def backbone_hidden(self, pixel_values, inputs_embeds, attention_mask, image_mask, position_ids) -> torch.Tensor:
        """Kosmos2Model.forward's last hidden state, with the image embeddings placed by a gather
        instead of its boolean-mask write: no host sync, so the call can be captured in a CUDA graph."""
        kosmos = self.kosmos
        image_embeds = kosmos.get_image_features(pixel_values, return_dict=True).pooler_output
        slot = image_mask.bool().unsqueeze(-1)
        order = (image_mask.cumsum(1) - 1).clamp(min=0)  # row r's k-th image slot takes latent k
        placed = image_embeds.to(inputs_embeds.dtype).gather(
            1, order.unsqueeze(-1).expand(-1, -1, image_embeds.shape[-1]))
        return kosmos.text_model(inputs_embeds=torch.where(slot, placed, inputs_embeds),
                                 attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
                                 return_dict=True).last_hidden_state

    def prompt_batch(self, instructions: tuple[str, ...], device):
        """The tokenised prompts of `instructions` on `device`, built once and kept (bounded)."""
        key = (instructions, str(device))
        if key not in self._prompts:
            if len(self._prompts) >= 512:
                self._prompts.clear()
            self._prompts[key] = encode_prompts(self.tokenizer, list(instructions), self.num_image_tokens).to(device)
        return self._prompts[key]

    def compile_backbone(self) -> None:
        """A step that pays one launch, not one per kernel: on a GPU the backbone is captured in
        CUDA graphs (one per input shape); elsewhere `torch.compile` runs it. Once: a policy
        compiled before keeps its backbone call and the graphs captured so far."""
        if self.backbone_call is not None:
            return
        if self.action_token.is_cuda:
            from .cuda_graphs import GraphedCall

            self.backbone_call = GraphedCall(self.frame_features)
        else:
            self.backbone_call = torch.compile(self.frame_features, dynamic=False)

    def encode_frames(self, images: torch.Tensor, instructions: list[str]) -> torch.Tensor:
        """Images (B, W, ...) (see module docstring) + B instructions -> features (B, W, hidden)."""
        images = torch.as_tensor(images)
        batch, window = images.shape[:2]
        if len(instructions) != batch:
            raise ValueError(f"{batch} windows but {len(instructions)} instructions")
        if images.dtype == torch.uint8:
            pixels = self.normalise(images)
        elif tuple(images.shape[2:]) != (3, IMAGE_SIZE, IMAGE_SIZE):
            raise ValueError(f"float images must be (B, W, 3, {IMAGE_SIZE}, {IMAGE_SIZE}), got {tuple(images.shape)}")
        else:
            pixels = images
        per_frame = [text for text in instructions for _ in range(window)]
        features = self.encode_images(pixels.flatten(0, 1), per_frame)
        return features.view(batch, window, -1)

    # -- training and inference ----------------------------------------------------

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict]:
        """(loss, info): Huber loss (regression head) or cross-entropy over the classes -1, 0, +1
        (classification head) over every frame × valid chunk step (shapes: module docstring).

        A batch of whole episodes (`lengths` (B,) given; images (B, T, ...), actions (B, T, chunk, 2),
        action_mask (B, T, chunk), padded past each length) is trained as all its windows are, with
        the same loss, but each frame encoded once: the windows are cut from the frames' features."""
        if batch.get("lengths") is not None:
            return self._episode_forward(batch)
        features = self.encode_frames(batch["images"], batch["instructions"])
        sides = batch.get("sides")
        side_loss = self._side_loss(features, sides) if sides is not None else None
        return self._action_loss(features, batch["actions"], batch.get("action_mask"), side_loss)

    def _episode_forward(self, batch: dict) -> tuple[torch.Tensor, dict]:
        images = torch.as_tensor(batch["images"])
        lengths = torch.as_tensor(batch["lengths"]).to(images.device)
        episodes, longest = images.shape[:2]
        valid = torch.arange(longest, device=images.device) < lengths[:, None]  # (B, T) recorded frames
        pixels = self.normalise(images[valid]) if images.dtype == torch.uint8 else images[valid]
        per_frame = [text for text, n in zip(batch["instructions"], lengths.tolist()) for _ in range(n)]
        encoded = self.encode_images(pixels, per_frame)
        W = self.config.window
        if longest < W:  # EpisodeDataset holds only episodes with a training window
            raise ValueError(f"whole episodes need at least window={W} frames, the longest has {longest}")
        features = encoded.new_zeros(episodes, longest, encoded.shape[-1])
        features[valid.to(encoded.device)] = encoded

        def windows(x) -> torch.Tensor:  # (B, T, ...) -> (B × (T - W + 1), W, ...)
            return torch.as_tensor(x, device=encoded.device).unfold(1, W, 1).movedim(-1, 2).flatten(0, 1)

        # The windows of starts 0 … length - W only, as the windows batching has them (later ones run
        # into the padding).
        starts = torch.arange(longest - W + 1, device=encoded.device)
        whole = (starts[None] <= (lengths.to(encoded.device) - W)[:, None]).flatten()[:, None]  # (N, 1)
        feature_windows = windows(features)
        sides = batch.get("sides")
        side_loss = None
        if sides is not None:
            side_loss = self._side_loss(feature_windows, [side for side in sides for _ in starts], whole.expand(-1, W))
        return self._action_loss(feature_windows, windows(batch["actions"]),
                                 windows(batch["action_mask"]) & whole[..., None], side_loss)

    def _side_loss(self, features: torch.Tensor, sides: list, valid: torch.Tensor | None = None):
        """The side probe's BCE over the frames (B, W) of the windows whose side is known, or None."""
        if self.head.side_probe is None:
            return None
        # Side supervision: every frame's feature must tell "left" from "right" (the mirrored
        # side for mirrored windows), so the instruction reaches the action token early on.
        known = torch.tensor([side in ("left", "right") for side in sides], device=features.device)
        if not known.any():
            return None
        labels = torch.tensor([float(side == "left") for side in sides], device=features.device)
        logits = self.head.side_probe(features.float()).squeeze(-1)  # (B, W)
        targets = labels[:, None].expand_as(logits)
        keep = known[:, None].expand_as(logits) if valid is None else known[:, None] & valid.to(features.device)
        return F.binary_cross_entropy_with_logits(logits[keep], targets[keep])

    def _action_loss(self, features: torch.Tensor, actions, mask, side_loss) -> tuple[torch.Tensor, dict]:
        raw = self.head.raw(features)
        pred = self.head.decode(raw)
        target = torch.as_tensor(actions, device=pred.device, dtype=pred.dtype)
        if target.shape != pred.shape:
            raise ValueError(f"actions must be {tuple(pred.shape)} (B, W, chunk, dims), got {tuple(target.shape)}")
        mask = torch.ones(pred.shape[:-1], dtype=torch.bool, device=pred.device) if mask is None else mask
        weight = torch.as_tensor(mask, device=pred.device).to(pred.dtype)
        if self.config.stop_loss_weight != 1.0:  # a recorded stop: both components (near) zero
            stop = (target.abs() <= DEAD_BAND).all(dim=-1)  # targets are in units of action_scale
            weight = weight * torch.where(stop, self.config.stop_loss_weight, 1.0).to(pred.dtype)
        weight = weight.unsqueeze(-1).expand_as(pred)
        denom = weight.sum().clamp_min(1.0)
        classes = (target.round().clamp(-1, 1) + 1).long()  # -1, 0, +1 -> 0, 1, 2
        if self.head.kind == "joint":  # one cross-entropy per chunk step, over the combinations
            joint = (classes * self.head.places).sum(-1)
            per_step = F.cross_entropy(raw.flatten(0, -2), joint.flatten(), reduction="none").view_as(joint)
            per_step = per_step.unsqueeze(-1).expand_as(pred)  # each axis's weight: the step's mean
        elif self.head.kind == "classification":
            per_step = F.cross_entropy(raw.flatten(0, -2), classes.flatten(), reduction="none").view_as(pred)
        else:
            per_step = F.smooth_l1_loss(pred, target, reduction="none", beta=self.config.huber_delta)
        loss = (per_step * weight).sum() / denom
        with torch.no_grad():
            mae = ((pred - target).abs() * weight).sum() / denom * self.config.action_scale
        info = {"loss": float(loss.detach()), "mae_robot_units": float(mae), "valid_steps": int(weight[..., 0].sum())}
        if side_loss is not None:
            loss = loss + self.config.side_loss_weight * side_loss
            info["side_loss"] = float(side_loss.detach())
            info["loss"] = float(loss.detach())
        return loss, info

    @torch.no_grad()
    def predict(self, images: torch.Tensor, instructions: list[str]) -> torch.Tensor:
        """(B, chunk, action_dim) actions in robot units for the last frame of each window (eval mode)."""
        was_training = self.training
        self.eval()
        try:
            actions = self.head(self.encode_frames(images, instructions))[:, -1]
        finally:
            self.train(was_training)
        return actions * self.config.action_scale

    # -- what trains and what is saved ---------------------------------------------

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Everything that trains except LoRA matrices (peft saves those): token, head, backbone parts."""
        state = {"action_token": self.action_token}
        state.update({f"head.{name}": p for name, p in self.head.named_parameters()})
        state.update(
            {f"backbone.{name}": p for name, p in self.kosmos.named_parameters() if p.requires_grad and "lora_" not in name}
        )
        return state

    def saved_state(self) -> dict[str, torch.Tensor]:
        """What a policy folder holds: `trainable_state`, and on the grounded preset without LoRA its
        frozen backbone parts too. Those come from a build that trains (`grounding.py`) into a cache
        folder: neither bit-for-bit the same on another machine nor the same after a version bump, so
        the policy keeps the ones it trained with (~1 MB)."""
        state = self.trainable_state()
        if self.config.preset == "grounded" and not self.config.lora_enable:
            state.update({f"backbone.{name}": p for name, p in self.kosmos.named_parameters()})
        return state


def apply_trainability(policy: MobileVLAPolicy) -> None:
    """Set requires_grad on every parameter by the rules in `vla_pipeline.policy.policy_config`."""
    config = policy.config
    kosmos = policy.kosmos
    layers = int(kosmos.config.text_config.layers)
    first_trained_layer = layers - config.train_decoder_layers if config.train_decoder_layers > 0 else layers
    for name, param in kosmos.named_parameters():
        group = _param_group(name)
        if group == "lora":
            param.requires_grad_(True)
            continue
        trainable = not (config.freeze_backbone or config.lora_enable)
        if group == "vision":
            trainable = config.train_vision
        elif group == "text_embedding":
            trainable = config.train_text_embedding
        elif group == "decoder_layers" and int(name.split(".")[3]) >= first_trained_layer:
            trainable = True
        param.requires_grad_(trainable)
    policy.action_token.requires_grad_(True)
    policy.head.requires_grad_(True)


def trainable_parameters(model: nn.Module) -> dict[str, int]:
    """{"trainable": int, "total": int} over the model's (deduplicated) parameters."""
    params = list(model.parameters())
    return {"trainable": sum(p.numel() for p in params if p.requires_grad), "total": sum(p.numel() for p in params)}


def trainable_breakdown(policy: MobileVLAPolicy) -> dict[str, int]:
    """Trainable parameter counts by group: action_token, head, lora, vision, text_embedding,
    decoder_layers, other (LoRA matrices count as "lora" wherever they sit)."""
    counts = dict.fromkeys(["action_token", "head", "lora", "vision", "text_embedding", "decoder_layers", "other"], 0)
    counts["action_token"] = policy.action_token.numel()
    counts["head"] = sum(p.numel() for p in policy.head.parameters() if p.requires_grad)
    for name, param in policy.kosmos.named_parameters():
        if param.requires_grad:
            counts[_param_group(name)] += param.numel()
    return counts


# ---------------------------------------------------------------- build, save, load


def build_policy(config: PolicyConfig, dtype: torch.dtype | None = None, adapter_dir=None) -> MobileVLAPolicy:
    """Load the backbone through `from_pretrained` and wrap it (fresh head, fresh LoRA)."""
    backbone, tokenizer = load_backbone(config, dtype=dtype)
    return MobileVLAPolicy(config, backbone, tokenizer, adapter_dir=adapter_dir)


def save_policy(policy: MobileVLAPolicy, directory) -> Path:
    """Write only what trains: policy_config.json, policy.safetensors, adapter/ (LoRA)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if policy.config.lora_enable:
        policy.backbone.save_pretrained(str(directory / ADAPTER_DIR), save_embedding_layers=False)
    state = {name: t.detach().to("cpu").contiguous().clone() for name, t in policy.saved_state().items()}
    save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": "pt", "prompt_template": PROMPT_TEMPLATE})
    (directory / CONFIG_FILE).write_text(policy.config.to_json() + "\n")
    return directory


def _holds_the_tower(directory: Path) -> bool:
    from safetensors import safe_open

    if not (directory / WEIGHTS_FILE).is_file():
        return False  # the load below says what is missing
    with safe_open(str(directory / WEIGHTS_FILE), "pt") as weights:
        return any(key.startswith("backbone.vision_model.") for key in weights.keys())


def load_policy_dir(
    directory, backbone_override=None, dtype: torch.dtype | None = None, into: MobileVLAPolicy | None = None
) -> MobileVLAPolicy:
    """Rebuild a saved policy: config -> backbone (from_pretrained) -> LoRA adapter -> the rest.

    `backbone_override` replaces the saved backbone id/dir (e.g. a local mirror). Returns
    the policy in eval mode. With `into`, the saved weights are loaded in place into that
    policy instead (same config required; its mode and parameter objects are kept, e.g. to
    resume training with an existing optimizer).
    """
    directory = Path(directory)
    config = read_policy_config(directory)
    if backbone_override is not None:
        config = config.replace(backbone=str(backbone_override))
    elif config.backbone == ".":  # a deploy bundle: the backbone is the folder itself
        config = config.replace(backbone=str(directory))
    elif config.preset == "grounded" and uses_local_build(config) and _holds_the_tower(directory):
        # The folder holds its whole backbone (`saved_state`): the small build, seconds to make, gives the
        # same architecture and processor without the grounded build's minutes of pretraining.
        config = config.replace(backbone=str(local_backbone_dir("small")))
    adapter = directory / ADAPTER_DIR if config.lora_enable else None
    if adapter is not None and not (adapter / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{adapter}: LoRA adapter missing (config has lora_enable)")
    if into is None:
        policy = build_policy(config, dtype=dtype, adapter_dir=adapter)
    else:
        policy = into
        if policy.config.replace(backbone=config.backbone) != config:
            raise ValueError(f"{directory}: saved config differs from the policy's: {config} vs {policy.config}")
        if adapter is not None:
            from peft import load_peft_weights, set_peft_model_state_dict

            result = set_peft_model_state_dict(policy.backbone, load_peft_weights(str(adapter)))
            missing = [key for key in result.missing_keys if "lora_" in key]
            if missing or result.unexpected_keys:
                raise ValueError(f"{adapter}: adapter does not match: missing {missing[:5]}, "
                                 f"unexpected {list(result.unexpected_keys)[:5]}")
    saved = load_file(str(directory / WEIGHTS_FILE))
    expected, kept = policy.trainable_state(), policy.saved_state()
    # A folder without the frozen parts (written before they were kept) takes them from the build.
    missing, extra = sorted(set(expected) - set(saved)), sorted(set(saved) - set(kept))
    if missing or extra:
        raise ValueError(f"{directory / WEIGHTS_FILE} does not match the config: missing {missing[:5]}, extra {extra[:5]}")
    with torch.no_grad():
        for name in saved:
            kept[name].copy_(saved[name].to(kept[name].dtype))
    return policy if into is not None else policy.eval()
