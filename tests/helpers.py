"""Shared helpers for the tests: small configs, random weights, random inputs, error metrics."""

from __future__ import annotations

import torch
from torch import nn

from hvbatch.models.family import MemoryFigures, get_family
from hvbatch.models.hunyuan_video.conditioning import TextConditioning
from hvbatch.models.hunyuan_video.config import TransformerConfig
from hvbatch.models.hunyuan_video.figures import RELEASED_COMPONENTS, transformer_figures
from hvbatch.parallel.memory import ComponentMemory, ModelSize

HUNYUAN_VIDEO = get_family("hunyuan-video-1.0")
"""The HunyuanVideo 1.0 family, as registered."""
GEOMETRY = HUNYUAN_VIDEO.geometry
TEACACHE = HUNYUAN_VIDEO.step_cache.teacache_coefficients
latent_shape = GEOMETRY.latent_shape
image_tokens = GEOMETRY.checked_image_tokens

# Two small architectures that exercise every config field the diffusers config.json maps onto.
DIFFUSERS_SMALL = {
    "in_channels": 16,
    "out_channels": 16,
    "num_attention_heads": 4,
    "attention_head_dim": 16,
    "num_layers": 2,
    "num_single_layers": 2,
    "num_refiner_layers": 2,
    "mlp_ratio": 4.0,
    "patch_size": 2,
    "patch_size_t": 1,
    "guidance_embeds": True,
    "text_embed_dim": 32,
    "pooled_projection_dim": 24,
    "rope_theta": 256.0,
    "rope_axes_dim": (4, 6, 6),
}
DIFFUSERS_OTHER = {
    "in_channels": 8,
    "out_channels": 8,
    "num_attention_heads": 3,
    "attention_head_dim": 8,
    "num_layers": 1,
    "num_single_layers": 3,
    "num_refiner_layers": 1,
    "mlp_ratio": 2.0,
    "patch_size": 1,
    "patch_size_t": 1,
    "guidance_embeds": False,
    "text_embed_dim": 16,
    "pooled_projection_dim": 8,
    "rope_theta": 256.0,
    "rope_axes_dim": (2, 2, 4),
}


def small_config(**overrides: object) -> TransformerConfig:
    """Our architecture matching DIFFUSERS_SMALL."""
    fields = dict(
        num_heads=4,
        head_dim=16,
        num_double_blocks=2,
        num_single_blocks=2,
        num_refiner_blocks=2,
        rope_axes_dim=[4, 6, 6],
        text_dim=32,
        pooled_text_dim=24,
    )
    fields.update(overrides)
    return TransformerConfig(**fields)  # type: ignore[arg-type]


def randomize_(module: nn.Module, seed: int, std: float = 0.05) -> nn.Module:
    """Overwrite every parameter with seeded noise (norm weights near 1) so nothing is zero-initialised."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=generator) * std
            if "norm" in name and param.ndim == 1 and name.endswith("weight"):
                noise = 1.0 + 2 * noise
            param.copy_(noise)
    return module


def make_inputs(
    config: TransformerConfig,
    *,
    batch: int,
    frames: int,
    height: int,
    width: int,
    text_lens: list[int],
    text_len: int = 16,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Random model inputs; padded text positions hold garbage (they must not matter)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(batch, text_len, dtype=torch.long)
    for b, n in enumerate(text_lens):
        mask[b, :n] = 1
    return {
        "x": torch.randn(batch, config.in_channels, frames, height, width, generator=g),
        "t": torch.linspace(950.0, 400.0, batch),
        "text_states": torch.randn(batch, text_len, config.text_dim, generator=g),
        "text_mask": mask,
        "text_states_2": torch.randn(batch, config.pooled_text_dim, generator=g),
        "guidance": torch.full((batch,), 6016.0),
    }


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.double() - ref.double()).norm() / ref.double().norm()).item()


def cond_of(inputs: dict[str, torch.Tensor]) -> TextConditioning:
    """The conditioning object of `make_inputs`' text inputs and embedded guidance (x 1000 in the dict)."""
    guidance = inputs.get("guidance")
    scale = None if guidance is None else float(guidance[0]) / 1000.0
    return TextConditioning.from_mask(
        inputs["text_states"], inputs["text_mask"], inputs["text_states_2"], scale
    )


def model_size(config: TransformerConfig, dtype: str = "bfloat16", fp8: bool = False) -> ModelSize:
    """The memory model's size of a 1.0 transformer (fp8: the official fp8 checkpoint's block weights)."""
    return ModelSize.from_figures(transformer_figures(config, fp8=fp8), dtype)


def released_components(
    text_encoder_dtype: str = "float16", vae_dtype: str = "float16", *, offloaded: bool = False
) -> ComponentMemory:
    """The released 1.0 text encoders and VAE, as the memory model counts them."""
    figures = MemoryFigures(num_heads=1, hidden_size=1, num_params=0, **RELEASED_COMPONENTS)  # type: ignore[arg-type]
    return ComponentMemory.from_figures(figures, text_encoder_dtype, vae_dtype, offloaded=offloaded)
