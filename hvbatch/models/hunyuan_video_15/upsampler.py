"""The latent upsamplers of HunyuanVideo-1.5's super-resolution stage, with the official names.

Official `hyvideo/models/transformers/modules/upsample.py`. Both refine latents that the SR
pipeline has already resized (bilinear, per frame) to the output's latent grid; neither changes
T, H or W, and both run in float32 in the official pipeline:
- `SRTo720pUpsampler` (480p -> 720p): causal conv in, `num_blocks` residual blocks of three causal
  convs with SiLU between them, causal conv out, plus the input when `global_residual` is set and
  the shapes agree;
- `SRTo1080pUpsampler` (720p -> 1080p): causal conv in plus the input with each channel repeated,
  `num_res_blocks + 1` VAE resnet blocks per entry of `block_out_channels` (no resampling: the
  official levels have no `upsample`), RMS norm, SiLU, causal conv out. `is_residual` is stored
  in its config but unused by the official forward.

Shapes: `x_BCTHW` latents. Attribute names (`in_conv.conv`, `blocks.N.block.0.conv`,
`up.N.block.M.norm1.gamma`, `nin_shortcut`, `norm_out.gamma`, ...) are the official checkpoint's key
names; do not rename them. The causal convs and resnet blocks are the 1.5 VAE's.

`from_official_config` reads an `upsampler/<version>/config.json`; keys the official constructor
does not take (`_class_name`, `_diffusers_version`, ...) are ignored, as diffusers' config loading
ignores them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hvbatch.models.hunyuan_video_15.vae_blocks import ChannelRMSNorm, ResnetBlock
from hvbatch.models.vae_blocks import CausalConv3d, silu

UPSAMPLER_720P = "SRTo720pUpsampler"
UPSAMPLER_1080P = "SRTo1080pUpsampler"


@dataclass(frozen=True)
class SRTo720pUpsamplerConfig:
    """Official `SRTo720pUpsampler.__init__` arguments (its defaults)."""

    in_channels: int = 32
    out_channels: int = 32
    hidden_channels: int = 64
    """The official default `None` means 64."""
    num_blocks: int = 6
    global_residual: bool = False

    class_name = UPSAMPLER_720P

    def validate(self) -> None:
        bad = [f"{k}={v}" for k, v in asdict(self).items() if not isinstance(v, bool) and v < 1]
        if bad:
            raise ValueError(f"invalid {self.class_name} config: {', '.join(bad)} must be >= 1")

    @classmethod
    def tiny(cls) -> SRTo720pUpsamplerConfig:
        return cls(hidden_channels=16, num_blocks=2, global_residual=True)

    @classmethod
    def from_official_config(cls, raw: Mapping[str, Any]) -> SRTo720pUpsamplerConfig:
        hidden = raw.get("hidden_channels")
        config = cls(
            in_channels=int(raw["in_channels"]),
            out_channels=int(raw["out_channels"]),
            hidden_channels=64 if hidden is None else int(hidden),
            num_blocks=int(raw.get("num_blocks", 6)),
            global_residual=bool(raw.get("global_residual", False)),
        )
        config.validate()
        return config

    def to_official_config(self) -> dict[str, Any]:
        return {"_class_name": self.class_name, **asdict(self)}


@dataclass(frozen=True)
class SRTo1080pUpsamplerConfig:
    """Official `SRTo1080pUpsampler.__init__` arguments (`block_out_channels` has no default there)."""

    z_channels: int = 32
    out_channels: int = 32
    block_out_channels: tuple[int, ...] = (64, 64)
    num_res_blocks: int = 2
    is_residual: bool = False

    class_name = UPSAMPLER_1080P

    def validate(self) -> None:
        problems = [
            f"{k}={v} must be >= 1"
            for k, v in (("z_channels", self.z_channels), ("out_channels", self.out_channels))
            if v < 1
        ]
        if self.num_res_blocks < 0:
            problems.append(f"num_res_blocks={self.num_res_blocks} must be >= 0")
        if not self.block_out_channels or min(self.block_out_channels) < 1:
            problems.append(f"block_out_channels={list(self.block_out_channels)} must be positive widths")
        elif self.z_channels >= 1 and self.block_out_channels[0] % self.z_channels:
            problems.append(
                f"block_out_channels[0]={self.block_out_channels[0]} must be a multiple of "
                f"z_channels={self.z_channels} (the input is added with each channel repeated)"
            )
        if problems:
            raise ValueError(f"invalid {self.class_name} config: " + "; ".join(problems))

    @classmethod
    def tiny(cls) -> SRTo1080pUpsamplerConfig:
        """Two levels of different width (so `nin_shortcut` exists), one extra block each."""
        return cls(block_out_channels=(64, 32), num_res_blocks=1)

    @classmethod
    def from_official_config(cls, raw: Mapping[str, Any]) -> SRTo1080pUpsamplerConfig:
        config = cls(
            z_channels=int(raw["z_channels"]),
            out_channels=int(raw["out_channels"]),
            block_out_channels=tuple(int(c) for c in raw["block_out_channels"]),
            num_res_blocks=int(raw.get("num_res_blocks", 2)),
            is_residual=bool(raw.get("is_residual", False)),
        )
        config.validate()
        return config

    def to_official_config(self) -> dict[str, Any]:
        values = asdict(self)
        return {"_class_name": self.class_name, **values, "block_out_channels": list(self.block_out_channels)}


UpsamplerConfig = SRTo720pUpsamplerConfig | SRTo1080pUpsamplerConfig


class SRResidualCausalBlock3D(nn.Module):
    """x + conv(SiLU(conv(SiLU(conv(x))))), causal 3x3x3 convs at a fixed width."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.block = nn.Sequential(
            CausalConv3d(channels, channels, 3),
            nn.SiLU(),
            CausalConv3d(channels, channels, 3),
            nn.SiLU(),
            CausalConv3d(channels, channels, 3),
        )

    def forward(self, x_BCTHW: torch.Tensor) -> torch.Tensor:
        return x_BCTHW + self.block(x_BCTHW)


class SRTo720pUpsampler(nn.Module):
    """The 480p -> 720p latent refiner (input already resized to the 720p latent grid)."""

    def __init__(self, config: SRTo720pUpsamplerConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.in_conv = CausalConv3d(config.in_channels, config.hidden_channels, 3)
        self.blocks = nn.ModuleList(
            [SRResidualCausalBlock3D(config.hidden_channels) for _ in range(config.num_blocks)]
        )
        self.out_conv = CausalConv3d(config.hidden_channels, config.out_channels, 3)

    def forward(self, x_BCTHW: torch.Tensor) -> torch.Tensor:
        y = self.in_conv(x_BCTHW)
        for block in self.blocks:
            y = block(y)
        y = self.out_conv(y)
        if self.config.global_residual and y.shape == x_BCTHW.shape:
            y = y + x_BCTHW
        return y


class _Level(nn.Module):
    """One official `up[i]` entry: a `block` list and, in the released model, no `upsample`."""

    def __init__(self, blocks: Sequence[nn.Module]) -> None:
        super().__init__()
        self.block = nn.ModuleList(blocks)


class SRTo1080pUpsampler(nn.Module):
    """The 720p -> 1080p latent refiner (input already resized to the 1080p latent grid)."""

    def __init__(self, config: SRTo1080pUpsamplerConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        block_in = config.block_out_channels[0]
        self.conv_in = CausalConv3d(config.z_channels, block_in, 3)
        levels = []
        for width in config.block_out_channels:
            blocks = []
            for _ in range(config.num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, width))
                block_in = width
            levels.append(_Level(blocks))
        self.up = nn.ModuleList(levels)
        self.norm_out = ChannelRMSNorm(block_in)
        self.conv_out = CausalConv3d(block_in, config.out_channels, 3)

    def forward(self, z_BCTHW: torch.Tensor, target_hw: tuple[int, int] | None = None) -> torch.Tensor:
        """`target_hw`: resize first (bilinear per frame), as the official forward's `target_shape`."""
        if target_hw is not None and tuple(z_BCTHW.shape[-2:]) != tuple(target_hw):
            z_BCTHW = resize_latents(z_BCTHW, target_hw)
        repeats = self.config.block_out_channels[0] // self.config.z_channels
        h = self.conv_in(z_BCTHW) + z_BCTHW.repeat_interleave(repeats, dim=1)
        for level in self.up:
            for block in level.block:
                h = block(h)
        return self.conv_out(silu(self.norm_out(h)))


Upsampler = SRTo720pUpsampler | SRTo1080pUpsampler


def build_upsampler(config: UpsamplerConfig) -> Upsampler:
    if isinstance(config, SRTo720pUpsamplerConfig):
        return SRTo720pUpsampler(config)
    return SRTo1080pUpsampler(config)


def resize_latents(x_BCTHW: torch.Tensor, size_hw: tuple[int, int]) -> torch.Tensor:
    """Each frame resized to `size_hw` by bilinear interpolation (`align_corners=False`), in its dtype:
    the official SR pipeline's resize of the base latents to the output latent grid."""
    batch, channels, frames = x_BCTHW.shape[:3]
    frames_NCHW = x_BCTHW.transpose(1, 2).reshape(batch * frames, channels, *x_BCTHW.shape[-2:])
    resized = F.interpolate(frames_NCHW, size=tuple(size_hw), mode="bilinear", align_corners=False)
    return resized.reshape(batch, frames, channels, *size_hw).transpose(1, 2).contiguous()
