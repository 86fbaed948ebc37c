"""A family's latent geometry: valid video sizes, latent shapes and token counts (plain Python).

The control plane checks sizes and counts tokens without torch, so nothing here imports it.
`LatentGeometry.image_tokens` works on ints and on numpy integer arrays alike (it only uses `//`
and `*`), so the prompt reader counts a million rows in one call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


def _nearest_multiples(value: int, multiple: int) -> str:
    low = max(multiple, value // multiple * multiple)
    return f"{low} or {low + multiple}" if low < value else f"{low}"


@dataclass(frozen=True)
class LatentGeometry:
    """How a family's VAE and transformer patch turn a video into latents and tokens."""

    channels: int
    """Latent channels of the noisy latents the sampler draws (what the VAE decodes)."""
    spatial_ratio: int
    """Pixels per latent cell along height and width."""
    temporal_ratio: int
    """Video frames per latent frame after the causal first one: num_frames = 1 + ratio * k."""
    patch: tuple[int, int, int]
    """The transformer's patch (t, h, w) in latent cells: one image token each."""
    size_multiple: int
    """Height and width must be positive multiples of this (spatial ratio x patch, at least)."""
    scaling_factor: float
    """The VAE's latent scaling factor (the transformer sees z * scaling_factor, shifted)."""
    shift: float = 0.0
    """The VAE's latent shift (subtracted before scaling; 0 for none)."""

    def size_problems(self, height: int, width: int, num_frames: int) -> list[str]:
        """What is wrong with a video size, each naming the nearest valid values (empty if valid)."""
        problems = []
        multiple = self.size_multiple
        for name, value in (("height", height), ("width", width)):
            if value < multiple or value % multiple:
                problems.append(
                    f"{name}={value} is not a positive multiple of {multiple} "
                    f"(nearest valid: {_nearest_multiples(value, multiple)})"
                )
        ratio = self.temporal_ratio
        if num_frames < 1 or (num_frames - 1) % ratio:
            low = max(1, (num_frames - 1) // ratio * ratio + 1)
            choices = f"{low} or {low + ratio}" if low < num_frames else f"{low}"
            problems.append(
                f"num_frames={num_frames} is not of the form {ratio}k+1 (nearest valid: {choices})"
            )
        return problems

    def latent_shape(self, height: int, width: int, num_frames: int) -> tuple[int, int, int, int]:
        """`(C, T, Hh, Ww)` of the latent for a video; errors name the nearest valid sizes."""
        problems = self.size_problems(height, width, num_frames)
        if problems:
            raise ValueError("invalid video size: " + "; ".join(problems))
        return (
            self.channels,
            (num_frames - 1) // self.temporal_ratio + 1,
            height // self.spatial_ratio,
            width // self.spatial_ratio,
        )

    def image_tokens(self, height: Any, width: Any, num_frames: Any) -> Any:
        """Image tokens of a video of valid size (ints, or numpy integer arrays of valid sizes).

        One token per patch of the latent: (latent frames / pt) x (height / (ratio ph)) x (width /
        (ratio pw)); validate sizes first (`latent_shape`, `size_problems`).
        """
        pt, ph, pw = self.patch
        frames = ((num_frames - 1) // self.temporal_ratio + 1) // pt
        return frames * (height // (self.spatial_ratio * ph)) * (width // (self.spatial_ratio * pw))

    def checked_image_tokens(self, height: int, width: int, num_frames: int) -> int:
        """`image_tokens` of one video, after checking its size and that the latent fits the patch."""
        _, frames, lat_h, lat_w = self.latent_shape(height, width, num_frames)
        pt, ph, pw = self.patch
        if frames % pt or lat_h % ph or lat_w % pw:
            raise ValueError(
                f"latent {frames}x{lat_h}x{lat_w} (frames x height x width) of a "
                f"{height}x{width}x{num_frames} video is not divisible by the patch {pt}x{ph}x{pw}; "
                "choose sizes that are"
            )
        return int(self.image_tokens(height, width, num_frames))
