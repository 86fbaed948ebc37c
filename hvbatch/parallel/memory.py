"""Per-GPU memory model of a video job, used by the parallel planner; the figures are the family's.

The model family gives the numbers (`hvbatch.models.family.MemoryFigures`: parameter counts,
activation elements per token, encoder and VAE sizes); this module adds them up:

  transformer weights  params * bytes per param (bf16 2; fp8 checkpoints keep block linear weights at 1)
+ text encoders        the family's encoders, in their dtype; when
                       they go to host memory before denoising (model.text_encoder_offload=cpu)
                       only what they need beyond the activations and VAE decode peak (they are
                       on the GPU only while those are not): max(0, encoders - both)
+ VAE weights          the causal 3D VAE (encoder and decoder), in its dtype
+ activations          bytes per token per hidden channel (the family's count for its largest block,
                       plus Ulysses / ring buffers) * hidden size * tokens per rank * batch,
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

from hvbatch.models.family import MemoryFigures

GIB = 1024**3
MODES = ("throughput", "latency")
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}

ULYSSES_BUFFER_ELEMENTS_PER_TOKEN = 3
"""Ulysses (ulysses > 1): q, k and v all-to-all receive buffers, each one q-sized (D per local token)."""
RING_BUFFER_ELEMENTS_PER_TOKEN = 2
"""Ring (ring > 1): the next k and v blocks in flight, each D per local token (compute dtype) ..."""
RING_FLOAT32_ELEMENTS_PER_TOKEN = 1
"""... plus the float32 online-softmax output accumulator (D per local token)."""

SAFETY_MARGIN = 0.10
"""Fraction added on top of the sum: allocator fragmentation, CUDA context, cuBLAS/NCCL buffers."""
DEFAULT_TEXT_TOKENS = 256
"""Text tokens per rank when none are given (the family's `MemoryFigures.text_tokens`)."""
FP8_WEIGHT_BYTES = 1
"""float8_e4m3fn weights (a family's fp8 checkpoint, or `model.quantize=fp8`)."""
FP8_INPUT_BYTES = 1
"""An FP8 GEMM's input, quantized by the fused `hvbatch.models.fp8.quantize_rows`: 1 byte per element
(plus a float32 scale per token). Live beside the block's other activations while the GEMM runs; the
widest is the family's (`MemoryFigures.fp8_widest_input`; 1.0: linear2's input [attention, GELU],
(1 + mlp_ratio) D per token). (The eager quantization it replaced held about 40 bytes per element of
float32 temporaries: 45 bytes per token per channel at linear2, 22 more bf16 hidden-width tensors, none
of which the planner counted.)"""
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
    activation_elements_per_token: int = 20
    """Compute-dtype elements per token per hidden channel live in the largest block's forward."""
    rope_float32_elements_per_token: int = 2
    """float32 elements per token per hidden channel (RoPE copies of q and k)."""
    fp8_input_bytes_per_token: int = 0
    """FP8 GEMMs: bytes per token of the widest quantized block input (0 without FP8 GEMMs)."""
    fp8_dequant_bytes: int = 0
    """FP8 without `_scaled_mm`: bytes of the per-call dequantized copies of the largest block weight."""

    @classmethod
    def from_figures(cls, figures: MemoryFigures, dtype: str = "bfloat16") -> ModelSize:
        """The family's transformer (`MemoryFigures`) in `dtype` (its fp8 weights at one byte, and
        their GEMMs' temporaries)."""
        nbytes = dtype_bytes(dtype, "model.dtype")
        fp8 = figures.fp8_params > 0
        return cls(
            num_heads=figures.num_heads,
            hidden_size=figures.hidden_size,
            num_params=figures.num_params,
            fp8_params=figures.fp8_params,
            weight_bytes=nbytes,
            activation_bytes=nbytes,
            activation_elements_per_token=figures.activation_elements_per_token,
            rope_float32_elements_per_token=figures.rope_float32_elements_per_token,
            fp8_input_bytes_per_token=figures.fp8_widest_input * FP8_INPUT_BYTES if fp8 else 0,
            fp8_dequant_bytes=FP8_DEQUANT_COPIES * figures.fp8_largest_weight * nbytes if fp8 else 0,
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
    """Text encoder weights."""
    vae_weights_gib: float
    """VAE weights."""
    vae_decode_gib: float
    """Peak activations of the tiled VAE decode."""
    text_encoders_offloaded: bool = False
    """The text encoders leave the GPU before denoising (`model.text_encoder_offload=cpu`)."""
    encoder_words: str = ""
    """The encoders, in words (for `hvbatch plan`)."""

    @classmethod
    def from_figures(
        cls,
        figures: MemoryFigures,
        text_encoder_dtype: str = "float16",
        vae_dtype: str = "float16",
        *,
        offloaded: bool = False,
    ) -> ComponentMemory:
        """The family's released text encoders and VAE (`MemoryFigures`) in the given dtypes."""
        te = dtype_bytes(text_encoder_dtype, "model.text_encoder_dtype")
        vae = dtype_bytes(vae_dtype, "model.vae_dtype")
        return cls(
            text_encoders_gib=_gib(figures.encoder_params * te),
            vae_weights_gib=_gib(figures.vae_params * vae),
            vae_decode_gib=figures.vae_decode_peak_gib_fp16 * vae / 2,
            text_encoders_offloaded=offloaded,
            encoder_words=figures.encoder_words,
        )


NO_COMPONENTS = ComponentMemory(0.0, 0.0, 0.0)
"""Nothing besides the transformer: presets whose text encoders and VAE are toy-sized random
models (model.random_weights)."""


@dataclass(frozen=True)
class MemoryEstimate:
    """Estimated peak memory of one GPU, broken down, in GiB."""

    transformer_weights_gib: float
    """Transformer parameters."""
    text_encoders_gib: float
    """Text encoder weights; when offloaded, only what exceeds the activations and VAE decode peak
    that are not live while they encode."""
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
    per = model.activation_elements_per_token * b + model.rope_float32_elements_per_token * 4
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
    """Per-GPU estimate for one video (`batch` 2 with true CFG) split over `ulysses * ring` GPUs.

    `components` None counts the transformer alone (no encoders, no VAE).
    """
    components = NO_COMPONENTS if components is None else components
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
