"""Building blocks of the causal 3D VAEs (HunyuanVideo's; the 1.5 VAE reuses the causal conv and the
frame-causal attention), and the encoder's posterior (`DiagonalGaussian`), family-neutral.

Shapes: `B` batch, `C` channels, `T` frames, `H` height, `W` width, `L = T*H*W` tokens.
Every tensor between blocks is `x_BCTHW`. Attribute names (`conv`, `norm1`, `conv_shortcut`,
`downsamplers`, `attentions`, `to_q`, `to_out`, ...) are the official checkpoint's key names,
which diffusers' `AutoencoderKLHunyuanVideo` shares; do not rename them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

Triple = tuple[int, int, int]

GROUP_NORM_EPS = 1e-6


def silu(x: torch.Tensor) -> torch.Tensor:
    """SiLU that works in place when no gradient is recorded (saves one activation-sized buffer)."""
    if torch.is_grad_enabled():
        return F.silu(x)
    return F.silu(x, inplace=True)


class CausalConv3d(nn.Module):
    """Conv3d that only looks at current and past frames.

    The input is padded with replicated border values: W and H symmetrically by `k//2`,
    and T at the front only by `k_t - 1`, so output frame `t` depends on input frames `<= t`.
    The weights live in `self.conv` (key `<name>.conv.weight`).
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: Triple = (1, 1, 1)
    ) -> None:
        super().__init__()
        k = kernel_size
        # F.pad order is (W_left, W_right, H_top, H_bottom, T_front, T_back).
        self.padding = (k // 2, k // 2, k // 2, k // 2, k - 1, 0)
        self.conv = nn.Conv3d(in_channels, out_channels, kernel_size=k, stride=stride, padding=0)

    def forward(self, x_BCTHW: torch.Tensor) -> torch.Tensor:
        if any(self.padding):
            x_BCTHW = F.pad(x_BCTHW, self.padding, mode="replicate")
        return self.conv(x_BCTHW)


class ResnetBlockCausal3D(nn.Module):
    """GroupNorm -> SiLU -> conv1 -> GroupNorm -> SiLU -> conv2, plus a (1x1x1 when C changes) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=GROUP_NORM_EPS)
        self.conv1 = CausalConv3d(in_channels, out_channels, 3)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=GROUP_NORM_EPS)
        self.conv2 = CausalConv3d(out_channels, out_channels, 3)
        self.conv_shortcut = (
            CausalConv3d(in_channels, out_channels, 1) if in_channels != out_channels else None
        )

    def forward(self, x_BCTHW: torch.Tensor) -> torch.Tensor:
        h = self.conv1(silu(self.norm1(x_BCTHW)))
        h = self.conv2(silu(self.norm2(h)))
        shortcut = x_BCTHW if self.conv_shortcut is None else self.conv_shortcut(x_BCTHW)
        return h.add_(shortcut)  # h is a fresh conv output; conv backward does not need it


# Largest attention-score matrix (batch x queries x keys) one SDPA call may need. Bounds memory
# even where SDPA falls back to its math kernel (one head of dim 512 exceeds flash attention's limit).
MAX_SCORES_PER_CALL = 1 << 28


def frame_causal_attention(
    q_BLD: torch.Tensor, k_BLD: torch.Tensor, v_BLD: torch.Tensor, frames: int
) -> torch.Tensor:
    """Single-head attention where a token of frame `f` sees every token of frames `0..f`.

    The `L` tokens are ordered `(T, H, W)`, so frame `f` owns tokens `[f*HW, (f+1)*HW)` and its
    keys are the prefix `[0, (f+1)*HW)`. Looping over frames and calling SDPA on that prefix
    gives the same result as the official additive `L x L` mask without ever building it, and
    skips the masked half of the work. A frame's queries are split further when
    `batch * queries * keys` would exceed `MAX_SCORES_PER_CALL`. Returns `o_BLD`.
    """
    batch, length = q_BLD.shape[:2]
    assert length % frames == 0, (length, frames)
    q, k, v = (t.unsqueeze(1) for t in (q_BLD, k_BLD, v_BLD))  # B 1 L D: one head
    per_frame = length // frames
    out_B1LD = torch.empty_like(q)
    for f in range(frames):
        keys_stop = (f + 1) * per_frame
        chunk = max(1, min(per_frame, MAX_SCORES_PER_CALL // (batch * keys_stop)))
        for start in range(f * per_frame, keys_stop, chunk):
            stop = min(start + chunk, keys_stop)
            out_B1LD[:, :, start:stop] = F.scaled_dot_product_attention(
                q[:, :, start:stop], k[:, :, :keys_stop], v[:, :, :keys_stop]
            )
    return out_B1LD.squeeze(1)


class FrameCausalAttention(nn.Module):
    """Mid-block self-attention: GroupNorm, one head over all channels, frame-causal, residual."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=GROUP_NORM_EPS)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])  # key `to_out.0.*`

    def forward(self, x_BCTHW: torch.Tensor) -> torch.Tensor:
        batch, channels, frames, height, width = x_BCTHW.shape
        h_BLC = self.group_norm(x_BCTHW).permute(0, 2, 3, 4, 1).reshape(batch, -1, channels)
        o_BLC = frame_causal_attention(self.to_q(h_BLC), self.to_k(h_BLC), self.to_v(h_BLC), frames)
        o_BLC = self.to_out[0](o_BLC)
        o_BCTHW = o_BLC.reshape(batch, frames, height, width, channels).permute(0, 4, 1, 2, 3)
        return x_BCTHW + o_BCTHW  # x first: the sum takes x's contiguous BCTHW layout


class MidBlockCausal3D(nn.Module):
    """resnet -> (attention) -> resnet at the lowest resolution."""

    def __init__(self, channels: int, groups: int, add_attention: bool) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlockCausal3D(channels, channels, groups) for _ in range(2)])
        attentions = [FrameCausalAttention(channels, groups)] if add_attention else []
        self.attentions = nn.ModuleList(attentions)

    def forward(self, x_BCTHW: torch.Tensor) -> torch.Tensor:
        x_BCTHW = self.resnets[0](x_BCTHW)
        for attention in self.attentions:
            x_BCTHW = attention(x_BCTHW)
        return self.resnets[1](x_BCTHW)


class DownsampleCausal3D(nn.Module):
    """Strided causal conv: T -> (T-1)//s_t + 1, H -> ceil(H/s_h), W -> ceil(W/s_w)."""

    def __init__(self, channels: int, stride: Triple) -> None:
        super().__init__()
        self.conv = CausalConv3d(channels, channels, 3, stride=stride)

    def forward(self, x_BCTHW: torch.Tensor) -> torch.Tensor:
        return self.conv(x_BCTHW)


def _repeat_nearest(x: torch.Tensor, factors: tuple[int, ...]) -> torch.Tensor:
    """Nearest-neighbour upsampling of the trailing `len(factors)` dims by integer factors."""
    if all(f == 1 for f in factors):
        return x
    # .contiguous(): nearest interpolation of a non-contiguous slice is unreliable (pytorch#81665).
    return F.interpolate(x.contiguous(), scale_factor=factors, mode="nearest")


class UpsampleCausal3D(nn.Module):
    """Nearest upsampling that keeps frame 0 single, then a causal conv.

    Frame 0 is upsampled in H, W only; frames 1.. by (s_t, s_h, s_w), so T -> 1 + s_t*(T-1).
    """

    def __init__(self, channels: int, factor: Triple) -> None:
        super().__init__()
        self.factor = factor
        self.conv = CausalConv3d(channels, channels, 3)

    def forward(self, x_BCTHW: torch.Tensor) -> torch.Tensor:
        first_BCHW = _repeat_nearest(x_BCTHW[:, :, 0], self.factor[1:])
        if x_BCTHW.shape[2] == 1:
            return self.conv(first_BCHW.unsqueeze(2))
        rest_BCTHW = _repeat_nearest(x_BCTHW[:, :, 1:], self.factor)
        return self.conv(torch.cat([first_BCHW.unsqueeze(2), rest_BCTHW], dim=2))


class DownBlockCausal3D(nn.Module):
    """`layers` resnets, then an optional strided downsampler (key `downsamplers.0`)."""

    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int, stride: Triple) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            [
                ResnetBlockCausal3D(in_channels if i == 0 else out_channels, out_channels, groups)
                for i in range(layers)
            ]
        )
        down = [DownsampleCausal3D(out_channels, stride)] if stride != (1, 1, 1) else []
        self.downsamplers = nn.ModuleList(down)

    def forward(self, x_BCTHW: torch.Tensor) -> torch.Tensor:
        for module in [*self.resnets, *self.downsamplers]:
            x_BCTHW = module(x_BCTHW)
        return x_BCTHW


class UpBlockCausal3D(nn.Module):
    """`layers` resnets, then an optional upsampler (key `upsamplers.0`)."""

    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int, factor: Triple) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            [
                ResnetBlockCausal3D(in_channels if i == 0 else out_channels, out_channels, groups)
                for i in range(layers)
            ]
        )
        up = [UpsampleCausal3D(out_channels, factor)] if factor != (1, 1, 1) else []
        self.upsamplers = nn.ModuleList(up)

    def forward(self, x_BCTHW: torch.Tensor) -> torch.Tensor:
        for module in [*self.resnets, *self.upsamplers]:
            x_BCTHW = module(x_BCTHW)
        return x_BCTHW


@dataclass(frozen=True)
class DiagonalGaussian:
    """The encoder's posterior over raw latents z: `mean_BCTHW` and clamped `logvar_BCTHW`."""

    mean: torch.Tensor
    logvar: torch.Tensor

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar)

    def mode(self) -> torch.Tensor:
        return self.mean

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(
            self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype
        )
        return self.mean + self.std * noise
