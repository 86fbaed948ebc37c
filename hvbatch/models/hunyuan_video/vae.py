"""HunyuanVideo's causal 3D VAE (official `AutoencoderKLCausal3D`, diffusers `AutoencoderKLHunyuanVideo`).

Shape legend:
    B  batch
    C  channels (3 for video, `latent_channels` = 16 for latents)
    T  frames: video T = 1 + 4*(T_lat - 1) for T_lat latent frames
    H, W  height and width: video = 8 * latent
    x_BCTHW  video in [-1, 1];  z_BCTHW  raw latent;  latents  = z * scaling_factor (what the DiT sees)

Parameter names equal the official checkpoint's (and diffusers'), so either state dict loads
with `strict=True`. Scaling convention:
    encode(x).mode() / .sample()  -> raw latent z (NOT multiplied by scaling_factor)
    decode(z)                     -> video in about [-1, 1], unclamped, model dtype, never tiled
    decode_latents(latents)       -> divides by scaling_factor itself, optionally tiles, and returns
                                     float32 video in [0, 1]: (x / 2 + 0.5).clamp(0, 1)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn

from hvbatch.models.vae_blocks import (
    GROUP_NORM_EPS,
    CausalConv3d,
    DiagonalGaussian,
    DownBlockCausal3D,
    MidBlockCausal3D,
    Triple,
    UpBlockCausal3D,
    silu,
)
from hvbatch.models.vae_tiling import VaeTilingConfig, tiled_decode

_CONFIG_ALIASES = {"time_compression_ratio": "temporal_compression_ratio"}  # official name -> ours
_CLASS_NAMES = ("AutoencoderKLCausal3D", "AutoencoderKLHunyuanVideo")
_DOWN_BLOCK_TYPES = ("DownEncoderBlockCausal3D", "HunyuanVideoDownBlock3D")
_UP_BLOCK_TYPES = ("UpDecoderBlockCausal3D", "HunyuanVideoUpBlock3D")
_IGNORED_KEYS = ("sample_size", "sample_tsize", "force_upcast")  # training-time / tiling hints


@dataclass(frozen=True, kw_only=True)
class VaeConfig:
    """Sizes of the causal 3D VAE. Defaults are the released HunyuanVideo VAE."""

    in_channels: int = 3
    """Video channels fed to the encoder."""
    out_channels: int = 3
    """Video channels produced by the decoder."""
    latent_channels: int = 16
    """Channels of the latent z (the encoder emits 2x for mean and log-variance)."""
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    """Channels per resolution level, encoder order (the decoder walks it backwards)."""
    layers_per_block: int = 2
    """Resnets per encoder level; decoder levels have one more."""
    norm_num_groups: int = 32
    """GroupNorm groups everywhere; must divide every entry of block_out_channels."""
    scaling_factor: float = 0.476986
    """The DiT works on z * scaling_factor."""
    temporal_compression_ratio: int = 4
    """Latent frame j >= 1 covers 4 video frames; only 4 is supported (as in both reference codes)."""
    spatial_compression_ratio: int = 8
    """Pixels per latent cell along H and W; a power of two."""
    mid_block_add_attention: bool = True
    """Whether the middle blocks have the frame-causal self-attention."""

    def __post_init__(self) -> None:
        channels = self.block_out_channels
        if not isinstance(channels, (list, tuple)) or not all(_is_count(c) for c in channels) or not channels:
            raise ValueError(
                f"VAE config: block_out_channels must be a list of positive ints, got {channels!r}"
            )
        object.__setattr__(self, "block_out_channels", tuple(channels))
        counts = {
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "latent_channels": self.latent_channels,
            "layers_per_block": self.layers_per_block,
            "norm_num_groups": self.norm_num_groups,
            "temporal_compression_ratio": self.temporal_compression_ratio,
            "spatial_compression_ratio": self.spatial_compression_ratio,
        }
        bad = {k: v for k, v in counts.items() if not _is_count(v)}
        if bad:
            raise ValueError(f"VAE config: these sizes must be positive integers: {bad}")
        attention = self.mid_block_add_attention
        if not isinstance(attention, bool):
            raise ValueError(f"VAE config: mid_block_add_attention must be true or false, got {attention!r}")
        odd = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if odd:
            raise ValueError(
                f"VAE config: norm_num_groups={self.norm_num_groups} must divide every block_out_channels "
                f"entry, but not {odd}; pick a group count that divides {self.block_out_channels}"
            )
        factor = self.scaling_factor
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 0:
            raise ValueError(f"VAE config: scaling_factor must be > 0, got {self.scaling_factor}")
        self.down_strides()  # validates the compression ratios against the number of levels

    def down_strides(self) -> list[Triple]:
        """(T, H, W) stride of each encoder level's downsampler; (1, 1, 1) means none.

        Spatial halving at levels `i < log2(spatial)`, temporal halving at the two levels just
        before the last one (official rule for a temporal ratio of 4).
        """
        levels, s, t = (
            len(self.block_out_channels),
            self.spatial_compression_ratio,
            self.temporal_compression_ratio,
        )
        if t != 4:
            raise ValueError(f"VAE config: temporal_compression_ratio={t} is not supported; only 4 is")
        if s < 2 or s & (s - 1) or int(math.log2(s)) > levels:
            raise ValueError(
                f"VAE config: spatial_compression_ratio={s} must be a power of two with at most "
                f"len(block_out_channels)={levels} halvings"
            )
        if levels < 3:
            raise ValueError(
                f"VAE config: a temporal ratio of 4 needs >= 3 levels, got block_out_channels of {levels}"
            )
        spatial_levels, time_levels = int(math.log2(s)), int(math.log2(t))
        strides: list[Triple] = []
        for i in range(levels):
            st = 2 if levels - 1 - time_levels <= i < levels - 1 else 1
            sp = 2 if i < spatial_levels else 1
            strides.append((st, sp, sp))
        assert math.prod(x[0] for x in strides) == t and math.prod(x[1] for x in strides) == s, strides
        return strides

    @classmethod
    def from_diffusers_config(cls, config: Mapping[str, Any], *, source: str = "config") -> VaeConfig:
        """Build from a diffusers or official `config.json` dict (both layouts are accepted).

        Keys starting with `_` (except a wrong `_class_name`) and sampling hints such as
        `sample_size` are ignored; any other unknown key or unsupported value is a ValueError,
        so a config this code cannot honour is never silently misread.
        """
        own = {f.name for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        unknown = []
        for key, value in config.items():
            name = _CONFIG_ALIASES.get(key, key)
            if name in own:
                if name in kwargs and kwargs[name] != value:
                    raise ValueError(f"{source}: {key}={value!r} contradicts {name}={kwargs[name]!r}")
                kwargs[name] = value
            elif not _check_extra_key(key, value, source):
                unknown.append(key)
        if unknown:
            raise ValueError(
                f"{source}: unknown VAE config keys {sorted(unknown)}; known keys are {sorted(own)} "
                f"plus {sorted(_CONFIG_ALIASES)} and the ignored {list(_IGNORED_KEYS)}"
            )
        try:
            cfg = cls(**kwargs)
        except ValueError as err:
            raise ValueError(f"{source}: {err}") from None
        for key in ("down_block_types", "up_block_types"):
            if key in config and len(config[key]) != len(cfg.block_out_channels):
                raise ValueError(
                    f"{source}: {key} has {len(config[key])} entries but block_out_channels "
                    f"{len(cfg.block_out_channels)}"
                )
        return cfg


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _check_extra_key(key: str, value: Any, source: str) -> bool:
    """Validate a config key that is not a VaeConfig field. Returns False if the key is unknown."""
    allowed: dict[str, tuple[Any, ...]] = {"act_fn": ("silu", "swish"), "_class_name": _CLASS_NAMES}
    if key in allowed:
        if value not in allowed[key]:
            raise ValueError(f"{source}: {key}={value!r} is not supported; expected one of {allowed[key]}")
        return True
    block_types = {"down_block_types": _DOWN_BLOCK_TYPES, "up_block_types": _UP_BLOCK_TYPES}
    if key in block_types:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{source}: {key} must be a list of block type names, got {value!r}")
        wrong = [v for v in value if v not in block_types[key]]
        if wrong:
            raise ValueError(
                f"{source}: {key} entries {wrong} are not supported; expected {block_types[key]}"
            )
        return True
    if key == "shift_factor":
        if value not in (None, 0, 0.0):
            raise ValueError(
                f"{source}: shift_factor={value!r} is not supported by the HunyuanVideo VAE (use null)"
            )
        return True
    return key.startswith("_") or key in _IGNORED_KEYS


class EncoderCausal3D(nn.Module):
    """video x_BCTHW -> moments [B, 2*latent_channels, (T-1)//4 + 1, H/8, W/8] (before quant_conv)."""

    def __init__(self, cfg: VaeConfig) -> None:
        super().__init__()
        ch, groups = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = CausalConv3d(cfg.in_channels, ch[0], 3)
        self.down_blocks = nn.ModuleList(
            DownBlockCausal3D(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, groups, stride)
            for i, stride in enumerate(cfg.down_strides())
        )
        self.mid_block = MidBlockCausal3D(ch[-1], groups, cfg.mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(groups, ch[-1], eps=GROUP_NORM_EPS)
        self.conv_out = CausalConv3d(ch[-1], 2 * cfg.latent_channels, 3)

    def forward(self, x_BCTHW: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x_BCTHW)
        for block in self.down_blocks:
            h = block(h)
        h = self.mid_block(h)
        return self.conv_out(silu(self.conv_norm_out(h)))


class DecoderCausal3D(nn.Module):
    """raw latent z_BCTHW (after post_quant_conv) -> video [B, out_channels, 1 + 4(T-1), 8H, 8W]."""

    def __init__(self, cfg: VaeConfig) -> None:
        super().__init__()
        ch, groups = cfg.block_out_channels[::-1], cfg.norm_num_groups
        self.conv_in = CausalConv3d(cfg.latent_channels, ch[0], 3)
        self.mid_block = MidBlockCausal3D(ch[0], groups, cfg.mid_block_add_attention)
        # Official rule: up level i uses the same (T, H, W) factor as down level i's stride.
        self.up_blocks = nn.ModuleList(
            UpBlockCausal3D(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, groups, factor)
            for i, factor in enumerate(cfg.down_strides())
        )
        self.conv_norm_out = nn.GroupNorm(groups, ch[-1], eps=GROUP_NORM_EPS)
        self.conv_out = CausalConv3d(ch[-1], cfg.out_channels, 3)

    def forward(self, z_BCTHW: torch.Tensor) -> torch.Tensor:
        h = self.mid_block(self.conv_in(z_BCTHW))
        for block in self.up_blocks:
            h = block(h)
        return self.conv_out(silu(self.conv_norm_out(h)))


class AutoencoderKLCausal3D(nn.Module):
    """HunyuanVideo's VAE. See the module docstring for the latent scaling convention."""

    def __init__(self, cfg: VaeConfig) -> None:
        super().__init__()
        self.config = cfg
        self.encoder = EncoderCausal3D(cfg)
        self.decoder = DecoderCausal3D(cfg)
        self.quant_conv = nn.Conv3d(2 * cfg.latent_channels, 2 * cfg.latent_channels, kernel_size=1)
        self.post_quant_conv = nn.Conv3d(cfg.latent_channels, cfg.latent_channels, kernel_size=1)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def encode(self, x_BCTHW: torch.Tensor) -> DiagonalGaussian:
        """Video in [-1, 1] with T = 1 + 4k frames and H, W multiples of 8 -> posterior over raw z."""
        cfg = self.config
        _check_5d(x_BCTHW, cfg.in_channels, "video")
        _, _, frames, height, width = x_BCTHW.shape
        t, s = cfg.temporal_compression_ratio, cfg.spatial_compression_ratio
        if (frames - 1) % t or height % s or width % s:
            raise ValueError(
                f"encode: video of {frames} frames x {height} x {width} does not fit the VAE grid; "
                f"use 1 + {t}k frames and a height and width divisible by {s} (crop or pad first)"
            )
        moments = self.quant_conv(self.encoder(x_BCTHW))
        mean, logvar = moments.chunk(2, dim=1)
        return DiagonalGaussian(mean, logvar.clamp(-30.0, 20.0))

    def decode(self, z_BCTHW: torch.Tensor) -> torch.Tensor:
        """Raw latent z (NOT scaled) -> video in about [-1, 1], unclamped, in the model's dtype.

        Decodes the whole latent at once; use `decode_latents` with a tiling config for big videos.
        """
        _check_5d(z_BCTHW, self.config.latent_channels, "latent")
        return self.decoder(self.post_quant_conv(z_BCTHW))

    def forward(self, z_BCTHW: torch.Tensor) -> torch.Tensor:
        return self.decode(z_BCTHW)

    def decode_latents(self, latents: torch.Tensor, tiling: VaeTilingConfig | None = None) -> torch.Tensor:
        """DiT latents (z * scaling_factor) -> float32 video in [0, 1], shape [B, C, 1+4(T-1), 8H, 8W].

        Divides by `scaling_factor` itself, casts to the model's dtype and device, and decodes in
        tiles when `tiling` is given and enabled (see `vae_tiling.VaeTilingConfig`).
        """
        param = next(self.parameters())
        z = (latents.to(device=param.device, dtype=torch.float32) / self.config.scaling_factor).to(
            param.dtype
        )
        if tiling is not None and tiling.enabled:
            video = tiled_decode(
                self.decode,
                z,
                tiling,
                self.config.temporal_compression_ratio,
                self.config.spatial_compression_ratio,
            )
        else:
            video = self.decode(z).float()
        return video.div_(2).add_(0.5).clamp_(0.0, 1.0)


def _check_5d(x: torch.Tensor, channels: int, what: str) -> None:
    if x.ndim != 5 or x.shape[1] != channels:
        raise ValueError(f"expected a {what} tensor [B, {channels}, T, H, W], got shape {tuple(x.shape)}")
