"""Float8 (e4m3fn) weights with a per-layer scale, dequantized at matmul time.

The official `*_fp8.pt` checkpoint stores the block linears' weights as float8_e4m3fn and a
separate `*_fp8_map.pt` with one scale per layer (keyed by module name). Keeping the weights
in float8 in memory is the point: about 10 GB less for the 13B model. `FP8Linear` computes
`F.linear(x, weight.to(x.dtype) * scale, bias)`, i.e. dequantize-then-GEMM, as the official
code does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FP8_DTYPE = torch.float8_e4m3fn


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
        # Not in the checkpoint's state dict: it comes from the separate scale map.
        self.register_buffer("fp8_scale", torch.ones(()), persistent=False)

    @classmethod
    def like(cls, linear: nn.Linear) -> FP8Linear:
        return cls(linear.in_features, linear.out_features, bias=linear.bias is not None)

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.to(x.dtype) * self.fp8_scale.to(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, weight, bias)


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
    scale = weight.detach().abs().max().float().clamp(min=1e-12) / torch.finfo(FP8_DTYPE).max
    return (weight.float() / scale).to(FP8_DTYPE), scale
