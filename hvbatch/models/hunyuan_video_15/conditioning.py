"""What the HunyuanVideo-1.5 transformer is conditioned on, besides the noisy latents and timestep.

Shape legend: B batch, L1 LLM tokens, L2 byT5 tokens, Li image-encoder tokens (729 for SigLIP),
C channels, T/H/W latent frames/height/width. Token streams are right-padded; the valid lengths
are plain Python ints, so the model never reads a mask on the device.

Text-to-video vs image-to-video is the presence of `image_embeds`. The official model decides it
for the whole batch with `mask_type == "t2v" and torch.all(vision_states == 0)` (its pipeline
passes zeros with mask_type "t2v" exactly for text-to-video); then the image-encoder tokens are
masked out. Here `image_embeds=None` is that case (the tokens are left out, which is the same for
every valid token), and a tensor is always attended, as the official image-to-video path does.
`cat` refuses to mix the two in one batch. `from_masks` applies the official rule to inputs
written the official (or diffusers) way: an all-zero embedding with mask_type "t2v" becomes None.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


def _lengths_from_mask(mask_BL: torch.Tensor | None, batch: int, length: int, name: str) -> tuple[int, ...]:
    """Valid tokens per sample of a right-padded mask (a host read); all valid when None."""
    if mask_BL is None:
        return (length,) * batch
    if tuple(mask_BL.shape) != (batch, length):
        raise ValueError(f"{name} mask has shape {tuple(mask_BL.shape)}, expected {(batch, length)}")
    mask = mask_BL.bool()
    lens = mask.sum(dim=1)
    prefix = torch.arange(length, device=mask.device)[None] < lens[:, None]
    if not torch.equal(mask, prefix):
        raise ValueError(f"{name} mask must be right-padded (each row: ones, then zeros)")
    return tuple(int(n) for n in lens.tolist())


def _pad_tokens(states_BLC: torch.Tensor, length: int) -> torch.Tensor:
    return F.pad(states_BLC, (0, 0, 0, length - states_BLC.shape[1]))


@dataclass(frozen=True)
class HunyuanVideo15Conditioning:
    """One batch's conditioning: LLM and byT5 states with lengths, image tokens, condition latents."""

    text_states: torch.Tensor
    """LLM (Qwen2.5-VL) states `[B, L1, text_dim]`, valid tokens first."""
    text_lens: tuple[int, ...]
    """Valid LLM tokens per sample (>= 1)."""
    glyph_states: torch.Tensor
    """byT5 glyph states `[B, L2, glyph_dim]`, valid tokens first."""
    glyph_lens: tuple[int, ...]
    """Valid byT5 tokens per sample (0 when a prompt quotes no text)."""
    image_embeds: torch.Tensor | None = None
    """SigLIP image tokens `[B, Li, image_embed_dim]`, all valid; None for text-to-video."""
    cond_latents: torch.Tensor | None = None
    """Condition latents and mask `[B, C + 1, T, H, W]` (image-to-video: the image in frame 0, mask 1
    there); None means zeros (text-to-video). A super-resolution model takes `[B, 2C + 2, T, H, W]`:
    these, then the noised upsampled low-resolution latents and their mask (`super_resolution.py`)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "text_lens", tuple(int(n) for n in self.text_lens))
        object.__setattr__(self, "glyph_lens", tuple(int(n) for n in self.glyph_lens))
        problems = []
        if self.text_states.ndim != 3 or self.glyph_states.ndim != 3:
            raise ValueError(
                f"text_states {tuple(self.text_states.shape)} and glyph_states "
                f"{tuple(self.glyph_states.shape)} must both be [batch, tokens, channels]"
            )
        batch = self.text_states.shape[0]
        for name, states, lens, least in (
            ("text", self.text_states, self.text_lens, 1),
            ("glyph", self.glyph_states, self.glyph_lens, 0),
        ):
            if states.shape[0] != batch or len(lens) != batch:
                problems.append(
                    f"{name}_states has batch {states.shape[0]} and {len(lens)} lengths, expected {batch}"
                )
            bad = [n for n in lens if not least <= n <= states.shape[1]]
            if bad:
                problems.append(f"{name}_lens {list(lens)} must lie in [{least}, {states.shape[1]}]")
        if self.image_embeds is not None and (
            self.image_embeds.ndim != 3 or self.image_embeds.shape[0] != batch
        ):
            problems.append(
                f"image_embeds has shape {tuple(self.image_embeds.shape)}, expected [{batch}, tokens, C]"
            )
        if self.cond_latents is not None and (
            self.cond_latents.ndim != 5 or self.cond_latents.shape[0] != batch
        ):
            problems.append(
                f"cond_latents has shape {tuple(self.cond_latents.shape)}, expected [{batch}, C, T, H, W]"
            )
        if problems:
            raise ValueError("invalid HunyuanVideo-1.5 conditioning: " + "; ".join(problems))

    @classmethod
    def from_masks(
        cls,
        text_states: torch.Tensor,
        text_mask: torch.Tensor | None,
        glyph_states: torch.Tensor,
        glyph_mask: torch.Tensor | None,
        image_embeds: torch.Tensor | None = None,
        cond_latents: torch.Tensor | None = None,
        *,
        mask_type: str | None = None,
    ) -> HunyuanVideo15Conditioning:
        """From right-padded masks (read once on the host) and the official text-to-video rule.

        `mask_type` is the official task (`t2v` or `i2v`; default: `t2v` without image embeds,
        else `i2v`). An all-zero `image_embeds` with mask_type `t2v` is text-to-video (dropped).
        """
        if mask_type is None:
            mask_type = "t2v" if image_embeds is None else "i2v"
        if mask_type not in ("t2v", "i2v"):
            raise ValueError(f"mask_type={mask_type!r} must be 't2v' or 'i2v'")
        if image_embeds is not None and mask_type == "t2v" and bool(torch.all(image_embeds == 0)):
            image_embeds = None
        batch = text_states.shape[0]
        return cls(
            text_states,
            _lengths_from_mask(text_mask, batch, text_states.shape[1], "text"),
            glyph_states,
            _lengths_from_mask(glyph_mask, batch, glyph_states.shape[1], "glyph"),
            image_embeds,
            cond_latents,
        )

    @classmethod
    def example(
        cls, config: Any, batch: int, text_tokens: int, device: torch.device | str
    ) -> HunyuanVideo15Conditioning:
        """Zeros of the shapes `config`'s transformer takes, text-to-video (a compile warm-up's input)."""
        text = torch.zeros(batch, text_tokens, config.text_dim, device=device)
        glyph = torch.zeros(batch, 0, config.glyph_dim, device=device)
        return cls(text, (text_tokens,) * batch, glyph, (0,) * batch)

    @property
    def batch_size(self) -> int:
        return self.text_states.shape[0]

    def for_sampling(self, sampling: Any) -> HunyuanVideo15Conditioning:
        """Itself: no 1.5 variant reads anything from a video's sampling settings (no embedded guidance)."""
        return self

    @property
    def is_text_to_video(self) -> bool:
        return self.image_embeds is None

    def to(self, device: torch.device | str) -> HunyuanVideo15Conditioning:
        def move(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else x.to(device)

        return HunyuanVideo15Conditioning(
            self.text_states.to(device),
            self.text_lens,
            self.glyph_states.to(device),
            self.glyph_lens,
            move(self.image_embeds),
            move(self.cond_latents),
        )

    def select(self, index: int) -> HunyuanVideo15Conditioning:
        """Batch element `index` as a batch of 1 (padded lengths kept)."""
        if not -self.batch_size <= index < self.batch_size:
            raise IndexError(f"batch element {index} of a batch of {self.batch_size}")
        index %= self.batch_size
        one = slice(index, index + 1)
        return HunyuanVideo15Conditioning(
            self.text_states[one],
            (self.text_lens[index],),
            self.glyph_states[one],
            (self.glyph_lens[index],),
            None if self.image_embeds is None else self.image_embeds[one],
            None if self.cond_latents is None else self.cond_latents[one],
        )

    @classmethod
    def cat(cls, items: Sequence[HunyuanVideo15Conditioning]) -> HunyuanVideo15Conditioning:
        """One batch of `items` in order (the CFG batch `[uncond, cond]`): token streams right-padded
        to the longest, lengths kept exactly; None condition latents become zeros when others are set.
        """
        if not items:
            raise ValueError("HunyuanVideo15Conditioning.cat needs at least one item")
        with_image = [item.image_embeds is not None for item in items]
        if any(with_image) and not all(with_image):
            raise ValueError(
                "cannot batch text-to-video with image-to-video conditioning: the model switches "
                "between them for a whole batch (give the negative prompt the same image)"
            )
        text_len = max(item.text_states.shape[1] for item in items)
        glyph_len = max(item.glyph_states.shape[1] for item in items)
        image_embeds = None
        if all(with_image):
            image_embeds = torch.cat([item.image_embeds for item in items])  # type: ignore[misc]
        cond_latents = None
        shaped = next((item.cond_latents for item in items if item.cond_latents is not None), None)
        if shaped is not None:
            cond_latents = torch.cat(
                [
                    item.cond_latents
                    if item.cond_latents is not None
                    else shaped.new_zeros((item.batch_size, *shaped.shape[1:]))
                    for item in items
                ]
            )
        return cls(
            torch.cat([_pad_tokens(item.text_states, text_len) for item in items]),
            tuple(n for item in items for n in item.text_lens),
            torch.cat([_pad_tokens(item.glyph_states, glyph_len) for item in items]),
            tuple(n for item in items for n in item.glyph_lens),
            image_embeds,
            cond_latents,
        )
