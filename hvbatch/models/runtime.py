"""Speed options applied to a loaded transformer: attention kernel, FP8 quantization, compiled blocks.

`configure_transformer(model, model_config, device)` applies `model.attention`, `model.quantize`
and `model.compile` once after loading (the pipeline calls it) and returns the backend in words.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from hvbatch.config import ModelConfig
from hvbatch.models.attention import LocalAttention, resolved_backend_name
from hvbatch.models.attention_backends import backend_for
from hvbatch.models.fp8 import QUANTIZE_CHOICES, FP8Linear, quantize_model_fp8
from hvbatch.models.protocols import StagedTransformer


def compile_blocks(
    model: StagedTransformer, *, backend: str | Callable[..., Any] = "inductor", fullgraph: bool = False
) -> None:
    """Regional compilation: `torch.compile` each of the model's blocks (`transformer_blocks()`) in place.

    Blocks of one kind share their compiled code. The text length is marked dynamic by
    `forward_tokens`, so prompts of different lengths reuse one graph; steps change only tensor
    values. `fullgraph=False` lets a sequence-parallel attention (collectives) run eagerly inside.
    """
    for block in model.transformer_blocks():
        block.compile(backend=backend, fullgraph=fullgraph)
    model.compiled_blocks = True


def configure_transformer(model: StagedTransformer, model_config: ModelConfig, device: torch.device) -> str:
    """Apply `model.attention`, `model.quantize` and `model.compile`; return e.g. `cudnn (auto)`."""
    if model_config.quantize not in QUANTIZE_CHOICES:
        raise ValueError(
            f"model.quantize={model_config.quantize!r} is not supported; choose one of "
            f"{', '.join(QUANTIZE_CHOICES)}"
        )
    dtype = model.compute_dtype
    backend = backend_for(model_config.attention, device, dtype, model.config.head_dim)
    configure = getattr(model, "configure_attention", None)  # a model with a choice (e.g. sparse)
    mode = configure(backend) if configure is not None else "dense"
    if configure is None:
        model.attention_fn = LocalAttention(backend)
    already_fp8 = any(isinstance(m, FP8Linear) for m in model.modules())
    if model_config.quantize == "fp8" and not already_fp8:
        quantize_model_fp8(model)
    if model_config.compile:
        compile_blocks(model)
    words = resolved_backend_name(model_config, device, dtype)
    return words if mode == "dense" else f"{words}, {mode}"
