"""Image normalisation, the prompt and the Kosmos-2 token layout: defined once, used by
training and serving alike.

Token layout of one frame (what `Kosmos2Processor` produces for `<image>`-first prompts,
plus one trailing slot for the learnable action token)::

    <s> <image> [latent_query_num image slots] </image> {prompt_for(instruction)} [action]
    ^0  ^1      ^2 ... ^(1+L)                  ^(2+L)   ...                      ^last

`image_embeds_position_mask` is 1 exactly at the L image slots. The action token is not a
vocabulary entry: its slot holds the eos id `</s>` in `input_ids` and the model replaces
that position's input embedding with the learnable `action_token` parameter; its last
hidden state is the frame's feature. Rows are padded on the right, so a frame's feature
never depends on what else is in the batch (causal attention, explicit position ids).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..data.instructions import TEMPLATES
from ..data.schema import DEFAULT_TARGET, IMAGE_SIZE

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PROMPT_TEMPLATE = "What action should the robot take to {instruction}?"
BOI_TOKEN = "<image>"
EOI_TOKEN = "</image>"

# Lower-case words and punctuation of the prompts and of every known wording of an instruction
# (the collector's and its paraphrases): the tiny test tokenizer's vocabulary.
_TEMPLATE_TEXT = re.sub(r"\{\w+\}", " ", " ".join((PROMPT_TEMPLATE, *TEMPLATES))).lower()
INSTRUCTION_WORDS = tuple(
    sorted(
        set(re.findall(r"\w+|[^\w\s]", _TEMPLATE_TEXT))
        | {"left", "right", DEFAULT_TARGET, "cup", "bottle", "basket", "box", "go", "forward", "back", "stop"}
        | {"turn", "move", "a", ".", ","}
    )
)


def normalise_images(images, dtype: torch.dtype = torch.float32, size: int = IMAGE_SIZE) -> torch.Tensor:
    """uint8 RGB (..., 224, 224, 3) -> CLIP-normalised float (..., 3, size, size).

    Equals the Kosmos-2 image processor (CLIPImageProcessor: rescale 1/255, CLIP mean/std)
    on frames that are already 224×224, which the window store guarantees. A smaller `size` (a
    vision tower for smaller images, the CPU preset's) area-averages the frames down first: the
    same pixels as normalising at 224 and averaging after (the normalisation is affine), with a
    quarter of the pixels to normalise at 112.
    """
    images = torch.as_tensor(np.asarray(images) if not torch.is_tensor(images) else images)
    if images.dtype != torch.uint8:
        raise TypeError(f"images must be uint8 RGB, got {images.dtype}")
    if images.dim() < 3 or tuple(images.shape[-3:]) != (IMAGE_SIZE, IMAGE_SIZE, 3):
        raise ValueError(f"images must be (..., {IMAGE_SIZE}, {IMAGE_SIZE}, 3), got {tuple(images.shape)}")
    mean = torch.tensor(CLIP_MEAN, device=images.device).view(3, 1, 1)
    std = torch.tensor(CLIP_STD, device=images.device).view(3, 1, 1)
    pixels = images.movedim(-1, -3).to(torch.float32)
    if size != IMAGE_SIZE:
        lead = pixels.shape[:-3]
        pixels = F.interpolate(pixels.reshape(-1, 3, IMAGE_SIZE, IMAGE_SIZE), size=(size, size), mode="area")
        pixels = pixels.reshape(*lead, 3, size, size)
    return ((pixels / 255.0 - mean) / std).to(dtype)


def normalise_actions(actions, action_scale: float) -> torch.Tensor:
    """Robot units (e.g. 0, ±1.15) -> the policy's normalised targets in [-1, 1]."""
    return (torch.as_tensor(actions, dtype=torch.float32) / action_scale).clamp(-1.0, 1.0)


def prompt_for(instruction: str) -> str:
    """The text after `</image>`, e.g. "What action should the robot take to navigate ...?"."""
    instruction = " ".join(instruction.split()).rstrip(".?!")
    if not instruction:
        raise ValueError("instruction is empty")
    return PROMPT_TEMPLATE.format(instruction=instruction[:1].lower() + instruction[1:])


@dataclass
class PromptBatch:
    input_ids: torch.Tensor  # (N, S) long
    attention_mask: torch.Tensor  # (N, S) long, 0 on right padding
    image_embeds_position_mask: torch.Tensor  # (N, S) long, L ones per row
    position_ids: torch.Tensor  # (N, S) long, Kosmos-2's padding-aware positions
    action_index: torch.Tensor  # (N,) long, position of the action slot

    def to(self, device) -> PromptBatch:
        return PromptBatch(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))


def encode_prompts(tokenizer, instructions: list[str], num_image_tokens: int) -> PromptBatch:
    """Token layout for one frame per instruction (see the module docstring)."""
    unk, pad, eos = tokenizer.unk_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id
    if None in (unk, pad, eos, tokenizer.bos_token_id):
        raise ValueError("the tokenizer needs bos, eos, pad and unk tokens")
    for token in (BOI_TOKEN, EOI_TOKEN):
        if tokenizer.convert_tokens_to_ids(token) in (None, unk):
            raise ValueError(f"the tokenizer has no {token} token (load it through the Kosmos-2 processor)")
    # The same string and the same id substitution as Kosmos2Processor (add_eos_token=False).
    image_info = " ".join([BOI_TOKEN] + [BOI_TOKEN] * num_image_tokens + [EOI_TOKEN])
    texts = [f"{tokenizer.bos_token}{image_info} {prompt_for(text).strip()}" for text in instructions]
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    image_ids = list(range(unk + 1, unk + 1 + num_image_tokens))
    rows = [ids[:2] + image_ids + ids[2 + num_image_tokens :] + [eos] for ids in encoded]
    length = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), length), pad, dtype=torch.long)
    attention = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention[i, : len(row)] = 1
    image_mask = torch.zeros_like(input_ids)
    image_mask[:, 2 : 2 + num_image_tokens] = 1
    # Kosmos2TextSinusoidalPositionalEmbedding.create_position_ids_from_input_ids
    positions = torch.cumsum(attention, dim=1) * attention + pad
    return PromptBatch(input_ids, attention, image_mask, positions, attention.sum(1) - 1)
