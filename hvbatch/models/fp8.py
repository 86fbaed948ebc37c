"""Float8 (e4m3fn) block linears that compute in FP8: `torch._scaled_mm` with dynamic per-token scales.

Two sources of FP8 weights:
- the official `*_fp8.pt` checkpoint stores every linear of the double and single blocks as
  float8_e4m3fn, with a separate `*_fp8_map.pt` holding one scale per layer (per tensor);
- `model.quantize=fp8` quantizes a bf16 checkpoint's same layers at load, one scale per output row.
The set follows the official FP8 map: every `nn.Linear` under `double_blocks.` / `single_blocks.`
(attention qkv/proj, MLPs, linear1/linear2 and the modulation linears). The embedders (`img_in`,
`txt_in`, `time_in`, `vector_in`, `guidance_in`) and `final_layer` stay in the compute dtype.

`FP8Linear.forward` quantizes each token row of the input with its own scale
(amax / 448), runs one FP8 GEMM with the row scales of both sides, and adds the bias in the
compute dtype: the weight stays float8 in memory and is never dequantized. Where `_scaled_mm`
cannot serve (a dimension not a multiple of 16, or a GPU below sm89) the layer falls back to
`F.linear(x, weight.to(x.dtype) * scale, bias)`, the official code's dequantize-then-GEMM.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max
FP8_PREFIXES = ("double_blocks.", "single_blocks.")
QUANTIZE_CHOICES = ("none", "fp8")


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
        x_MK = x.reshape(-1, self.in_features)
        scale_M1 = (x_MK.abs().amax(dim=1, keepdim=True).float() / FP8_MAX).clamp(min=1e-12)
        x_fp8 = (x_MK.float() / scale_M1).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
        # Row-wise scaled GEMMs on CUDA produce bfloat16.
        out_dtype = x.dtype if x.device.type == "cpu" else torch.bfloat16
        out_MN = torch._scaled_mm(
            x_fp8, self.weight.t(), scale_a=scale_M1, scale_b=self.fp8_scale_1N, out_dtype=out_dtype
        ).to(x.dtype)
        if self.bias is not None:
            out_MN = out_MN + self.bias.to(x.dtype)
        return out_MN.reshape(*x.shape[:-1], self.out_features)


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
