"""The HunyuanVideo-1.5 VAE (official `AutoencoderKLConv3D`, diffusers `AutoencoderKLHunyuanVideo15`).

Shape legend:
    B  batch
    C  channels (3 for video, `latent_channels` = 32 for latents)
    T  frames: video T = 1 + 4*(T_lat - 1) for T_lat latent frames (causal: front padding only)
    H, W  height and width: video = 16 * latent
    x_BCTHW  video in [-1, 1];  z_BCTHW  raw latent;  latents  = z * scaling_factor (what the DiT sees)

Parameter names are the official checkpoint's (`encoder.down.0.block.0.norm1.gamma`, ...); the
loader renames diffusers' (`encoder.down_blocks.0.resnets.0.norm1.gamma`, ...) to them. Same
scaling convention as 1.0's VAE (`hvbatch.models.vae`):
    encode(x).mode() / .sample()  -> raw latent z (NOT multiplied by scaling_factor)
    decode(z)                     -> video in about [-1, 1], unclamped, model dtype, never tiled
    decode_latents(latents)       -> divides by scaling_factor (the VAE has no shift), optionally
                                     tiles, and returns float32 video in [0, 1]

Tiling follows the official code: spatial only (every tile holds all frames), 256 px tiles
blended over 1/8 of a tile on GPUs with more than 21 GiB, 128 px over 1/4 otherwise, with the
official sequential blending (`OFFICIAL_TILING`, `official_tiling`); diffusers tiles at 256 px
over 1/4 (`DIFFUSERS_TILING`), with the same blending.
"""

from __future__ import annotations

import torch
from torch import nn

from hvbatch.models.hunyuan_video_15.vae_blocks import (
    ChannelRMSNorm,
    Downsample,
    MidBlock,
    ResnetBlock,
    Upsample,
)
from hvbatch.models.hunyuan_video_15.vae_config import HunyuanVideo15VaeConfig
from hvbatch.models.vae import DiagonalGaussian
from hvbatch.models.vae_blocks import CausalConv3d, silu
from hvbatch.models.vae_tiling import VaeTilingConfig, tiled_decode

OFFICIAL_TILING = VaeTilingConfig(
    tile_latent_size=16, tile_latent_overlap=2, temporal=False, blend="sequential"
)
"""The official decode on GPUs with more than 21 GiB: 256 px tiles, overlap factor 0.125 (32 px)."""
OFFICIAL_SMALL_GPU_TILING = VaeTilingConfig(
    tile_latent_size=8, tile_latent_overlap=2, temporal=False, blend="sequential"
)
"""The official decode on GPUs with at most 21 GiB: 128 px tiles, overlap factor 0.25 (32 px)."""
DIFFUSERS_TILING = VaeTilingConfig(
    tile_latent_size=16, tile_latent_overlap=4, temporal=False, blend="sequential"
)
"""diffusers' `enable_tiling()` defaults: 256 px tiles, overlap factor 0.25 (64 px)."""
OFFICIAL_LARGE_GPU_BYTES = 21 * 2**30
"""The official `get_vae_inference_config` threshold (total GPU memory, strictly more than this)."""


def official_tiling(gpu_memory_bytes: int) -> VaeTilingConfig:
    """The tiling the official pipeline picks for a GPU with `gpu_memory_bytes` of total memory."""
    return OFFICIAL_TILING if gpu_memory_bytes > OFFICIAL_LARGE_GPU_BYTES else OFFICIAL_SMALL_GPU_TILING


class Encoder(nn.Module):
    """video x_BCTHW -> moments [B, 2*latent_channels, (T-1)//4 + 1, H/16, W/16]."""

    def __init__(self, cfg: HunyuanVideo15VaeConfig) -> None:
        super().__init__()
        ch = list(cfg.block_out_channels)
        self.conv_in = CausalConv3d(cfg.in_channels, ch[0], 3)
        self.down = nn.ModuleList()
        width = ch[0]
        for level, out in enumerate(ch):
            stage = nn.Module()
            stage.block = nn.ModuleList(
                ResnetBlock(width if i == 0 else out, out) for i in range(cfg.layers_per_block)
            )
            temporal = cfg.down_temporal(level)
            if temporal is not None:
                stage.downsample = Downsample(out, ch[level + 1], temporal)
                out = ch[level + 1]
            width = out
            self.down.append(stage)
        self.mid = MidBlock(width)
        self.norm_out = ChannelRMSNorm(width)
        self.conv_out = CausalConv3d(width, 2 * cfg.latent_channels, 3)
        self.group_size = width // (2 * cfg.latent_channels)

    def forward(self, x_BCTHW: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x_BCTHW)
        for stage in self.down:
            for block in stage.block:
                h = block(h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
        h = self.mid(h)
        b, c, f, hh, ww = h.shape
        shortcut = h.view(b, c // self.group_size, self.group_size, f, hh, ww).mean(dim=2)
        return self.conv_out(silu(self.norm_out(h))).add_(shortcut)


class Decoder(nn.Module):
    """raw latent z_BCTHW -> video [B, out_channels, 1 + 4(T-1), 16H, 16W]."""

    def __init__(self, cfg: HunyuanVideo15VaeConfig) -> None:
        super().__init__()
        ch = list(cfg.block_out_channels)[::-1]
        self.conv_in = CausalConv3d(cfg.latent_channels, ch[0], 3)
        self.repeats = ch[0] // cfg.latent_channels
        self.mid = MidBlock(ch[0])
        self.up = nn.ModuleList()
        width = ch[0]
        for level, out in enumerate(ch):
            stage = nn.Module()
            layers = cfg.layers_per_block + 1
            stage.block = nn.ModuleList(ResnetBlock(width if i == 0 else out, out) for i in range(layers))
            temporal = cfg.up_temporal(level)
            if temporal is not None:
                stage.upsample = Upsample(out, ch[level + 1], temporal)
                out = ch[level + 1]
            width = out
            self.up.append(stage)
        self.norm_out = ChannelRMSNorm(width)
        self.conv_out = CausalConv3d(width, cfg.out_channels, 3)

    def forward(self, z_BCTHW: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z_BCTHW).add_(z_BCTHW.repeat_interleave(self.repeats, dim=1))
        h = self.mid(h)
        for stage in self.up:
            for block in stage.block:
                h = block(h)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)
        return self.conv_out(silu(self.norm_out(h)))


class AutoencoderKLConv3D(nn.Module):
    """The HunyuanVideo-1.5 VAE. See the module docstring for the latent scaling convention."""

    def __init__(self, cfg: HunyuanVideo15VaeConfig) -> None:
        super().__init__()
        cfg.validate()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def latent_channels(self) -> int:
        return self.config.latent_channels

    @property
    def spatial_compression_ratio(self) -> int:
        return self.config.spatial_compression_ratio

    @property
    def temporal_compression_ratio(self) -> int:
        return self.config.temporal_compression_ratio

    @property
    def scaling_factor(self) -> float:
        return self.config.scaling_factor

    @property
    def shift_factor(self) -> float:
        """Added after dividing by the scaling factor: none for this VAE."""
        return self.config.shift_factor

    def encode(self, x_BCTHW: torch.Tensor) -> DiagonalGaussian:
        """Video in [-1, 1] with T = 1 + 4k frames and H, W multiples of 16 -> posterior over raw z."""
        cfg = self.config
        _check_5d(x_BCTHW, cfg.in_channels, "video")
        _, _, frames, height, width = x_BCTHW.shape
        t, s = cfg.temporal_compression_ratio, cfg.spatial_compression_ratio
        if (frames - 1) % t or height % s or width % s:
            raise ValueError(
                f"encode: video of {frames} frames x {height} x {width} does not fit the HunyuanVideo-1.5 "
                f"VAE grid; use 1 + {t}k frames and a height and width divisible by {s} (crop or pad first)"
            )
        mean, logvar = self.encoder(x_BCTHW).chunk(2, dim=1)
        return DiagonalGaussian(mean, logvar.clamp(-30.0, 20.0))

    def decode(self, z_BCTHW: torch.Tensor) -> torch.Tensor:
        """Raw latent z (NOT scaled) -> video in about [-1, 1], unclamped, in the model's dtype.

        Decodes the whole latent at once; use `decode_latents` with a tiling config for big videos.
        """
        _check_5d(z_BCTHW, self.config.latent_channels, "latent")
        return self.decoder(z_BCTHW)

    def forward(self, z_BCTHW: torch.Tensor) -> torch.Tensor:
        return self.decode(z_BCTHW)

    def decode_latents(self, latents: torch.Tensor, tiling: VaeTilingConfig | None = None) -> torch.Tensor:
        """DiT latents (z * scaling_factor) -> float32 video in [0, 1], [B, C, 1+4(T-1), 16H, 16W].

        Divides by `scaling_factor` itself, casts to the model's dtype and device, and decodes in
        spatial tiles when `tiling` is given and enabled (`OFFICIAL_TILING` and its siblings).
        """
        if tiling is not None and tiling.enabled and tiling.temporal:
            raise ValueError(
                "the HunyuanVideo-1.5 VAE decodes all frames in every tile (its official code refuses "
                "temporal tiling): pass a VaeTilingConfig with temporal=False, e.g. OFFICIAL_TILING"
            )
        param = next(self.parameters())
        z = (latents.to(device=param.device, dtype=torch.float32) / self.scaling_factor).to(param.dtype)
        if tiling is not None and tiling.enabled:
            cfg = self.config
            video = tiled_decode(
                self.decode, z, tiling, cfg.temporal_compression_ratio, cfg.spatial_compression_ratio
            )
        else:
            video = self.decode(z).float()
        return video.div_(2).add_(0.5).clamp_(0.0, 1.0)


def _check_5d(x: torch.Tensor, channels: int, what: str) -> None:
    if x.ndim != 5 or x.shape[1] != channels:
        raise ValueError(f"expected a {what} tensor [B, {channels}, T, H, W], got shape {tuple(x.shape)}")
