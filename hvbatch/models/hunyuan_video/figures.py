"""HunyuanVideo 1.0's numbers: latent geometry, parameter counts, memory, cost and step-cache figures.

Plain Python (no torch): `hvbatch plan`, `submit --dry-run` and prompt validation read them on a
login node. The family registration (`family.py`) hands them to the registry.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from hvbatch.models.family import MemoryFigures, StepCacheFigures
from hvbatch.models.geometry import LatentGeometry
from hvbatch.models.hunyuan_video.config import TransformerConfig

if TYPE_CHECKING:
    from hvbatch.config import ModelConfig

GEOMETRY = LatentGeometry(
    channels=16,
    spatial_ratio=8,
    temporal_ratio=4,
    patch=(1, 2, 2),
    size_multiple=16,
    scaling_factor=0.476986,
)
"""The causal 3D VAE (16 channels, 8x spatial, 4x temporal) and the transformer's 1x2x2 patch."""

SAMPLING_DEFAULTS: dict[str, Any] = {
    "height": 720,
    "width": 1280,
    "num_frames": 129,
    "num_inference_steps": 50,
    "guidance_scale": 6.0,
    "cfg_scale": 1.0,
    "flow_shift": 7.0,
}
"""The official sample script's defaults (the embedded-guidance distilled 720p model)."""

I2V_SAMPLING_DEFAULTS: dict[str, Any] = {**SAMPLING_DEFAULTS, "flow_shift": 7.0}
"""HunyuanVideo-I2V's official stable-mode defaults (`--i2v-stability --flow-shift 7
--embedded-cfg-scale 6`, cfg 1, 50 steps, 129 frames at 720p; the size follows the image's bucket)."""

# --- Activations of one single-stream block forward, per token and per hidden channel -----------
# (`MMSingleStreamBlock.forward`; D = hidden size; "b" = bytes of the compute dtype, 2 for bf16).
# Summing the largest tensors that are live during the block (an upper bound: a few are freed
# before the last ones are made):
#   input x                                1 D  (b)
#   modulated input (layer norm, modulate) 1 D  (b)
#   linear1 output q|k|v|mlp               7 D  (b)   3*D + 4*D (mlp_ratio 4)
#   attention output                       1 D  (b)
#   GELU(tanh) output                      4 D  (b)
#   concat [attention, GELU]               5 D  (b)
#   linear2 output                         1 D  (b)
#                                         -----
#                                         20 D in the compute dtype
#   RoPE copies of q and k in float32      2 D  (4 bytes each: `apply_rope` works in float32)
# bf16: 20 * 2 + 2 * 4 = 48 bytes per token per hidden channel.
# The double-stream blocks hold about the same per image token (qkv 3 D, fc1 and GELU 4 D each).
ACTIVATION_ELEMENTS_PER_TOKEN = 20
"""Compute-dtype elements per token per hidden channel live in one single-stream block."""
ROPE_FLOAT32_ELEMENTS_PER_TOKEN = 2
"""float32 elements per token per hidden channel: the RoPE copies of q and k."""

LLM_PARAMS = 7_504_924_672
"""LLaVA-Llama-3-8B's language model as `AutoModel` loads it (LlamaModel, no lm_head): embeddings
128256 x 4096 + 32 layers x (attention 41,943,040 + MLP 3 x 4096 x 14336 + 2 norms of 4096) + final
norm. 15.0 GB in float16 (the full 8.03B causal LM with lm_head would be 16.1 GB)."""
CLIP_PARAMS = 123_060_480
"""CLIP-L (openai/clip-vit-large-patch14) text model: 0.25 GB in float16."""
ENCODER_WORDS = "LLaVA-Llama-3-8B + CLIP-L"
LLAVA_PARAMS = 8_030_261_248 + 303_507_456 + 20_979_712
"""HunyuanVideo-I2V's text encoder, the full LlavaForConditionalGeneration of llava-llama-3-8b:
the Llama-3-8B causal LM with lm_head (8,030,261,248), the CLIP ViT-L/14-336 vision tower
(303,507,456) and the projector 1024 -> 4096 -> 4096 (20,979,712): 16.7 GB in float16."""
I2V_ENCODER_WORDS = "LLaVA-Llama-3-8B (with its vision tower) + CLIP-L"
LLAVA_IMAGE_TOKENS = 576
"""Image tokens LLaVA puts in place of `<image>` (336 / 14 squared)."""
I2V_ASSISTANT_TOKENS = 4
"""The assistant header's tokens cut from the LLM states (the encoder's `ASSISTANT_HEADER_TOKENS`)."""
VAE_PARAMS = 246_478_803
"""AutoencoderKLCausal3D with the released config, encoder and decoder (counted on the meta device
from `VaeConfig()`): 0.49 GB in float16."""
VAE_DECODE_PEAK_GIB_FP16 = 11.0
"""Tiled VAE decode peak at the default tiles (17 latent frames x 32 x 32 latent cells), float16:
about 10.4 GiB estimated at 720p (one tile's activations plus the float32 output video), rounded
up. It barely grows with the video size (the tile is fixed); it doubles in float32."""
FP8_CHECKPOINT_SUFFIX = "_fp8.pt"
"""The official FP8 checkpoint (`mp_rank_00_model_states_fp8.pt`): block linear weights in float8."""

SECONDS_PER_TOKEN_STEP = 3.3e-4
"""GPU-seconds per (image token x step): 720p x 129 frames x 50 steps on one H100 is about 1904 s
(published), i.e. 3.2e-4 s per token-step."""

TEACACHE_COEFFICIENTS = (7.33226126e02, -4.01131952e02, 6.75869174e01, -3.14987800e00, 9.61237896e-02)
"""TeaCache's rescale polynomial for HunyuanVideo, highest degree first (TeaCache4HunyuanVideo)."""
STEP_CACHE = StepCacheFigures(
    teacache_coefficients=TEACACHE_COEFFICIENTS,
    # Published (threshold, end-to-end speedup) points; `estimates.py` starts them at 1.0 from the
    # smallest threshold that can skip a step (TeaCache: the polynomial's minimum, about 0.0521).
    # TeaCache: TeaCache4HunyuanVideo/README.md, one A800, 50 steps: "1.6x" at 0.1 and "2.1x" at
    # 0.15 (720p: ~50 -> ~30 / ~23 min; 540p: ~18 -> ~11 / ~8 min).
    # First-Block-Cache: diffusers pull request 11180, HunyuanVideo 320x512 x 61 frames, 50 steps:
    # 121.85 s -> 62.47 / 41.84 / 28.11 s at 0.05 / 0.10 / 0.20 (1.95x / 2.91x / 4.33x). The other
    # published point, ParaAttention's 1.62x at 0.06 (one L20, 720p x 129 frames, 30 steps), is for
    # fewer steps than hvbatch's default 50 and is not interpolated with these.
    expected_speedups={
        "teacache": ((0.1, 1.6), (0.15, 2.1)),
        "fbcache": ((0.05, 1.95), (0.1, 2.91), (0.2, 4.33)),
    },
    source="published HunyuanVideo speedups at 50 steps (README \"Step caching\")",
)


def _linear(fan_in: int, fan_out: int) -> int:
    return fan_in * fan_out + fan_out


def _block_params(config: TransformerConfig) -> tuple[int, int]:
    """(all parameters, linear weights) of the double- and single-stream blocks."""
    d, hd = config.hidden_size, config.head_dim
    mlp = int(d * config.mlp_ratio)
    stream_linears = [(d, 6 * d), (d, 3 * d), (d, d), (d, mlp), (mlp, d)]
    single_linears = [(d, 3 * d + mlp), (d + mlp, d), (d, 3 * d)]
    double = 2 * (sum(_linear(i, o) for i, o in stream_linears) + 2 * hd)
    single = sum(_linear(i, o) for i, o in single_linears) + 2 * hd
    double_w = 2 * sum(i * o for i, o in stream_linears)
    single_w = sum(i * o for i, o in single_linears)
    total = config.num_double_blocks * double + config.num_single_blocks * single
    weights = config.num_double_blocks * double_w + config.num_single_blocks * single_w
    return total, weights


def transformer_param_counts(config: TransformerConfig) -> tuple[int, int]:
    """`(all parameters, block linear weights)` of `HunyuanVideoTransformer(config)`, by arithmetic.

    The second number is what an fp8 checkpoint stores in float8 (every `nn.Linear` weight under
    `double_blocks.` and `single_blocks.`). 720p preset: 12,821,012,544 and 12,457,082,880.
    """
    d = config.hidden_size
    patch = config.patch_size_t * config.patch_size**2
    refiner_mlp = int(d * config.refiner_mlp_ratio)
    timestep = _linear(256, d) + _linear(d, d)
    refiner_block = 4 * d + _linear(d, 3 * d) + _linear(d, d) + _linear(d, refiner_mlp)
    refiner_block += _linear(refiner_mlp, d) + _linear(d, 2 * d)
    refiner = _linear(config.text_dim, d) + timestep + _linear(config.text_dim, d) + _linear(d, d)
    refiner += config.num_refiner_blocks * refiner_block
    embedders = config.in_channels * patch * d + d + refiner + timestep
    embedders += _linear(config.pooled_text_dim, d) + _linear(d, d)
    embedders += timestep if config.guidance_embed else 0
    final = _linear(d, 2 * d) + _linear(d, patch * config.out_channels)
    blocks, block_weights = _block_params(config)
    return embedders + blocks + final, block_weights


def runs_fp8(model: ModelConfig) -> bool:
    """Whether the block linears run in float8: `model.quantize=fp8`, or an `*_fp8.pt` checkpoint."""
    return model.quantize == "fp8" or str(model.transformer_path or "").endswith(FP8_CHECKPOINT_SUFFIX)


def transformer_figures(
    config: TransformerConfig, *, fp8: bool = False, text_tokens: int = 256
) -> MemoryFigures:
    """The transformer's part of the memory figures (no encoders, no VAE)."""
    total, block_weights = transformer_param_counts(config)
    d, mlp = config.hidden_size, int(config.hidden_size * config.mlp_ratio)
    return MemoryFigures(
        num_heads=config.num_heads,
        hidden_size=d,
        num_params=total,
        fp8_params=block_weights if fp8 else 0,
        fp8_words="fp8 block weights" if fp8 else "",
        fp8_widest_input=d + mlp,  # linear2's input [attention, GELU]
        fp8_largest_weight=d * (3 * d + mlp),  # linear1 of a single-stream block
        activation_elements_per_token=ACTIVATION_ELEMENTS_PER_TOKEN,
        rope_float32_elements_per_token=ROPE_FLOAT32_ELEMENTS_PER_TOKEN,
        text_tokens=text_tokens,
    )


RELEASED_COMPONENTS = {
    "encoder_params": LLM_PARAMS + CLIP_PARAMS,
    "encoder_words": ENCODER_WORDS,
    "vae_params": VAE_PARAMS,
    "vae_decode_peak_gib_fp16": VAE_DECODE_PEAK_GIB_FP16,
}
"""The released text encoders and VAE, as `MemoryFigures` fields."""


def conditioning_tokens(model: ModelConfig) -> int:
    """Tokens in front of the image tokens: the LLM's, and for image-to-video LLaVA's kept image
    tokens before them (720p I2V: 576 / 4 + 256 - 4 = 396)."""
    encoder = model.text_encoder
    if not model.transformer.token_replace:
        return int(encoder.max_text_tokens)
    interleave = encoder.image_embed_interleave
    image = -(-LLAVA_IMAGE_TOKENS // interleave) if 0 < interleave < 6 else LLAVA_IMAGE_TOKENS
    return image + encoder.max_text_tokens - I2V_ASSISTANT_TOKENS


def memory_figures(model: ModelConfig) -> MemoryFigures:
    """Figures of `model`'s transformer, with the released text encoders and VAE."""
    base = transformer_figures(model.transformer, fp8=runs_fp8(model), text_tokens=conditioning_tokens(model))
    components = dict(RELEASED_COMPONENTS)
    if model.transformer.token_replace:
        components.update(encoder_params=LLAVA_PARAMS + CLIP_PARAMS, encoder_words=I2V_ENCODER_WORDS)
    return MemoryFigures(**{**base.__dict__, **components})
