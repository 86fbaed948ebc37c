"""HunyuanVideo-1.5 image-to-video: the condition latents and mask the transformer concatenates to
its noisy latents (`HunyuanVideo15Conditioning.cond_latents`, `[B, C + 1, T, H, W]`).

As the official pipeline builds them (`get_image_condition_latents`, `_prepare_cond_latents`,
`get_task_mask`): the fitted first frame in [-1, 1] (`hvbatch.images.model_pixels` of
`IMAGE_SIZING.fit`) is VAE-encoded as one frame, `latent_dist.mode()` times the VAE's scaling
factor; it fills latent frame 0 of the C condition channels, later frames are zero; the mask
channel is 1 on frame 0 and 0 elsewhere. diffusers' `prepare_cond_latents_and_mask` builds the
same (it returns the two parts separately). Text-to-video passes zeros for both
(`cond_latents=None` in the conditioning); the negative (CFG) branch gets the same latents.

Shape legend: B videos, C latent channels (32), T latent frames, H x W latent height and width
(the pixels' / 16).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch


class _Posterior(Protocol):
    def mode(self) -> torch.Tensor: ...


class ImageVae(Protocol):
    """What the condition needs of a VAE: `encode(x_BCTHW) -> posterior with mode()`, its dtype and
    scaling factor (an attribute, or `config.scaling_factor`)."""

    def encode(self, x_BCTHW: torch.Tensor) -> _Posterior: ...

    @property
    def dtype(self) -> torch.dtype: ...


def vae_scaling_factor(vae: Any) -> float:
    factor = getattr(vae, "scaling_factor", None)
    if factor is None:
        factor = vae.config.scaling_factor
    return float(factor)


def _vae_device(vae: Any) -> torch.device:
    parameters = getattr(vae, "parameters", None)
    first = next(parameters(), None) if parameters is not None else None
    return first.device if first is not None else torch.device("cpu")


def pixels_tensor(pixels: Any) -> torch.Tensor:
    """`[B, 3, H, W]` float32 from one `[3, H, W]` array / tensor or a sequence of them."""
    if isinstance(pixels, (list, tuple)):
        return torch.stack([torch.as_tensor(p) for p in pixels])
    x = torch.as_tensor(pixels)
    return x[None] if x.ndim == 3 else x


@torch.no_grad()
def encode_first_frame(vae: ImageVae, pixels_B3HW: torch.Tensor) -> torch.Tensor:
    """`[B, C, 1, H/16, W/16]`: each image as a one-frame video, `mode()` x scaling factor, in the
    VAE's dtype (the product taken in it, as the official code and diffusers take it).

    One image per encode call, as the official pipeline encodes its one image: a video's latents do
    not depend on which other videos share its batch (CPU and GPU kernels may round differently
    for another batch size)."""
    if pixels_B3HW.ndim != 4 or pixels_B3HW.shape[1] != 3:
        raise ValueError(f"first-frame pixels must be [B, 3, H, W], got {tuple(pixels_B3HW.shape)}")
    x_BCTHW = pixels_B3HW[:, :, None].to(device=_vae_device(vae), dtype=vae.dtype)
    factor = vae_scaling_factor(vae)
    return torch.cat([vae.encode(x_BCTHW[i : i + 1]).mode() * factor for i in range(x_BCTHW.shape[0])])


def condition_from_latents(
    first_frame_BC1HW: torch.Tensor, num_latent_frames: int, *, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """`[B, C + 1, T, H, W]`: the first-frame latent in frame 0 of C channels (zeros after), then the
    mask channel (1 on frame 0, 0 after)."""
    if first_frame_BC1HW.ndim != 5 or first_frame_BC1HW.shape[2] != 1:
        raise ValueError(f"first-frame latents must be [B, C, 1, H, W], got {tuple(first_frame_BC1HW.shape)}")
    if num_latent_frames < 1:
        raise ValueError(f"num_latent_frames must be >= 1, got {num_latent_frames}")
    dtype = first_frame_BC1HW.dtype if dtype is None else dtype
    batch, channels, _, height, width = first_frame_BC1HW.shape
    out = first_frame_BC1HW.new_zeros((batch, channels + 1, num_latent_frames, height, width), dtype=dtype)
    out[:, :channels, :1] = first_frame_BC1HW.to(dtype)
    out[:, channels, 0] = 1.0
    return out


def image_condition_latents(
    vae: ImageVae, pixels: Any, num_latent_frames: int, *, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """The `cond_latents` of image-to-video videos: `pixels` `[B, 3, H, W]` in [-1, 1] (or a list
    of `[3, H, W]`), one image per video, for `num_latent_frames` latent frames; in `dtype`
    (default: the VAE's)."""
    first_frame = encode_first_frame(vae, pixels_tensor(pixels))
    return condition_from_latents(first_frame, num_latent_frames, dtype=dtype)
