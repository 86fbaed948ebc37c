"""HunyuanVideo 1.0's conditioning object: what the text encoders make and the transformer reads.

Shapes: B batch, L text tokens (valid ones first, then padding), C LLM channels, C2 pooled channels.
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
        return dataclasses.replace(
            self, text_states=self.text_states.to(device), text_states_2=self.text_states_2.to(device)
        )

    @classmethod
    def cat(cls, items: Sequence[TextConditioning]) -> TextConditioning:
        """Along the batch, right-padding the shorter text states to the longest."""
        length = max(item.text_states.shape[1] for item in items)
        scale = items[0].guidance_scale
        if any(not _same_scale(item.guidance_scale, scale) for item in items):
            scales = [item.guidance_scale for item in items]
            raise ValueError(f"cannot batch conditionings with different guidance scales {scales}")
        states = [F.pad(item.text_states, (0, 0, 0, length - item.text_states.shape[1])) for item in items]
        return cls(
            torch.cat(states),
            tuple(n for item in items for n in item.text_lens),
            torch.cat([item.text_states_2 for item in items]),
            scale,
        )

    def select(self, index: int) -> TextConditioning:
        return dataclasses.replace(
            self,
            text_states=self.text_states[index : index + 1],
            text_lens=(self.text_lens[index],),
            text_states_2=self.text_states_2[index : index + 1],
        )

    def for_sampling(self, sampling: Any) -> TextConditioning:
        """With the video's embedded guidance scale (`sampling.guidance_scale`)."""
        return dataclasses.replace(self, guidance_scale=float(sampling.guidance_scale))
