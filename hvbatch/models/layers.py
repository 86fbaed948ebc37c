"""Building blocks of the HunyuanVideo transformer, with the official parameter names.

Shapes: B batch, L tokens, H heads, D head dim (or hidden size where noted), C channels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

LAYER_NORM_EPS = 1e-6


def modulate(x_BLD: torch.Tensor, shift_BD: torch.Tensor, scale_BD: torch.Tensor) -> torch.Tensor:
    return x_BLD * (1 + scale_BD[:, None]) + shift_BD[:, None]


def layer_norm(x_BLD: torch.Tensor) -> torch.Tensor:
    """The DiT's LayerNorms have no affine parameters (so no checkpoint keys)."""
    return F.layer_norm(x_BLD, (x_BLD.shape[-1],), eps=LAYER_NORM_EPS)


class RMSNorm(nn.Module):
    """RMS norm over the last dim, computed in float32 and cast back, then scaled."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_f = x.float()
        normed = x_f * torch.rsqrt(x_f.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


class ModulateDiT(nn.Module):
    """`linear(SiLU(vec))` producing `factor` modulation vectors (key: `*.linear`)."""

    def __init__(self, hidden_size: int, factor: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden_size, factor * hidden_size)

    def forward(self, vec_BD: torch.Tensor) -> torch.Tensor:
        return self.linear(F.silu(vec_BD))


class MLP(nn.Module):
    """fc1 -> activation -> fc2 (keys `fc1`, `fc2`)."""

    def __init__(self, dim: int, hidden_dim: int, activation: str) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        h = F.gelu(h, approximate="tanh") if self.activation == "gelu_tanh" else F.silu(h)
        return self.fc2(h)


class MLPEmbedder(nn.Module):
    """`out_layer(SiLU(in_layer(x)))`: the pooled-text embedder `vector_in`."""

    def __init__(self, in_dim: int, hidden_size: int) -> None:
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_size)
        self.out_layer = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_layer(F.silu(self.in_layer(x)))


class TextProjection(nn.Module):
    """`linear_2(SiLU(linear_1(x)))`: the refiner's context embedder `c_embedder`."""

    def __init__(self, in_dim: int, hidden_size: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, hidden_size)
        self.linear_2 = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


def timestep_frequencies(t_B: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding `[cos | sin]` (cos first) of float timesteps, in float32."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t_B.device) / half
    )
    args = t_B.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    """Sinusoidal frequencies -> Linear -> SiLU -> Linear (keys `mlp.0`, `mlp.2`)."""

    def __init__(self, hidden_size: int, frequency_dim: int = 256) -> None:
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(
            nn.Linear(frequency_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    def forward(self, t_B: torch.Tensor) -> torch.Tensor:
        freqs = timestep_frequencies(t_B, self.frequency_dim)
        return self.mlp(freqs.to(self.mlp[0].weight.dtype))


def rope_frequencies(
    grid_size: tuple[int, int, int], axes_dim: list[int], theta: float, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """3D RoPE tables `(cos, sin)`, each `[T*Hh*Ww, D]` in float32, tokens in (t, h, w) order.

    Each axis i rotates `axes_dim[i]` channels by integer positions 0..n-1; every frequency is
    repeated for its interleaved (even, odd) channel pair. Channels are [t | h | w].
    """
    positions = torch.meshgrid(
        *[torch.arange(n, dtype=torch.float32, device=device) for n in grid_size], indexing="ij"
    )
    cos_parts, sin_parts = [], []
    for pos, dim in zip(positions, axes_dim, strict=True):
        inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim)
        angles = torch.outer(pos.reshape(-1), inv_freq)
        cos_parts.append(angles.cos().repeat_interleave(2, dim=1))
        sin_parts.append(angles.sin().repeat_interleave(2, dim=1))
    return torch.cat(cos_parts, dim=1), torch.cat(sin_parts, dim=1)


def apply_rope(x_BLHD: torch.Tensor, cos_LD: torch.Tensor, sin_LD: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved channel pairs: (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin), in float32."""
    x_f = x_BLHD.float()
    x_pairs = x_f.unflatten(-1, (-1, 2))
    rotated = torch.stack((-x_pairs[..., 1], x_pairs[..., 0]), dim=-1).flatten(-2)
    out = x_f * cos_LD[None, :, None, :] + rotated * sin_LD[None, :, None, :]
    return out.type_as(x_BLHD)
