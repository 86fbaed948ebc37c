"""HunyuanVideo 1.0's conditioning object: what the text encoders make and the transformer reads.

Shapes: B batch, L text tokens (valid ones first, then padding), C LLM channels, C2 pooled channels,
Cz latent channels, Hh x Ww latent height and width.

Image-to-video (HunyuanVideo-I2V, `token_replace`) adds two things, both official: LLaVA's image
tokens sit in front of the prompt's in `text_states` (the encoder puts them there, so the model
sees one token stream), and `first_frame_latent` is the clean image latent that latent frame 0 is
pinned to: the sampler starts from `initial_latents(noise)` and applies `pin_latents` after every
step (`hvbatch.models.protocols`). The model modulates the first frame's tokens with a t = 0
embedding; which of the image tokens a forward holds belong to frame 0 is `first_frame_tokens`,
set through `for_image_tokens` by the model's own forward or by a sequence-parallel runner (a
shard holds a contiguous range of the image tokens), a host int like the text lengths.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


def embedded_guidance(
    scale: float, batch: int, dtype: torch.dtype, device: torch.device | str
) -> torch.Tensor:
    """The `guidance` input: `scale * 1000` computed in the transformer's dtype.

    The official code and diffusers both build this tensor in the model dtype; in bf16,
    6.0 * 1000 rounds to 6016.0, and that is the value the distilled model was run with. We
    compute it exactly the same way so our numbers match either reference in every dtype.
    """
    return torch.full((batch,), scale, dtype=dtype, device=device) * 1000.0


def valid_text_lengths(text_mask_BL: torch.Tensor | None, batch: int, length: int) -> list[int]:
    """Per-sample count of valid text tokens; the mask must be right-padded (ones, then zeros)."""
    if text_mask_BL is None:
        return [length] * batch
    if tuple(text_mask_BL.shape) != (batch, length):
        raise ValueError(
            f"text_mask has shape {tuple(text_mask_BL.shape)}, "
            f"expected (batch, text tokens) = {(batch, length)}"
        )
    mask = text_mask_BL.bool()
    lens = mask.sum(dim=1)
    prefix = torch.arange(length, device=mask.device)[None] < lens[:, None]
    if not torch.equal(mask, prefix):
        raise ValueError(
            "text_mask must be right-padded (each row: ones, then zeros); tokenize with padding_side='right'"
        )
    lens_list = [int(n) for n in lens.tolist()]
    if min(lens_list) == 0:
        raise ValueError(f"text_mask has a sample with no valid text token (lengths {lens_list})")
    return lens_list


def _same_scale(a: float | None, b: float | None) -> bool:
    return a == b or (a is not None and b is not None and math.isnan(a) and math.isnan(b))


@dataclass(frozen=True)
class TextConditioning:
    """Encoded prompt(s): LLM states `[B, L, C]` right-padded, the valid lengths (host ints), the
    pooled CLIP embedding `[B, C2]`, and the embedded guidance scale (distilled models; set by
    `for_sampling`)."""

    text_states: torch.Tensor
    text_lens: tuple[int, ...]
    """Valid LLM tokens per sample: `text_states[b, :text_lens[b]]`; the rest is padding."""
    text_states_2: torch.Tensor
    guidance_scale: float | None = None
    """The embedded guidance the `guidance_in` embedder gets (x 1000); None for none."""
    first_frame_latent: torch.Tensor | None = None
    """Image-to-video: the image's latent `[B, Cz, 1, Hh, Ww]` (VAE `mode()` x scaling factor,
    float32) that latent frame 0 is pinned to; None for text-to-video."""
    stability: bool = False
    """Image-to-video: start from 0.999 x noise + 0.001 x the image latent (official `--i2v-stability`)."""
    first_frame_tokens: int | None = None
    """Leading image tokens of the current forward that belong to latent frame 0 (`for_image_tokens`)."""

    def __post_init__(self) -> None:
        batch, length = self.text_states.shape[:2]
        lens = tuple(int(n) for n in self.text_lens)
        object.__setattr__(self, "text_lens", lens)
        if len(lens) != batch or self.text_states_2.shape[0] != batch:
            raise ValueError(
                f"conditioning batch disagrees: text_states {batch}, text_lens {len(lens)}, "
                f"text_states_2 {self.text_states_2.shape[0]}"
            )
        if lens and not all(1 <= n <= length for n in lens):
            raise ValueError(f"text lengths {list(lens)} must be in 1..{length} (the text_states length)")
        latent = self.first_frame_latent
        if latent is not None and (latent.ndim != 5 or latent.shape[0] != batch or latent.shape[2] != 1):
            raise ValueError(
                f"first_frame_latent has shape {tuple(latent.shape)}, expected [{batch}, C, 1, H, W]"
            )

    @classmethod
    def from_mask(
        cls,
        text_states: torch.Tensor,
        text_mask: torch.Tensor | None,
        text_states_2: torch.Tensor,
        guidance_scale: float | None = None,
    ) -> TextConditioning:
        """From a right-padded attention mask `[B, L]` (read on the host once, here)."""
        batch, length = text_states.shape[:2]
        lens = valid_text_lengths(text_mask, batch, length)
        return cls(text_states, tuple(lens), text_states_2, guidance_scale)

    @classmethod
    def example(
        cls, config: Any, batch: int, text_tokens: int, device: torch.device | str
    ) -> TextConditioning:
        """Zeros of the shapes `config`'s transformer takes (a compile warm-up's input)."""
        states = torch.zeros(batch, text_tokens, config.text_dim, device=device)
        pooled = torch.zeros(batch, config.pooled_text_dim, device=device)
        return cls(states, (text_tokens,) * batch, pooled)

    @property
    def batch_size(self) -> int:
        return int(self.text_states.shape[0])

    @property
    def text_mask(self) -> torch.Tensor:
        """The right-padded mask `[B, L]` the lengths stand for (long, on the states' device)."""
        length = self.text_states.shape[1]
        lens = torch.tensor(self.text_lens, device=self.text_states.device)
        return (torch.arange(length, device=self.text_states.device)[None] < lens[:, None]).long()

    @property
    def ragged(self) -> Sequence[int] | None:
        """The lengths when they differ between samples (each then attends alone), else None."""
        return None if len(set(self.text_lens)) == 1 else self.text_lens

    def to(self, device: torch.device | str) -> TextConditioning:
        latent = self.first_frame_latent
        return dataclasses.replace(
            self,
            text_states=self.text_states.to(device),
            text_states_2=self.text_states_2.to(device),
            first_frame_latent=None if latent is None else latent.to(device),
        )

    @classmethod
    def cat(cls, items: Sequence[TextConditioning]) -> TextConditioning:
        """Along the batch, right-padding the shorter text states to the longest."""
        length = max(item.text_states.shape[1] for item in items)
        scale = items[0].guidance_scale
        if any(not _same_scale(item.guidance_scale, scale) for item in items):
            scales = [item.guidance_scale for item in items]
            raise ValueError(f"cannot batch conditionings with different guidance scales {scales}")
        latents = [item.first_frame_latent for item in items]
        if len({latent is None for latent in latents}) > 1:
            raise ValueError("cannot batch text-to-video with image-to-video conditionings")
        states = [F.pad(item.text_states, (0, 0, 0, length - item.text_states.shape[1])) for item in items]
        return cls(
            torch.cat(states),
            tuple(n for item in items for n in item.text_lens),
            torch.cat([item.text_states_2 for item in items]),
            scale,
            first_frame_latent=None if latents[0] is None else torch.cat(latents),  # type: ignore[arg-type]
            stability=items[0].stability,
            first_frame_tokens=items[0].first_frame_tokens,
        )

    def select(self, index: int) -> TextConditioning:
        latent = self.first_frame_latent
        return dataclasses.replace(
            self,
            text_states=self.text_states[index : index + 1],
            text_lens=(self.text_lens[index],),
            text_states_2=self.text_states_2[index : index + 1],
            first_frame_latent=None if latent is None else latent[index : index + 1],
        )

    def for_image_tokens(self, grid: tuple[int, int, int], start: int, stop: int) -> TextConditioning:
        """As read by a forward over image tokens `[start, stop)` of a video whose token grid is
        `grid` (the first `grid[1] * grid[2]` tokens are latent frame 0's)."""
        first = min(max(grid[1] * grid[2] - start, 0), stop - start)
        if first == self.first_frame_tokens:
            return self
        return dataclasses.replace(self, first_frame_tokens=first)

    def initial_latents(self, noise_BCTHW: torch.Tensor) -> torch.Tensor:
        """The sampler's start: the noise, or for image-to-video (the stability mix of) the noise
        with frame 0 set to the image latent."""
        image = self.first_frame_latent
        if image is None:
            return noise_BCTHW
        image = self._image_latent_for(noise_BCTHW)
        if self.stability:  # as the official pipeline mixes it: in float32, t = 0.999 a tensor
            t = torch.tensor([0.999], device=noise_BCTHW.device)
            noise_BCTHW = noise_BCTHW * t + image.expand_as(noise_BCTHW) * (1 - t)
        return self.pin_latents(noise_BCTHW)

    def pin_latents(self, latents_BCTHW: torch.Tensor) -> torch.Tensor:
        """Latent frame 0 set to the image latent (image-to-video; unchanged for text-to-video)."""
        if self.first_frame_latent is None:
            return latents_BCTHW
        image = self._image_latent_for(latents_BCTHW)
        return torch.cat([image, latents_BCTHW[:, :, 1:]], dim=2)

    def _image_latent_for(self, latents_BCTHW: torch.Tensor) -> torch.Tensor:
        image = self.first_frame_latent
        assert image is not None
        if image.shape[0] != latents_BCTHW.shape[0] or image.shape[3:] != latents_BCTHW.shape[3:]:
            raise ValueError(
                f"the image latent {tuple(image.shape)} does not fit latents {tuple(latents_BCTHW.shape)}: "
                "the image must be fitted to the video's height and width"
            )
        return image.to(device=latents_BCTHW.device, dtype=latents_BCTHW.dtype)

    def for_sampling(self, sampling: Any) -> TextConditioning:
        """With the video's embedded guidance scale (`sampling.guidance_scale`)."""
        return dataclasses.replace(self, guidance_scale=float(sampling.guidance_scale))
