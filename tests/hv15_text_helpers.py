"""Write a tiny HunyuanVideo-1.5 text-encoder pair to disk in the official and the diffusers layout."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from hvbatch.models.hunyuan_video_15.glyph import (
    COLOR_ASSET,
    FONT_ASSET,
    GLYPH_CHECKPOINT,
    TINY_COLORS,
    TINY_FONTS,
    WRAPPED_PREFIX,
)
from hvbatch.models.hunyuan_video_15.text_encoders import HunyuanVideo15TextEncoder

BYT5_BASE_VOCAB = 384


def write_official(encoder: HunyuanVideo15TextEncoder, root: Path) -> Path:
    """`root/text_encoder/{llm, byt5-small, Glyph-SDXL-v2}` as the official download lays them out.

    `llm/` holds a whole Qwen2.5-VL model (vision tower and lm_head included) whose text model is
    `encoder.llm`; `byt5-small/` byT5's config (base vocabulary) and tokenizer; the Glyph
    checkpoint the encoder stack's tensors.
    """
    from transformers import ByT5Tokenizer, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    text = root / "text_encoder"
    text_config = encoder.llm.config.to_dict()
    vision = {"depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2}
    vision |= {"out_hidden_size": encoder.llm.config.hidden_size, "fullatt_block_indexes": [0]}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(123)
        full = Qwen2_5_VLForConditionalGeneration(
            Qwen2_5_VLConfig(text_config=text_config, vision_config=vision)
        )
    full.model.language_model.load_state_dict(encoder.llm.state_dict())
    full.save_pretrained(text / "llm")
    encoder.llm_tokenizer.save_pretrained(text / "llm")

    byt5 = text / "byt5-small"
    config = encoder.glyph.model.config.to_dict()
    (byt5 / "config.json").parent.mkdir(parents=True, exist_ok=True)
    (byt5 / "config.json").write_text(json.dumps({**config, "vocab_size": BYT5_BASE_VOCAB}))
    ByT5Tokenizer().save_pretrained(byt5)

    glyph = text / "Glyph-SDXL-v2"
    for asset, content in ((COLOR_ASSET, TINY_COLORS), (FONT_ASSET, TINY_FONTS)):
        (glyph / asset).parent.mkdir(parents=True, exist_ok=True)
        (glyph / asset).write_text(json.dumps(content))
    return write_glyph_checkpoint(encoder, root)


def write_glyph_checkpoint(encoder: HunyuanVideo15TextEncoder, root: Path, *, wrapped: bool = False) -> Path:
    """`Glyph-SDXL-v2/checkpoints/byt5_model.pt`: bare, or under `state_dict` as a training run saves it."""
    glyph = root / "text_encoder" / "Glyph-SDXL-v2"
    state = encoder.glyph.model.encoder.state_dict()
    if wrapped:
        wrapped_state = {WRAPPED_PREFIX + k: v for k, v in state.items()}
        wrapped_state["module.text_tower.projection.weight"] = torch.zeros(2, 2)
        checkpoint: dict[str, object] = {"state_dict": wrapped_state, "epoch": 3}
    else:
        checkpoint = dict(state)
    (glyph / GLYPH_CHECKPOINT).parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, glyph / GLYPH_CHECKPOINT)
    return root


def write_diffusers(encoder: HunyuanVideo15TextEncoder, root: Path) -> Path:
    """`text_encoder/`, `tokenizer/`, `text_encoder_2/`, `tokenizer_2/` as diffusers' conversion saves."""
    encoder.llm.save_pretrained(root / "text_encoder")
    encoder.llm_tokenizer.save_pretrained(root / "tokenizer")
    encoder.glyph.model.save_pretrained(root / "text_encoder_2")
    encoder.glyph.tokenizer.save_pretrained(root / "tokenizer_2")
    return root
