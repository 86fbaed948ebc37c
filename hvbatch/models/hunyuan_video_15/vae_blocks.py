"""Building blocks of the HunyuanVideo-1.5 VAE (official `hunyuanvideo_15_vae.py`).

Shapes: `B` batch, `C` channels, `T` frames, `H` height, `W` width, `L = T*H*W` tokens; every
tensor between blocks is `x_BCTHW`. Attribute names (`norm1.gamma`, `conv1.conv`, `nin_shortcut`,
`q`, `proj_out`, `downsample.conv.conv`, ...) are the official checkpoint's key names; the loader
renames diffusers' keys to them. Do not rename them.

Differences from 1.0's blocks: RMS norms over channels instead of GroupNorm, no attention heads
split (one head over all channels, as in 1.0), and resolution changes by pixel (un)shuffle: a
causal conv changes the width, cells are moved between channels and space/time, and a
parameter-free shortcut (channel means down, channel repeats up) is added.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hvbatch.models.vae_blocks import CausalConv3d, frame_causal_attention, silu

CHUNK_ELEMENTS = 1 << 27
"""Largest float32 temporary (elements) of the chunked norm and shortcut loops: 512 MiB."""


def _frame_chunk(x_BCTHW: torch.Tensor) -> int:
    """Frames per chunk so that a chunk of `x_BCTHW` holds at most CHUNK_ELEMENTS elements."""
    per_frame = x_BCTHW[:, :, :1].numel()
    return max(1, min(x_BCTHW.shape[2], CHUNK_ELEMENTS // max(per_frame, 1)))


class ChannelRMSNorm(nn.Module):
    """x / ||x||_C * sqrt(C) * gamma over the channel axis (official `RMS_norm(images=False)`).

    Half-precision inputs are normalized in float32, a chunk of frames at a time, and cast back.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.scale = channels**0.5
        self.gamma = nn.Parameter(torch.ones(channels, 1, 1, 1))

    def forward(self, x_BCTHW: torch.Tensor) -> torch.Tensor:
        if x_BCTHW.dtype == torch.float32:
            return F.normalize(x_BCTHW, dim=1).mul_(self.scale).mul_(self.gamma)
        out = torch.empty_like(x_BCTHW)
        gamma = self.gamma.float()
        step = _frame_chunk(x_BCTHW)
        for start in range(0, x_BCTHW.shape[2], step):
            part = F.normalize(x_BCTHW[:, :, start : start + step].float(), dim=1)
            out[:, :, start : start + step] = part.mul_(self.scale).mul_(gamma)
        return out


class ResnetBlock(nn.Module):
    """norm -> SiLU -> conv, twice, plus the input (through `nin_shortcut` when C changes)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm1 = ChannelRMSNorm(in_channels)
        self.conv1 = CausalConv3d(in_channels, out_channels, 3)
        self.norm2 = ChannelRMSNorm(out_channels)
        self.conv2 = CausalConv3d(out_channels, out_channels, 3)
        self.nin_shortcut = nn.Conv3d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x_BCTHW: torch.Tensor) -> torch.Tensor:
        h = self.conv1(silu(self.norm1(x_BCTHW)))
        h = self.conv2(silu(self.norm2(h)))
        shortcut = x_BCTHW if self.nin_shortcut is None else self.nin_shortcut(x_BCTHW)
        return h.add_(shortcut)  # h is a fresh conv output


class AttnBlock(nn.Module):
    """Mid-block self-attention: RMS norm, one head over all channels, frame-causal, residual.

    A token of frame f sees every token of frames 0..f (the official additive L x L mask), computed
    frame by frame without building the mask (`frame_causal_attention`).
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = ChannelRMSNorm(channels)
        self.q = nn.Conv3d(channels, channels, 1)
        self.k = nn.Conv3d(channels, channels, 1)
        self.v = nn.Conv3d(channels, channels, 1)
        self.proj_out = nn.Conv3d(channels, channels, 1)

    def _linear(self, conv: nn.Conv3d, x_BLC: torch.Tensor) -> torch.Tensor:
        return F.linear(x_BLC, conv.weight.flatten(1), conv.bias)

    def forward(self, x_BCTHW: torch.Tensor) -> torch.Tensor:
        batch, channels, frames, height, width = x_BCTHW.shape
        h_BLC = self.norm(x_BCTHW).permute(0, 2, 3, 4, 1).reshape(batch, -1, channels)
        q, k, v = (self._linear(conv, h_BLC) for conv in (self.q, self.k, self.v))
        o_BLC = self._linear(self.proj_out, frame_causal_attention(q, k, v, frames))
        o_BCTHW = o_BLC.reshape(batch, frames, height, width, channels).permute(0, 4, 1, 2, 3)
        return x_BCTHW + o_BCTHW


class MidBlock(nn.Module):
    """block_1 -> attn_1 -> block_2 at the lowest resolution (official `mid`)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x_BCTHW: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x_BCTHW)))


def unshuffle(x_BCTHW: torch.Tensor, r_t: int) -> torch.Tensor:
    """[B, C, r_t*T, 2H, 2W] -> [B, r_t*2*2*C, T, H, W], channels ordered (r_t, r_h, r_w, C)."""
    b, c, f, h, w = x_BCTHW.shape
    x = x_BCTHW.reshape(b, c, f // r_t, r_t, h // 2, 2, w // 2, 2).permute(0, 3, 5, 7, 1, 2, 4, 6)
    return x.reshape(b, r_t * 4 * c, f // r_t, h // 2, w // 2)


def shuffled_view(x_BCTHW: torch.Tensor, r_t: int) -> torch.Tensor:
    """[B, r_t*2*2*C, T, H, W] as an 8-D view [B, C, T, r_t, H, 2, W, 2] (the inverse of `unshuffle`)."""
    b, packed, f, h, w = x_BCTHW.shape
    return x_BCTHW.view(b, r_t, 2, 2, packed // (4 * r_t), f, h, w).permute(0, 4, 5, 1, 6, 2, 7, 3)


def shuffle(x_BCTHW: torch.Tensor, r_t: int) -> torch.Tensor:
    """[B, r_t*2*2*C, T, H, W] -> [B, C, r_t*T, 2H, 2W]."""
    b, packed, f, h, w = x_BCTHW.shape
    return shuffled_view(x_BCTHW, r_t).reshape(b, packed // (4 * r_t), r_t * f, 2 * h, 2 * w)


def _cells(x_BCTHW: torch.Tensor, r_t: int) -> torch.Tensor:
    """A [B, C, r_t*T, 2H, 2W] tensor seen as [B, C, T, r_t, H, 2, W, 2] (a view, for writing into)."""
    f, h, w = x_BCTHW.shape[2:]
    return x_BCTHW.unflatten(2, (f // r_t, r_t)).unflatten(4, (h // 2, 2)).unflatten(6, (w // 2, 2))


class Downsample(nn.Module):
    """Halve H, W (and T after the first frame): conv to out/cells channels, unshuffle, plus the
    unshuffled input averaged over groups of channels. The first frame is unshuffled in H, W only
    and its conv channels are duplicated, so T -> 1 + (T-1)/2."""

    def __init__(self, in_channels: int, out_channels: int, temporal: bool) -> None:
        super().__init__()
        cells = 8 if temporal else 4
        self.conv = CausalConv3d(in_channels, out_channels // cells, 3)
        self.temporal = temporal
        self.out_channels = out_channels
        self.group_size = cells * in_channels // out_channels

    def _mean(self, packed_BCTHW: torch.Tensor, group: int) -> torch.Tensor:
        b, _, f, h, w = packed_BCTHW.shape
        return packed_BCTHW.view(b, self.out_channels, group, f, h, w).mean(dim=2)

    def forward(self, x_BCTHW: torch.Tensor) -> torch.Tensor:
        h = self.conv(x_BCTHW)
        if not self.temporal:
            return unshuffle(h, 1).add_(self._mean(unshuffle(x_BCTHW, 1), self.group_size))
        first = unshuffle(h[:, :, :1], 1)
        h = torch.cat([torch.cat([first, first], dim=1), unshuffle(h[:, :, 1:], 2)], dim=2)
        shortcut = torch.cat(
            [
                self._mean(unshuffle(x_BCTHW[:, :, :1], 1), self.group_size // 2),
                self._mean(unshuffle(x_BCTHW[:, :, 1:], 2), self.group_size),
            ],
            dim=2,
        )
        return h.add_(shortcut)


class Upsample(nn.Module):
    """Double H, W (and T after the first frame): conv to out*cells channels, shuffle, plus the
    shuffled input with each channel repeated. The first frame is shuffled in H, W only and keeps
    the first half of its channels, so T -> 1 + 2(T-1)."""

    def __init__(self, in_channels: int, out_channels: int, temporal: bool) -> None:
        super().__init__()
        cells = 8 if temporal else 4
        self.conv = CausalConv3d(in_channels, out_channels * cells, 3)
        self.temporal = temporal
        self.out_channels = out_channels
        self.repeats = cells * out_channels // in_channels

    def forward(self, x_BCTHW: torch.Tensor) -> torch.Tensor:
        b, _, f, h, w = x_BCTHW.shape
        conv_BCTHW = self.conv(x_BCTHW)
        if not self.temporal:
            out = shuffle(conv_BCTHW, 1)
            del conv_BCTHW
            step = _frame_chunk(x_BCTHW) // self.repeats or 1
            for start in range(0, f, step):  # the repeated input is as large as `out`: add it in chunks
                part = x_BCTHW[:, :, start : start + step].repeat_interleave(self.repeats, dim=1)
                out[:, :, start : start + step] += shuffle(part, 1)
            return out
        out = conv_BCTHW.new_empty(b, self.out_channels, 1 + 2 * (f - 1), 2 * h, 2 * w)
        _cells(out[:, :, :1], 1).copy_(shuffled_view(conv_BCTHW[:, :, :1], 1)[:, : self.out_channels])
        _cells(out[:, :, 1:], 2).copy_(shuffled_view(conv_BCTHW[:, :, 1:], 2))
        del conv_BCTHW
        first = shuffle(x_BCTHW[:, :, :1], 1)
        out[:, :, :1].unflatten(1, (first.shape[1], self.repeats // 2)).add_(first.unsqueeze(2))
        rest = shuffle(x_BCTHW[:, :, 1:], 2)
        out[:, :, 1:].unflatten(1, (rest.shape[1], self.repeats)).add_(rest.unsqueeze(2))
        return out
