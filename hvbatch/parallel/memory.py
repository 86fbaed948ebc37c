"""Per-GPU memory model of a HunyuanVideo job, used by the parallel planner.

  transformer weights  params * bytes per param (bf16 2; fp8 checkpoints keep block linear weights at 1)
+ text encoders        LLaVA-Llama-3-8B language model + CLIP-L text model, in their dtype; when
                       they go to host memory before denoising (model.text_encoder_offload=cpu)
                       only what they need beyond the activations and VAE decode peak (they are
                       on the GPU only while those are not): max(0, encoders - both)
+ VAE weights          the causal 3D VAE (encoder and decoder), in its dtype
+ activations          bytes per token per hidden channel * hidden size * tokens per rank * batch,
                       tokens per rank = ceil(image tokens / sp) + text tokens (text is replicated)
+ FP8 temporaries      with FP8 block linears (`model.quantize=fp8` or an `_fp8.pt` checkpoint): the
                       widest block input quantized to float8 (1 byte per element, fused), or where
                       `_scaled_mm` cannot serve, two compute-dtype copies of the largest block
                       weight (the per-call dequantization); the larger of the two
+ VAE decode peak      one tile's activations at the default tiles (counted on every GPU: only the
                       SP group's leader decodes, but any rank may be it)
+ safety margin        10% of the sum (allocator fragmentation, CUDA context, NCCL buffers)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from hvbatch.config import TransformerConfig

GIB = 1024**3
MODES = ("throughput", "latency")
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}

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
ULYSSES_BUFFER_ELEMENTS_PER_TOKEN = 3
"""Ulysses (ulysses > 1): q, k and v all-to-all receive buffers, each one q-sized (D per local token)."""
RING_BUFFER_ELEMENTS_PER_TOKEN = 2
"""Ring (ring > 1): the next k and v blocks in flight, each D per local token (compute dtype) ..."""
RING_FLOAT32_ELEMENTS_PER_TOKEN = 1
"""... plus the float32 online-softmax output accumulator (D per local token)."""

# --- Components besides the transformer -----------------------------------------------------------
LLM_PARAMS = 7_504_924_672
"""LLaVA-Llama-3-8B's language model as `AutoModel` loads it (LlamaModel, no lm_head): embeddings
128256 x 4096 + 32 layers x (attention 41,943,040 + MLP 3 x 4096 x 14336 + 2 norms of 4096) + final
norm. 15.0 GB in float16 (the full 8.03B causal LM with lm_head would be 16.1 GB)."""
CLIP_PARAMS = 123_060_480
"""CLIP-L (openai/clip-vit-large-patch14) text model: 0.25 GB in float16."""
VAE_PARAMS = 246_478_803
"""AutoencoderKLCausal3D with the released config, encoder and decoder (counted on the meta device
from `hvbatch.models.VaeConfig()`): 0.49 GB in float16."""
VAE_DECODE_PEAK_GIB_FP16 = 11.0
"""Tiled VAE decode peak at the default tiles (17 latent frames x 32 x 32 latent cells), float16:
about 10.4 GiB estimated at 720p (one tile's activations plus the float32 output video), rounded
up. It barely grows with the video size (the tile is fixed); it doubles in float32."""
SAFETY_MARGIN = 0.10
"""Fraction added on top of the sum: allocator fragmentation, CUDA context, cuBLAS/NCCL buffers."""
DEFAULT_TEXT_TOKENS = 256
"""LLM text tokens after the template is cropped (`model.text_encoder.max_text_tokens`)."""
FP8_WEIGHT_BYTES = 1
"""float8_e4m3fn block linear weights (the official `*_fp8.pt`, or `model.quantize=fp8`)."""
FP8_INPUT_BYTES = 1
"""An FP8 GEMM's input, quantized by the fused `hvbatch.models.fp8.quantize_rows`: 1 byte per element
(plus a float32 scale per token). Live beside the block's other activations while the GEMM runs; the
widest is linear2's input [attention, GELU], (1 + mlp_ratio) D per token. (The eager quantization it
replaced held about 40 bytes per element of float32 temporaries: 45 bytes per token per channel at
linear2, 22 more bf16 hidden-width tensors, none of which the planner counted.)"""
FP8_DEQUANT_COPIES = 2
"""Where `_scaled_mm` cannot serve (a GPU below sm89) a layer dequantizes its weight per call:
`weight.to(dtype)` and `* scale`, two compute-dtype copies of the largest block weight."""


def _gib(num_bytes: float) -> float:
    return num_bytes / GIB


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def dtype_bytes(name: str, key: str = "dtype") -> int:
    """Bytes per element of a dtype config value; `key` names the setting in the error."""
    if name not in DTYPE_BYTES:
        raise ValueError(f"{key}={name!r} is not a known dtype; use one of {', '.join(DTYPE_BYTES)}")
    return DTYPE_BYTES[name]


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


@dataclass(frozen=True)
class ModelSize:
    """What the memory model needs to know about the transformer."""

    num_heads: int
    """Attention heads (Ulysses must divide them)."""
    hidden_size: int
    """Hidden size D (activations scale with it)."""
    num_params: int
    """All transformer parameters."""
    fp8_params: int = 0
    """Parameters held in float8 (1 byte); the official fp8 checkpoint: the block linear weights."""
    weight_bytes: int = 2
    """Bytes per parameter of the rest (bf16 / fp16 2, fp32 4)."""
    activation_bytes: int = 2
    """Bytes per activation element (the compute dtype)."""
    fp8_input_bytes_per_token: int = 0
    """FP8 GEMMs: bytes per token of the widest quantized block input (0 without FP8 GEMMs)."""
    fp8_dequant_bytes: int = 0
    """FP8 without `_scaled_mm`: bytes of the per-call dequantized copies of the largest block weight."""

    @classmethod
    def from_config(cls, config: TransformerConfig, dtype: str = "bfloat16", fp8: bool = False) -> ModelSize:
        """The size of `HunyuanVideoTransformer(config)` in `dtype`, with fp8 block weights (and their
        GEMMs' temporaries) if `fp8`."""
        total, block_weights = transformer_param_counts(config)
        nbytes = dtype_bytes(dtype, "model.dtype")
        d, mlp = config.hidden_size, int(config.hidden_size * config.mlp_ratio)
        return cls(
            num_heads=config.num_heads,
            hidden_size=d,
            num_params=total,
            fp8_params=block_weights if fp8 else 0,
            weight_bytes=nbytes,
            activation_bytes=nbytes,
            fp8_input_bytes_per_token=(d + mlp) * FP8_INPUT_BYTES if fp8 else 0,
            fp8_dequant_bytes=FP8_DEQUANT_COPIES * d * (3 * d + mlp) * nbytes if fp8 else 0,
        )

    @property
    def weight_bytes_total(self) -> int:
        return (self.num_params - self.fp8_params) * self.weight_bytes + self.fp8_params * FP8_WEIGHT_BYTES

    def describe(self) -> str:
        dtype = {2: "16-bit", 4: "float32"}.get(self.weight_bytes, f"{self.weight_bytes}-byte")
        fp8 = f", {_count(self.fp8_params)} of them float8" if self.fp8_params else ""
        return f"{_count(self.num_params)} params, {dtype}{fp8}"


@dataclass(frozen=True)
class ComponentMemory:
    """Per-GPU memory of everything besides the transformer, in GiB."""

    text_encoders_gib: float
    """LLM and CLIP-L weights."""
    vae_weights_gib: float
    """VAE weights."""
    vae_decode_gib: float
    """Peak activations of the tiled VAE decode."""
    text_encoders_offloaded: bool = False
    """The text encoders leave the GPU before denoising (`model.text_encoder_offload=cpu`)."""

    @classmethod
    def hunyuan(
        cls, text_encoder_dtype: str = "float16", vae_dtype: str = "float16", *, offloaded: bool = False
    ) -> ComponentMemory:
        """The released HunyuanVideo text encoders and VAE in the given dtypes."""
        te = dtype_bytes(text_encoder_dtype, "model.text_encoder_dtype")
        vae = dtype_bytes(vae_dtype, "model.vae_dtype")
        return cls(
            text_encoders_gib=_gib((LLM_PARAMS + CLIP_PARAMS) * te),
            vae_weights_gib=_gib(VAE_PARAMS * vae),
            vae_decode_gib=VAE_DECODE_PEAK_GIB_FP16 * vae / 2,
            text_encoders_offloaded=offloaded,
        )


NO_COMPONENTS = ComponentMemory(0.0, 0.0, 0.0)
"""For presets whose text encoders and VAE are toy-sized random models (model.random_weights)."""


@dataclass(frozen=True)
class MemoryEstimate:
    """Estimated peak memory of one GPU, broken down, in GiB."""

    transformer_weights_gib: float
    """Transformer parameters."""
    text_encoders_gib: float
    """Text encoder weights (LLM and CLIP-L); when offloaded, only what exceeds the activations and
    VAE decode peak that are not live while they encode."""
    vae_weights_gib: float
    """VAE weights."""
    activations_gib: float
    """Transformer activations of one block forward, including Ulysses / ring buffers."""
    vae_decode_gib: float
    """Tiled VAE decode peak."""
    margin_gib: float
    """Safety margin on top of the rest."""
    tokens_per_rank: int
    """ceil(image tokens / sp) + text tokens: the sequence one GPU holds."""
    fp8_temporaries_gib: float = 0.0
    """FP8 block linears: the quantized GEMM input or the dequantized weight copies (0 without FP8)."""

    @property
    def total_gib(self) -> float:
        weights = self.transformer_weights_gib + self.text_encoders_gib + self.vae_weights_gib
        working = self.activations_gib + self.fp8_temporaries_gib + self.vae_decode_gib
        return weights + working + self.margin_gib

    def fits(self, gpu_memory_gib: float) -> bool:
        return self.total_gib <= gpu_memory_gib


def activation_bytes_per_token(model: ModelSize, ulysses: int, ring: int) -> int:
    """Bytes per token per hidden channel (see the count at the top of this module)."""
    b = model.activation_bytes
    per = ACTIVATION_ELEMENTS_PER_TOKEN * b + ROPE_FLOAT32_ELEMENTS_PER_TOKEN * 4
    if ulysses > 1:
        per += ULYSSES_BUFFER_ELEMENTS_PER_TOKEN * b
    if ring > 1:
        per += RING_BUFFER_ELEMENTS_PER_TOKEN * b + RING_FLOAT32_ELEMENTS_PER_TOKEN * 4
    return per


def estimate_memory(
    model: ModelSize,
    *,
    image_tokens: int,
    text_tokens: int = DEFAULT_TEXT_TOKENS,
    ulysses: int = 1,
    ring: int = 1,
    batch: int = 1,
    components: ComponentMemory | None = None,
    margin: float = SAFETY_MARGIN,
) -> MemoryEstimate:
    """Per-GPU estimate for one video (`batch` 2 with true CFG) split over `ulysses * ring` GPUs."""
    components = ComponentMemory.hunyuan() if components is None else components
    tokens = math.ceil(image_tokens / (ulysses * ring)) + text_tokens
    activations = _gib(activation_bytes_per_token(model, ulysses, ring) * model.hidden_size * tokens * batch)
    fp8_temporaries = _gib(max(model.fp8_input_bytes_per_token * tokens * batch, model.fp8_dequant_bytes))
    text_encoders = components.text_encoders_gib
    if components.text_encoders_offloaded:
        text_encoders = max(0.0, text_encoders - activations - fp8_temporaries - components.vae_decode_gib)
    parts = {
        "transformer_weights_gib": _gib(model.weight_bytes_total),
        "text_encoders_gib": text_encoders,
        "vae_weights_gib": components.vae_weights_gib,
        "activations_gib": activations,
        "vae_decode_gib": components.vae_decode_gib,
        "fp8_temporaries_gib": fp8_temporaries,
    }
    return MemoryEstimate(**parts, margin_gib=margin * sum(parts.values()), tokens_per_rank=tokens)


# --- Host memory of a node ------------------------------------------------------------------------
HOST_PER_RANK_GIB = 4.0
"""Host memory of one rank besides offloaded weights: Python, torch and CUDA's host side, NCCL and
pinned buffers, the decoded frames of the video being written (1.4 GB float32 at 720p x 129)."""


def host_memory_gib(components: ComponentMemory, ranks_per_node: int, margin: float = SAFETY_MARGIN) -> float:
    """Host memory one node's ranks need: each rank keeps its own copy of the text encoders in host
    memory while they are offloaded (`model.text_encoder_offload=cpu`: 15.3 GB in float16, 122 GB for
    8 ranks), plus `HOST_PER_RANK_GIB` each, plus the margin."""
    offloaded = components.text_encoders_gib if components.text_encoders_offloaded else 0.0
    return ranks_per_node * (offloaded + HOST_PER_RANK_GIB) * (1 + margin)
