"""Float8 (e4m3fn) block linears that compute in FP8: `torch._scaled_mm` with dynamic per-token scales.

Two sources of FP8 weights:
- the official `*_fp8.pt` checkpoint stores every linear of the double and single blocks as
  float8_e4m3fn, with a separate `*_fp8_map.pt` holding one scale per layer (per tensor);
- `model.quantize=fp8` quantizes a bf16 checkpoint's same layers at load, one scale per output row.
The set follows the official FP8 map: every `nn.Linear` under `double_blocks.` / `single_blocks.`
(attention qkv/proj, MLPs, linear1/linear2 and the modulation linears). The embedders (`img_in`,
`txt_in`, `time_in`, `vector_in`, `guidance_in`) and `final_layer` stay in the compute dtype.

`FP8Linear.forward` quantizes each token row of the input with its own scale (amax / 448) and
runs one FP8 GEMM with the row scales of both sides, the bias added and fast accumulation on
inside `_scaled_mm`: the weight stays float8 in memory and is never dequantized. On a GPU the
quantization is one compiled (fused) function, `quantize_rows`: the input is read twice (amax,
then scale and cast) and only its float8 copy (1 byte per element) and a float32 scale per row are
written; eager it would be six passes with float32 temporaries (about 40 bytes per element of
the widest input live at once), which costs more memory traffic than the FP8 GEMM saves. If the
compile fails the eager function runs (logged once). Where `_scaled_mm` cannot serve (a dimension
not a multiple of 16, or a GPU below sm89) the layer falls back to
`F.linear(x, weight.to(x.dtype) * scale, bias)`, the official code's dequantize-then-GEMM.

Speed is unmeasured until `benchmarks/gpu_check.py` runs on a GPU (its `step_fp8` phase and the
`fp8` verdict): `model.quantize` stays `none` by default.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max
FP8_PREFIXES = ("double_blocks.", "single_blocks.")
QUANTIZE_CHOICES = ("none", "fp8")
logger = logging.getLogger(__name__)


def quantize_rows(x_MK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row e4m3: `x[m] ~ q[m] * scale[m]`, scale `[M, 1]` float32 = amax / 448 (the clamp keeps a
    value rounded just above 448 from turning into NaN: e4m3fn has no infinity)."""
    scale_M1 = (x_MK.abs().amax(dim=1, keepdim=True).float() / FP8_MAX).clamp(min=1e-12)
    return (x_MK.float() / scale_M1).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale_M1


_fused: dict[str, Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]] = {}


def fused_quantize_rows(x_MK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_rows`, compiled once per process on a CUDA device (one graph: sizes dynamic).

    On the CPU it runs eagerly (no fusion to gain there); inside a compiled block it is traced
    into the block's graph like any other code.
    """
    if x_MK.device.type != "cuda" or torch.compiler.is_compiling():
        return quantize_rows(x_MK)
    fn = _fused.get("cuda")
    if fn is None:
        fn = _fused["cuda"] = torch.compile(quantize_rows, dynamic=True, fullgraph=True)
    try:
        return fn(x_MK)
    except Exception as err:  # a compiler failure must not stop a job: run the eager function
        logger.warning("fp8: the fused activation quantization did not compile (%s); running it eagerly", err)
        _fused["cuda"] = quantize_rows
        return quantize_rows(x_MK)


def fp8_gemm_supported(device: torch.device) -> bool:
    """`torch._scaled_mm` with row-wise scales runs on CPU and on CUDA GPUs of compute capability 8.9+."""
    if device.type == "cpu":
        return True
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


class FP8Linear(nn.Module):
    """A Linear whose weight stays float8 (same parameter names: `weight`, `bias`)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(
            torch.empty(out_features, in_features, dtype=FP8_DTYPE), requires_grad=False
        )
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        # Not in the checkpoint's state dict: they come from the separate scale map.
        self.register_buffer("fp8_scale", torch.ones(()), persistent=False)
        self.register_buffer("fp8_scale_1N", torch.ones(1, out_features), persistent=False)
        self.use_fp8_gemm = False
        """Run `_scaled_mm`; set by `enable_fp8_gemm` once the weights are on their device."""

    @classmethod
    def like(cls, linear: nn.Linear) -> FP8Linear:
        return cls(linear.in_features, linear.out_features, bias=linear.bias is not None)

    @property
    def gemm_shapes_ok(self) -> bool:
        return self.in_features % 16 == 0 and self.out_features % 16 == 0

    def set_scale(self, scale: torch.Tensor, name: str) -> None:
        """Scalar (per tensor) or `[out]` / `[out, 1]` (per output row) scales are accepted."""
        scale = scale.detach().float()
        if scale.numel() == 1:
            scale = scale.reshape(())
        elif scale.numel() == self.out_features:
            scale = scale.reshape(self.out_features, 1)
        else:
            raise ValueError(
                f"fp8 scale for {name} has shape {tuple(scale.shape)}: expected a scalar or "
                f"{self.out_features} per-row values"
            )
        self.fp8_scale = scale.to(self.weight.device)
        row_scales_1N = scale.reshape(1, -1).expand(1, self.out_features).contiguous()
        self.fp8_scale_1N = row_scales_1N.to(self.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_fp8_gemm:
            return self._fp8_gemm(x)
        weight = self.weight.to(x.dtype) * self.fp8_scale.to(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, weight, bias)

    def _fp8_gemm(self, x: torch.Tensor) -> torch.Tensor:
        x_fp8, scale_M1 = fused_quantize_rows(x.reshape(-1, self.in_features))
        # Row-wise scaled GEMMs on CUDA produce bfloat16 (and take the bias in it).
        out_dtype = x.dtype if x.device.type == "cpu" else torch.bfloat16
        out_MN = torch._scaled_mm(
            x_fp8,
            self.weight.t(),
            scale_a=scale_M1,
            scale_b=self.fp8_scale_1N,
            bias=None if self.bias is None else self.bias.to(out_dtype),
            out_dtype=out_dtype,
            use_fast_accum=True,
        )
        return out_MN.to(x.dtype).reshape(*x.shape[:-1], self.out_features)


def enable_fp8_gemm(model: nn.Module, enabled: bool = True) -> int:
    """Switch every `FP8Linear` to FP8 GEMMs where `_scaled_mm` can serve it; returns how many run so."""
    count = 0
    for module in model.modules():
        if isinstance(module, FP8Linear):
            module.use_fp8_gemm = (
                enabled and module.gemm_shapes_ok and fp8_gemm_supported(module.weight.device)
            )
            count += module.use_fp8_gemm
    return count


def swap_in_fp8_linears(model: nn.Module, module_names: set[str]) -> None:
    """Replace the named `nn.Linear` submodules by `FP8Linear` (on whatever device the model is)."""
    for name in module_names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear = getattr(parent, child)
        assert isinstance(linear, nn.Linear), f"{name} is not a Linear"
        setattr(parent, child, FP8Linear.like(linear))


def quantize_fp8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor quantization `w ~ q * scale`, scale = max|w| / 448 (the e4m3 maximum)."""
    scale = weight.detach().abs().max().float().clamp(min=1e-12) / FP8_MAX
    return (weight.float() / scale).to(FP8_DTYPE), scale


def quantize_fp8_rowwise(weight_NK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-row quantization `w[n] ~ q[n] * scale[n]`, scale `[N, 1]` = max|w[n]| / 448."""
    scale_N1 = (weight_NK.detach().abs().amax(dim=1, keepdim=True).float() / FP8_MAX).clamp(min=1e-12)
    return (weight_NK.float() / scale_N1).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale_N1


def fp8_layer_names(model: nn.Module) -> list[str]:
    """The linears the official FP8 map covers: every `nn.Linear` of the double and single blocks."""
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.startswith(FP8_PREFIXES)
    ]


@torch.no_grad()
def quantize_model_fp8(model: nn.Module) -> int:
    """`model.quantize=fp8`: block linears -> float8 weights with per-row scales, one layer at a time."""
    names = fp8_layer_names(model)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, child)
        with torch.device(linear.weight.device):
            fp8 = FP8Linear.like(linear)
        weight_q, scale = quantize_fp8_rowwise(linear.weight)
        fp8.weight = nn.Parameter(weight_q, requires_grad=False)
        if linear.bias is not None:
            fp8.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        fp8.set_scale(scale, name)
        setattr(parent, child, fp8)
    enable_fp8_gemm(model)
    return len(names)
