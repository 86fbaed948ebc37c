"""FP8 that computes in FP8: `_scaled_mm` numerics against the dequantized reference, path taken, fallback.

Tolerances (relative L2 error, measured on CPU): one linear ~3.5% (per-token e4m3 activations with
3 mantissa bits), asserted < 5%; the whole tiny model ~0.3% against the dequantize path, asserted < 1%.
"""

from __future__ import annotations

from collections.abc import Iterator
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from hvbatch.config import ModelConfig, transformer_preset
from hvbatch.models import random_transformer
from hvbatch.models.fp8 import (
    FP8_DTYPE,
    FP8Linear,
    enable_fp8_gemm,
    fp8_layer_names,
    quantize_fp8,
    quantize_fp8_rowwise,
)
from hvbatch.models.runtime import configure_transformer
from tests.helpers import rel_err
from tests.parallel_worker import one_forward


@pytest.fixture
def scaled_mm_calls() -> Iterator[mock.MagicMock]:
    with mock.patch("torch._scaled_mm", wraps=torch._scaled_mm) as spy:
        yield spy


def _fp8_linear(
    in_features: int, out_features: int, per_row: bool, seed: int = 0
) -> tuple[FP8Linear, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=g) * 0.05
    layer = FP8Linear(in_features, out_features)
    weight_q, scale = quantize_fp8_rowwise(weight) if per_row else quantize_fp8(weight)
    layer.weight.data = weight_q
    layer.bias.data = torch.randn(out_features, generator=g)
    layer.set_scale(scale, "test")
    enable_fp8_gemm(layer)
    return layer, weight_q.float() * scale


@pytest.mark.parametrize("per_row", [True, False])
def test_fp8_gemm_matches_dequantized_reference(per_row: bool, scaled_mm_calls: mock.MagicMock) -> None:
    layer, dequantized = _fp8_linear(64, 48, per_row)
    x = torch.randn(2, 37, 64, generator=torch.Generator().manual_seed(1))
    with mock.patch("hvbatch.models.fp8.F.linear", side_effect=AssertionError("dequantize path taken")):
        out = layer(x)
    assert scaled_mm_calls.call_count == 1
    assert layer.weight.dtype == FP8_DTYPE and out.shape == (2, 37, 48)
    assert rel_err(out, F.linear(x, dequantized, layer.bias)) < 0.05


def test_shapes_not_multiple_of_16_fall_back_to_dequantize(scaled_mm_calls: mock.MagicMock) -> None:
    layer, dequantized = _fp8_linear(24, 40, per_row=True)
    assert not layer.use_fp8_gemm
    x = torch.randn(3, 24)
    assert rel_err(layer(x), F.linear(x, dequantized, layer.bias)) < 1e-6
    assert scaled_mm_calls.call_count == 0


def _forward(model: torch.nn.Module) -> torch.Tensor:
    return one_forward(model)


def test_quantize_at_load_runs_block_linears_as_fp8_gemms(scaled_mm_calls: mock.MagicMock) -> None:
    reference = random_transformer(transformer_preset("tiny"), seed=0)
    model = random_transformer(transformer_preset("tiny"), seed=0)
    names = fp8_layer_names(model)
    configure_transformer(model, ModelConfig(quantize="fp8"), torch.device("cpu"))
    fp8_layers = [m for m in model.modules() if isinstance(m, FP8Linear)]
    assert len(fp8_layers) == len(names) == 26  # 2 double x 10 + 2 single x 3, modulation included
    assert all(m.weight.dtype == FP8_DTYPE and m.fp8_scale.shape == (m.out_features, 1) for m in fp8_layers)
    assert model.img_in.proj.weight.dtype == model.final_layer.linear.weight.dtype == torch.float32
    assert model.txt_in.input_embedder.weight.dtype == torch.float32
    out = _forward(model)
    assert scaled_mm_calls.call_count == len(names)
    dequantize_path = _forward_with_gemm_off(model)
    assert rel_err(out, dequantize_path) < 0.01
    assert rel_err(out, _forward(reference)) < 0.02


def _forward_with_gemm_off(model: torch.nn.Module) -> torch.Tensor:
    enable_fp8_gemm(model, enabled=False)
    try:
        return _forward(model)
    finally:
        enable_fp8_gemm(model)


def test_bad_quantize_value_is_refused() -> None:
    model = random_transformer(transformer_preset("tiny"), seed=0)
    with pytest.raises(ValueError, match=r"model.quantize='int4'.*none, fp8"):
        configure_transformer(model, ModelConfig(quantize="int4"), torch.device("cpu"))


def test_bias_and_fast_accumulation_go_into_the_one_scaled_mm(scaled_mm_calls: mock.MagicMock) -> None:
    """No separate bias pass and no float32 copy of the output: `_scaled_mm` adds the bias itself."""
    layer, dequantized = _fp8_linear(64, 48, per_row=True)
    x = torch.randn(3, 64)
    with mock.patch("torch.Tensor.__add__", side_effect=AssertionError("a separate bias add")):
        out = layer(x)
    kwargs = scaled_mm_calls.call_args.kwargs
    assert kwargs["use_fast_accum"] is True and torch.equal(kwargs["bias"], layer.bias)
    assert rel_err(out, F.linear(x, dequantized, layer.bias)) < 0.05


def test_activation_quantization_compiles_into_one_graph() -> None:
    """`quantize_rows` (what runs compiled on a GPU) traces whole, with dynamic sizes, and compiled it
    gives the eager bits: float8 values and float32 row scales."""
    from torch._dynamo.testing import CompileCounter

    from hvbatch.models.fp8 import quantize_rows

    counter = CompileCounter()
    fused = torch.compile(quantize_rows, backend=counter, dynamic=True, fullgraph=True)
    for rows, width in ((37, 64), (5, 320), (119, 48)):  # one graph for every M and K
        x = torch.randn(rows, width, dtype=torch.bfloat16) * 3
        q, scale = fused(x)
        q_ref, scale_ref = quantize_rows(x)
        assert q.dtype == FP8_DTYPE and scale.dtype == torch.float32 and scale.shape == (rows, 1)
        assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)) and torch.equal(scale, scale_ref)
    assert counter.frame_count == 1
    big = torch.full((2, 16), 448.0 * 7)
    assert torch.isfinite(quantize_rows(big)[0].float()).all()  # the clamp: no NaN from rounding above 448
