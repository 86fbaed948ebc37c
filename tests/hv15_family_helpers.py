"""Whole HunyuanVideo-1.5 checkpoint folders with random weights, in the diffusers and official layouts.

Small architectures that each layout can describe: diffusers fixes the byT5 hidden width at 2048,
the official config the glyph width at 1472 and two refiner blocks. The diffusers folder is what
diffusers' own classes save (`save_pretrained`); the official one is written in the official names.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from hvbatch.models.hunyuan_video_15.config import HunyuanVideo15TransformerConfig
from hvbatch.models.hunyuan_video_15.glyph import TINY_COLORS, TINY_FONTS, GlyphEncoder, glyph_special_tokens
from hvbatch.models.hunyuan_video_15.text_encoders import (
    HunyuanVideo15TextEncoder,
    tiny_llm,
    tiny_text_encoder_15,
)
from hvbatch.models.hunyuan_video_15.transformer_loading import random_transformer
from hvbatch.models.hunyuan_video_15.vae_config import HunyuanVideo15VaeConfig
from hvbatch.models.hunyuan_video_15.vae_loading import random_vae
from tests.hv15_helpers import randomize_fan_in_
from tests.hv15_text_helpers import write_diffusers, write_official

DIFFUSERS_ARCH = HunyuanVideo15TransformerConfig(
    num_heads=4,
    head_dim=16,
    num_double_blocks=2,
    num_refiner_blocks=1,
    rope_axes_dim=[4, 6, 6],
    text_dim=64,
    glyph_dim=24,
    image_embed_dim=24,
)
OFFICIAL_ARCH = HunyuanVideo15TransformerConfig(
    num_heads=4, head_dim=16, num_double_blocks=1, rope_axes_dim=[4, 6, 6], text_dim=64, image_embed_dim=24
)
WEIGHTS = "diffusion_pytorch_model.safetensors"


def diffusers_transformer(
    config: HunyuanVideo15TransformerConfig, seed: int, **extra: Any
) -> torch.nn.Module:
    from diffusers import HunyuanVideo15Transformer3DModel

    kwargs = {k: v for k, v in config.to_diffusers_config().items() if not k.startswith("_")}
    model = HunyuanVideo15Transformer3DModel(**kwargs, **extra).eval()
    return randomize_fan_in_(model, seed)


def diffusers_vae() -> torch.nn.Module:
    from diffusers import AutoencoderKLHunyuanVideo15

    config = HunyuanVideo15VaeConfig.tiny().to_diffusers_config()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        return AutoencoderKLHunyuanVideo15(
            **{k: v for k, v in config.items() if not k.startswith("_")}
        ).eval()


def write_diffusers_root(root: Path, *, guidance_scale: float = 6.0) -> HunyuanVideo15TextEncoder:
    """A `HunyuanVideo-1.5-Diffusers-480p_t2v`-like folder; returns its text encoders (in memory)."""
    diffusers_transformer(DIFFUSERS_ARCH, seed=1, target_size=640, task_type="t2v").save_pretrained(
        root / "transformer"
    )
    diffusers_vae().save_pretrained(root / "vae")
    (root / "guider").mkdir(parents=True)
    guider = {"_class_name": "ClassifierFreeGuidance", "guidance_scale": guidance_scale}
    (root / "guider" / "config.json").write_text(json.dumps(guider))
    encoders = tiny_text_encoder_15(DIFFUSERS_ARCH.text_dim, DIFFUSERS_ARCH.glyph_dim, seed=7)
    write_diffusers(encoders, root)
    return encoders


def _wide_glyph_encoder(width: int) -> GlyphEncoder:
    """A one-layer T5 encoder of the official glyph width with tiny inner sizes (cheap to write)."""
    import transformers

    tokenizer = transformers.ByT5Tokenizer()
    tokenizer.add_tokens(glyph_special_tokens(TINY_COLORS, TINY_FONTS), special_tokens=True)
    config = transformers.T5Config(
        vocab_size=len(tokenizer), d_model=width, d_kv=8, d_ff=16, num_layers=1, num_heads=2,
        feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        return GlyphEncoder(transformers.T5EncoderModel(config), tokenizer)


def write_official_root(root: Path, version: str = "480p_t2v") -> Path:
    """An official `ckpts/` folder: `transformer/<version>/`, `vae/`, `text_encoder/{llm, byt5-small,
    Glyph-SDXL-v2}` with the official names and configs."""
    folder = root / "transformer" / version
    folder.mkdir(parents=True)
    meta = {"ideal_resolution": version.split("_")[0], "ideal_task": version.split("_")[1]}
    (folder / "config.json").write_text(json.dumps(OFFICIAL_ARCH.to_official_config(**meta)))
    state = random_transformer(OFFICIAL_ARCH, seed=2).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, folder / WEIGHTS)
    vae_folder = root / "vae"
    vae_folder.mkdir()
    vae_config = HunyuanVideo15VaeConfig.tiny()
    (vae_folder / "config.json").write_text(json.dumps(vae_config.to_official_config()))
    vae_state = random_vae(vae_config, seed=4).state_dict()
    save_file({k: v.contiguous() for k, v in vae_state.items()}, vae_folder / WEIGHTS)
    llm, tokenizer = tiny_llm(OFFICIAL_ARCH.text_dim, seed=8, num_layers=1)
    write_official(
        HunyuanVideo15TextEncoder(llm, tokenizer, _wide_glyph_encoder(OFFICIAL_ARCH.glyph_dim)), root
    )
    return root
