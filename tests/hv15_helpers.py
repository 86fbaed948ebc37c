"""Shared pieces of the HunyuanVideo-1.5 transformer tests: small architectures, random inputs."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from hvbatch.models.hunyuan_video_15.conditioning import HunyuanVideo15Conditioning
from hvbatch.models.hunyuan_video_15.config import HunyuanVideo15TransformerConfig

# Official-compatible (the official code fixes 2 refiner blocks and the byT5 widths 1472 / 2048).
SMALL = HunyuanVideo15TransformerConfig(
    in_channels=17,
    out_channels=8,
    num_heads=4,
    head_dim=16,
    num_double_blocks=2,
    rope_axes_dim=[4, 6, 6],
    text_dim=32,
    image_embed_dim=24,
)
# Odd head count, one block, one refiner block, a narrow glyph input (diffusers allows these).
ODD = HunyuanVideo15TransformerConfig(
    in_channels=9,
    out_channels=4,
    num_heads=3,
    head_dim=8,
    num_double_blocks=1,
    num_refiner_blocks=1,
    rope_axes_dim=[2, 2, 4],
    text_dim=20,
    glyph_dim=12,
    image_embed_dim=10,
)


def randomize_fan_in_(module: nn.Module, seed: int) -> nn.Module:
    """Seeded weights that make every part matter: matrices N(0, 1/fan_in), norms 1 + noise."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if param.ndim >= 2 and "cond_type" not in name:
                param.copy_(noise / math.sqrt(param[0].numel()))
            elif "norm" in name and name.endswith("weight"):
                param.copy_(1.0 + 0.1 * noise)
            else:
                param.copy_(0.1 * noise)
    return module


@dataclass
class Inputs:
    """One batch in both conventions: ours (`x`, `cond`) and diffusers' keyword arguments."""

    x: torch.Tensor
    t: torch.Tensor
    t_next: torch.Tensor
    text_states: torch.Tensor
    text_mask: torch.Tensor
    glyph_states: torch.Tensor
    glyph_mask: torch.Tensor
    image_embeds: torch.Tensor
    cond_latents: torch.Tensor

    def cond(self) -> HunyuanVideo15Conditioning:
        return HunyuanVideo15Conditioning.from_masks(
            self.text_states, self.text_mask, self.glyph_states, self.glyph_mask,
            self.image_embeds, self.cond_latents, mask_type="t2v",
        )  # fmt: skip

    def diffusers_kwargs(self, meanflow: bool) -> dict[str, torch.Tensor | bool | None]:
        return {
            "hidden_states": torch.cat([self.x, self.cond_latents], dim=1),
            "timestep": self.t,
            "timestep_r": self.t_next if meanflow else None,
            "encoder_hidden_states": self.text_states,
            "encoder_attention_mask": self.text_mask,
            "encoder_hidden_states_2": self.glyph_states,
            "encoder_attention_mask_2": self.glyph_mask,
            "image_embeds": self.image_embeds,
            "return_dict": False,
        }


def _mask(lens: list[int], length: int) -> torch.Tensor:
    mask = torch.zeros(len(lens), length, dtype=torch.long)
    for b, n in enumerate(lens):
        mask[b, :n] = 1
    return mask


def make_inputs(
    config: HunyuanVideo15TransformerConfig,
    *,
    grid: tuple[int, int, int],
    text_lens: list[int],
    glyph_lens: list[int],
    image: bool,
    text_len: int = 9,
    glyph_len: int = 6,
    image_tokens: int = 5,
    seed: int = 0,
) -> Inputs:
    """Random inputs; padded positions hold garbage (they must not matter). `image=False`: zero
    image embeds and zero condition latents (text-to-video)."""
    g = torch.Generator().manual_seed(seed)
    batch = len(text_lens)
    latent = (batch, config.out_channels, *grid)
    cond_latents = torch.zeros(batch, config.condition_channels, *grid)
    image_embeds = torch.zeros(batch, image_tokens, config.image_embed_dim)
    if image:
        cond_latents[:, :-1, :1] = torch.randn(batch, config.out_channels, 1, *grid[1:], generator=g)
        cond_latents[:, -1:, :1] = 1.0
        image_embeds = torch.randn(image_embeds.shape, generator=g)
    return Inputs(
        x=torch.randn(latent, generator=g),
        t=torch.linspace(950.0, 400.0, batch),
        t_next=torch.linspace(800.0, 0.0, batch),
        text_states=torch.randn(batch, text_len, config.text_dim, generator=g),
        text_mask=_mask(text_lens, text_len),
        glyph_states=torch.randn(batch, glyph_len, config.glyph_dim, generator=g),
        glyph_mask=_mask(glyph_lens, glyph_len),
        image_embeds=image_embeds,
        cond_latents=cond_latents,
    )
