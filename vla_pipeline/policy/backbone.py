"""Kosmos-2 backbones: the ones built in-process from a config (random init, deterministic, no
download) and the loading of any backbone, hub id or folder, through `from_pretrained`."""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ..settings import settings
from .hub import resolve_backbone
from .policy_config import PolicyConfig
from .preprocess import CLIP_MEAN, CLIP_STD, INSTRUCTION_WORDS
from ..data.schema import IMAGE_SIZE

TINY_SEED = 0
TINY_VERSION = 1
SMALL_SEED = 0
SMALL_VERSION = 1
GROUNDED_VERSION = 2


def _tiny_tokenizer():
    """A word-level tokenizer over the prompt vocabulary, with Kosmos-2's special ids."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<s>", "<pad>", "</s>", "<unk>"]  # ids 0..3 as in Kosmos-2 (XLM-R order)
    words = sorted(set(INSTRUCTION_WORDS))
    vocab = {token: i for i, token in enumerate(specials + words)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


# Backbones built in-process from a config (random init, no download), by preset.
LOCAL_BACKBONES = {
    # The test/CI backbone: as small as Kosmos-2 gets; never learns the task.
    "tiny": dict(
        text=dict(embed_dim=64, layers=2, ffn_dim=128, attention_heads=4, init_std=0.1),
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                    image_size=IMAGE_SIZE, patch_size=16),
        latent_query_num=8, seed=TINY_SEED, version=TINY_VERSION, image_signal_init=False,
    ),
    # The CPU preset's small Kosmos-2 (its backbone is "grounded", below; this random one still trains
    # in full in a few minutes on 2 cores, benchmarks/learning.py). Its vision tower sees the 224×224
    # frames area-averaged to 112×112.
    "small": dict(
        text=dict(embed_dim=64, layers=2, ffn_dim=128, attention_heads=2, init_std=0.1),
        vision=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                    image_size=112, patch_size=16),
        latent_query_num=8, seed=SMALL_SEED, version=SMALL_VERSION, image_signal_init=True,
    ),
}
# "small", then its vision tower and projection pretrained to ground the room's objects in rendered
# frames (`grounding.pretrain_grounding`; ~3 min on 2 cores, once per cache folder).
LOCAL_BACKBONES["grounded"] = dict(copy.deepcopy(LOCAL_BACKBONES["small"]), version=GROUNDED_VERSION,
                                   grounding=dict(scenes=300, epochs=6, seed=0))


def _print(line: str) -> None:
    print(line, flush=True)


def build_local_backbone(preset: str, log: Callable[[str], None] = _print):
    """(Kosmos2Model, Kosmos2Processor) of a LOCAL_BACKBONES preset, with a deterministic init;
    `log` gets a build's progress lines (the grounded preset's pretraining).

    The processor's tokenizer gets Kosmos-2's tag tokens (`<image>`, `</image>`, ...) added
    by `Kosmos2Processor` itself, exactly as for the hub checkpoint.

    `image_signal_init`: Kosmos-2's own init leaves a random model blind. The image-to-text
    projection's keys/values are the image features (unit-normalised, then a Linear with
    std init_std) next to the latent queries (std 1), so the queries' own values swamp the
    image's ~50:1 and the action token's feature barely changes from frame to frame; training
    then sits on the constant-action plateau. Latent queries scaled by 0.1 and the projection's
    Linear drawn with std 1 give image tokens of unit size per dimension instead.
    """
    from transformers import CLIPImageProcessorPil, Kosmos2Config, Kosmos2Model, Kosmos2Processor

    spec = LOCAL_BACKBONES[preset]
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD),
    )
    processor = Kosmos2Processor(image_processor, _tiny_tokenizer())
    config = Kosmos2Config(
        text_config=dict(vocab_size=len(processor.tokenizer), max_position_embeddings=256, **spec["text"]),
        vision_config=dict(spec["vision"]),
        latent_query_num=spec["latent_query_num"],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec["seed"])
        model = Kosmos2Model(config)
        if spec["image_signal_init"]:
            with torch.no_grad():
                projection = model.image_to_text_projection
                projection.latent_query.mul_(0.1)
                projection.dense.weight.normal_(0.0, 1.0)
    if "grounding" in spec:
        from .grounding import pretrain_grounding

        pretrain_grounding(model, **spec["grounding"], log=log)
    return model, processor


def save_local_backbone(directory, preset: str = "tiny", log: Callable[[str], None] = _print) -> Path:
    """Write a local backbone (model + processor) with `save_pretrained`; load it back
    through the same `from_pretrained` path as the hub checkpoint."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model, processor = build_local_backbone(preset, log)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def local_backbone_dir(preset: str = "tiny", log: Callable[[str], None] = _print) -> Path:
    """The cached backbone of a local preset ($VLA_TINY_BACKBONE / $VLA_SMALL_BACKBONE /
    $VLA_GROUNDED_BACKBONE or a folder under the temp dir), built once; `log` gets a line when it
    is built, and the build's own."""
    version = LOCAL_BACKBONES[preset]["version"]
    default = Path(tempfile.gettempdir()) / f"vla_pipeline-kosmos2-{preset}-v{version}"
    target = getattr(settings(), f"{preset}_backbone") or default
    if not (target / "config.json").is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
        log(f"building the {preset} backbone into {target} (once per folder)")
        started = time.perf_counter()
        save_local_backbone(staging, preset, log)
        log(f"built the {preset} backbone in {time.perf_counter() - started:.0f} s")
        try:
            os.replace(staging, target)
        except OSError:  # another process got there first
            shutil.rmtree(staging, ignore_errors=True)
    return target


def load_backbone(config: PolicyConfig, dtype: torch.dtype | None = None):
    """(Kosmos2Model, tokenizer) through `from_pretrained`, for the hub id and local dirs alike.

    The tokenizer comes from the Kosmos-2 processor, which adds the `<image>` tag tokens.
    """
    from transformers import Kosmos2Model

    source, options = backbone_source(config)
    # PyTorch's fused scaled-dot-product attention (flash / memory-efficient kernels on a GPU).
    model = Kosmos2Model.from_pretrained(source, dtype=dtype or torch.float32, attn_implementation="sdpa", **options)
    return model, load_processor(config).tokenizer


def backbone_source(config: PolicyConfig) -> tuple[str, dict]:
    """(what `from_pretrained` loads, its options) for the config's backbone: a local preset's
    cached build, a folder, a cached hub checkpoint or the hub (`hub.resolve_backbone`)."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # the pipeline prints its own progress lines
    source = str(local_backbone_dir(config.preset)) if uses_local_build(config) else config.backbone
    return resolve_backbone(source)


def uses_local_build(config: PolicyConfig) -> bool:
    """Whether the config's backbone is its local preset's cached build (no folder named instead)."""
    return config.preset in LOCAL_BACKBONES and not Path(config.backbone).is_dir()


def load_processor(config: PolicyConfig):
    """The backbone's Kosmos-2 processor; its tokenizer carries the `<image>` tag tokens."""
    from transformers import AutoProcessor

    source, options = backbone_source(config)
    return AutoProcessor.from_pretrained(source, **options)
