"""Build HunyuanVideo-1.5's components: from files of either checkpoint layout, or seeded random weights.

`load_components(model_config, device)` is the family's `load`: the transformer (its attention as
`model.attention_mode` asks, through `configure_attention`), the VAE, and the Qwen2.5-VL + byT5
encoders behind `PromptEncoder15`, which makes `HunyuanVideo15Conditioning` objects.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import torch

from hvbatch.config import ModelConfig, torch_dtype
from hvbatch.models.encoding import EncodedPrompts
from hvbatch.models.family import Components
from hvbatch.models.hunyuan_video_15.conditioning import HunyuanVideo15Conditioning
from hvbatch.models.hunyuan_video_15.layout import resolve_paths
from hvbatch.models.hunyuan_video_15.text_encoders import (
    HunyuanVideo15TextEncoder,
    TextEncoder15Settings,
    load_text_encoder_15,
    tiny_text_encoder_15,
)
from hvbatch.models.hunyuan_video_15.transformer_loading import load_transformer, random_transformer
from hvbatch.models.hunyuan_video_15.vae_config import HunyuanVideo15VaeConfig
from hvbatch.models.hunyuan_video_15.vae_loading import load_vae, random_vae


def encoder_settings(section: Any) -> TextEncoder15Settings:
    """`model.text_encoder` (`TextEncoderConfig15`) as the encoders' settings."""
    return TextEncoder15Settings(
        max_text_tokens=section.max_text_tokens,
        hidden_state_skip_layer=section.hidden_state_skip_layer,
        crop_start=section.crop_start,
        glyph_max_tokens=section.glyph_max_tokens,
    )


class PromptEncoder15:
    """The 1.5 encoders as the pipeline asks them (`hvbatch.models.protocols.PromptEncoder`).

    One encoding per prompt text: 1.5 has one (video) template whatever the frame count. The
    pipeline encodes negative prompts with `allow_blank=True`; they get no glyph tokens, as the
    official negative branch (which encodes `""` through byT5)."""

    def __init__(self, encoders: HunyuanVideo15TextEncoder) -> None:
        self.encoders = encoders

    @property
    def device(self) -> torch.device:
        return self.encoders.device

    def to(self, device: torch.device) -> None:
        self.encoders.to(device)

    def key(self, prompt: str, num_frames: int) -> Hashable:
        return prompt

    def encoding_frames(self, num_frames: int) -> int:
        return 2  # every frame count encodes alike (the video template)

    def encode(self, prompts: list[str], num_frames: int, *, allow_blank: bool = False) -> EncodedPrompts:
        encoded = self.encoders.encode(prompts, negative=allow_blank)
        cond = HunyuanVideo15Conditioning(
            encoded.text_states_BLD,
            tuple(encoded.text_lengths),
            encoded.glyph_states_BGD,
            tuple(encoded.glyph_lengths),
        )
        return EncodedPrompts(cond, list(encoded.truncated))


def _configure_attention(transformer: Any, model: ModelConfig) -> None:
    """Record `model.attention_mode` on the transformer: `configure_attention(backend)` applies it
    once the runtime has chosen the kernel."""
    transformer.attention_mode = model.attention_mode


def random_components(model: ModelConfig, device: torch.device) -> Components:
    """Every component with seeded random weights (`model.random_weights`, the tiny-1.5 preset)."""
    seed, arch = model.random_seed, model.transformer
    transformer = random_transformer(arch, seed=seed, dtype=torch_dtype(model.dtype), device=device)
    vae = random_vae(
        HunyuanVideo15VaeConfig.tiny(), seed=seed + 1, dtype=torch_dtype(model.vae_dtype), device=device
    )
    encoders = tiny_text_encoder_15(
        arch.text_dim, arch.glyph_dim, seed=seed + 2, settings=encoder_settings(model.text_encoder)
    )
    encoders.llm.to(device=device, dtype=torch_dtype(model.text_encoder_dtype))
    encoders.glyph.model.to(device=device, dtype=torch_dtype(model.text_encoder.glyph_dtype))
    _configure_attention(transformer, model)
    return Components(transformer, vae, PromptEncoder15(encoders))


def load_components(model: ModelConfig, device: torch.device) -> Components:
    """The family's `load`: random weights, or the files under `model.path` / `model.*_path`.
    The architecture comes from the checkpoint's config.json (either layout)."""
    if model.random_weights:
        return random_components(model, device)
    paths = resolve_paths(model)
    transformer = load_transformer(
        paths.transformer, dtype=torch_dtype(model.dtype), device=device, version=paths.version
    )
    vae = load_vae(paths.vae, dtype=torch_dtype(model.vae_dtype), device=device)
    encoders = load_text_encoder_15(
        paths.text_encoders,
        settings=encoder_settings(model.text_encoder),
        llm_dtype=torch_dtype(model.text_encoder_dtype),
        glyph_dtype=torch_dtype(model.text_encoder.glyph_dtype),
        device=device,
    )
    _configure_attention(transformer, model)
    return Components(transformer, vae, PromptEncoder15(encoders))
