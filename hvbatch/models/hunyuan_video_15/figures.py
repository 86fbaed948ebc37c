"""HunyuanVideo-1.5's numbers: latent geometry, parameter counts, memory, cost and step-cache figures.

Plain Python (no torch): `hvbatch plan`, `submit --dry-run` and prompt validation read them on a
login node. The family registration (`family.py`) hands them to the registry.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hvbatch.models.family import MemoryFigures, StepCacheFigures
from hvbatch.models.geometry import LatentGeometry
from hvbatch.models.hunyuan_video_15.config import HunyuanVideo15TransformerConfig
from hvbatch.models.hunyuan_video_15.variants import SPATIAL_MULTIPLE, TEMPORAL_RATIO

if TYPE_CHECKING:
    from hvbatch.config import ModelConfig

LATENT_CHANNELS = 32
SCALING_FACTOR = 1.03682
GEOMETRY = LatentGeometry(
    channels=LATENT_CHANNELS,
    spatial_ratio=SPATIAL_MULTIPLE,
    temporal_ratio=TEMPORAL_RATIO,
    patch=(1, 1, 1),
    size_multiple=SPATIAL_MULTIPLE,
    scaling_factor=SCALING_FACTOR,
)
"""The 1.5 VAE (32 channels, 16x spatial, 4x temporal, no shift) and the transformer's 1x1x1 patch
(`patch_size: 1`, `patch_size_t: 1` in every released config.json)."""

# --- Activations of one double-stream block forward, per image token and per hidden channel -------
# (`MMDoubleStreamBlock.forward`, D = hidden size, in the compute dtype). The largest tensors live
# during the block: input 1 D, modulated input 1 D, q k v 3 D, attention output 1 D, projection 1 D,
# the residual sum 1 D, the second modulated input 1 D, fc1 4 D, GELU 4 D, fc2 1 D: 18 D. RoPE
# rotates q and k in float32 (2 D of 4 bytes). The condition stream's tokens are counted by
# `MemoryFigures.text_tokens` (replicated on every rank).
ACTIVATION_ELEMENTS_PER_TOKEN = 18
ROPE_FLOAT32_ELEMENTS_PER_TOKEN = 2

LLM_PARAMS = 7_070_619_136
"""Qwen2.5-VL-7B-Instruct's text model as the official code keeps it (no vision tower, no lm_head):
embeddings 152064 x 3584 + 28 layers x (q 3584^2 + k, v 3584 x 512, with biases, o 3584^2, MLP
3 x 3584 x 18944, 2 norms) + final norm. 14.1 GB in float16."""
GLYPH_PARAMS = 219_314_944
"""byT5-small's encoder (12 layers, d_model 1472, gated FF 3584, 6 heads x 64) with a vocabulary of
about 1510 (byT5's 384 plus the Glyph-SDXL-v2 colour and font tokens): 0.88 GB in float32 (the
official code runs it in float32)."""
ENCODER_WORDS = "Qwen2.5-VL-7B text model + byT5-small glyph encoder"
VAE_PARAMS = 1_260_634_115
"""`AutoencoderKLConv3D` with the released config, encoder and decoder (counted on the meta device)."""
VAE_DECODE_PEAK_GIB_FP16 = 14.0
"""Tiled decode peak at the official tiles (256 px, all 121 frames in every tile), float16: the last
level's activations of one tile (128 channels x 121 frames x 288 x 288 pixels, about 2.4 GiB each,
a few live at once) plus the float32 video, rounded up. An estimate from the shapes, not measured."""

SECONDS_PER_TOKEN_STEP = 1.9e-4
"""GPU-seconds per (image token x step) of one CFG branch: the official code on 4 H100s makes a 720p
(720 x 1280) x 121-frame text-to-video in 8.98 min at 50 steps with CFG (published), i.e. 2155
GPU-seconds for 111,600 tokens x 50 steps x 2 branches."""

STEP_CACHE = StepCacheFigures(
    teacache_coefficients=None,  # none published for 1.5: `sampling.cache=teacache` is refused
    # First-Block-Cache speedups as measured for HunyuanVideo 1.0 (no 1.5 figure is published); the
    # estimate says so beside it.
    expected_speedups={"fbcache": ((0.0, 1.0), (0.06, 1.62), (0.1, 2.0), (0.15, 2.3))},
    source="HunyuanVideo 1.0's published First-Block-Cache speedups (none published for 1.5)",
)


def _linear(fan_in: int, fan_out: int) -> int:
    return fan_in * fan_out + fan_out


def transformer_param_counts(config: HunyuanVideo15TransformerConfig) -> tuple[int, int]:
    """`(all parameters, block linear weights)` of `HunyuanVideo15Transformer(config)`, by arithmetic
    (tests compare it with the meta-device model: 8,326,608,160 for the released config)."""
    d, hd = config.hidden_size, config.head_dim
    mlp = int(d * config.mlp_ratio)
    patch = config.patch_size_t * config.patch_size**2
    timestep = _linear(256, d) + _linear(d, d)
    refiner_mlp = int(d * config.refiner_mlp_ratio)
    refiner_block = 4 * d + _linear(d, 3 * d) + _linear(d, d) + _linear(d, refiner_mlp)
    refiner_block += _linear(refiner_mlp, d) + _linear(d, 2 * d)
    refiner = _linear(config.text_dim, d) + timestep + _linear(config.text_dim, d) + _linear(d, d)
    refiner += config.num_refiner_blocks * refiner_block
    glyph_hidden = config.glyph_hidden_dim
    byt5 = 2 * config.glyph_dim + _linear(config.glyph_dim, glyph_hidden)
    byt5 += _linear(glyph_hidden, glyph_hidden) + _linear(glyph_hidden, d)
    vision = 2 * config.image_embed_dim + _linear(config.image_embed_dim, config.image_embed_dim)
    vision += _linear(config.image_embed_dim, d) + 2 * d
    embedders = config.in_channels * patch * d + d + refiner + byt5 + vision + 3 * d + timestep
    embedders += timestep if config.use_meanflow else 0
    stream_linears = [(d, 6 * d), (d, d), (d, d), (d, d), (d, d), (d, mlp), (mlp, d)]
    block = 2 * (sum(_linear(i, o) for i, o in stream_linears) + 2 * hd)
    block_weights = 2 * sum(i * o for i, o in stream_linears)
    final = _linear(d, 2 * d) + _linear(d, patch * config.out_channels)
    total = embedders + config.num_double_blocks * block + final
    return total, config.num_double_blocks * block_weights


def transformer_figures(config: HunyuanVideo15TransformerConfig, *, text_tokens: int) -> MemoryFigures:
    """The transformer's part of the memory figures (no encoders, no VAE)."""
    total = transformer_param_counts(config)[0]
    d, mlp = config.hidden_size, int(config.hidden_size * config.mlp_ratio)
    return MemoryFigures(
        num_heads=config.num_heads,
        hidden_size=d,
        num_params=total,
        fp8_widest_input=mlp,  # fc2's input
        fp8_largest_weight=d * mlp,
        activation_elements_per_token=ACTIVATION_ELEMENTS_PER_TOKEN,
        rope_float32_elements_per_token=ROPE_FLOAT32_ELEMENTS_PER_TOKEN,
        text_tokens=text_tokens,
    )


def memory_figures(model: ModelConfig) -> MemoryFigures:
    """Figures of `model`'s transformer with the released encoders and VAE. The condition tokens
    every rank holds: the LLM's limit plus the glyph limit."""
    encoder = model.text_encoder
    base = transformer_figures(
        model.transformer, text_tokens=encoder.max_text_tokens + encoder.glyph_max_tokens
    )
    fp8 = model.quantize == "fp8"
    return MemoryFigures(
        **{
            **base.__dict__,
            "fp8_params": block_weight_count(model.transformer) if fp8 else 0,
            "fp8_words": "fp8 block weights" if fp8 else "",
            "encoder_params": LLM_PARAMS + GLYPH_PARAMS,
            "encoder_words": ENCODER_WORDS,
            "vae_params": VAE_PARAMS,
            "vae_decode_peak_gib_fp16": VAE_DECODE_PEAK_GIB_FP16,
        }
    )


def block_weight_count(config: HunyuanVideo15TransformerConfig) -> int:
    return transformer_param_counts(config)[1]
