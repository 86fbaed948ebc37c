"""The attention entry point every transformer block calls.

Shapes: B batch, L tokens, H heads, D head dim. q, k, v and the output are `[B, L, H, D]`.

`AttentionFn` is the one seam through which sequence parallelism is applied from outside:
the model calls `self.attention_fn(q, k, v, num_text_tokens=...)` and a parallel runner
swaps that attribute for a Ulysses/Ring implementation. The model itself never masks:
padded text tokens are dropped before attention (see `joint_attention`), so the single-device
implementation is one fused call with no mask, run by the kernel `model.attention` selects
(`hvbatch.models.attention_backends`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from hvbatch.config import ModelConfig
from hvbatch.models.attention_backends import AttentionBackend, choose_backend, device_info


class AttentionFn(Protocol):
    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, num_text_tokens: int = 0
    ) -> torch.Tensor:
        """Full (non-causal) softmax attention on `[B, L, H, D]` tensors.

        `num_text_tokens` says how many trailing tokens of the sequence are text tokens. A
        single-device implementation ignores it; a sequence-parallel one replicates them.
        """
        ...


class LocalAttention:
    """Single-device attention: one fused call of `backend`, no mask, scale 1/sqrt(D)."""

    def __init__(self, backend: AttentionBackend) -> None:
        self.backend = backend

    def __repr__(self) -> str:
        return f"LocalAttention({self.backend.name!r})"

    def __call__(
        self, q_BLHD: torch.Tensor, k_BLHD: torch.Tensor, v_BLHD: torch.Tensor, *, num_text_tokens: int = 0
    ) -> torch.Tensor:
        del num_text_tokens
        out_BHLD = self.backend.attention(
            q_BLHD.transpose(1, 2), k_BLHD.transpose(1, 2), v_BLHD.transpose(1, 2)
        )
        return out_BHLD.transpose(1, 2)


sdpa_attention = LocalAttention(AttentionBackend("default"))
"""torch's own SDPA dispatch: the model's attention until a backend is chosen."""


def resolved_backend_name(model_config: ModelConfig, device: torch.device | str, dtype: torch.dtype) -> str:
    """The attention backend `model.attention` runs on `device` in `dtype`, e.g. `cudnn (auto)`."""
    choice = choose_backend(
        model_config.attention, device_info(device), dtype, model_config.transformer.head_dim
    )
    return choice.describe()


def set_token_grid(attention_fn: AttentionFn, grid: tuple[int, int, int]) -> None:
    """Tell a grid-aware attention (SSTA: `set_grid`) the image-token grid of the coming calls;
    attention that has no use for it is left alone."""
    setter = getattr(attention_fn, "set_grid", None)
    if setter is not None:
        setter(grid)


def joint_attention(
    attention_fn: AttentionFn,
    q_BLHD: torch.Tensor,
    k_BLHD: torch.Tensor,
    v_BLHD: torch.Tensor,
    *,
    num_image_tokens: int,
    text_lens: Sequence[int] | None,
) -> torch.Tensor:
    """Attention over `[image tokens ; text tokens]` where sample b has `text_lens[b]` valid text tokens.

    The text part of the sequence is `max(text_lens)` long (columns padded for every sample are
    already dropped). `text_lens=None` says every sample has them all valid: no padding is left
    and one call covers the batch. Otherwise each sample attends over exactly its own valid
    tokens in a call of its own; outputs at its padded text positions are zero and are never
    read by a valid token.
    """
    num_text = q_BLHD.shape[1] - num_image_tokens
    if text_lens is None or all(n == num_text for n in text_lens):
        return attention_fn(q_BLHD, k_BLHD, v_BLHD, num_text_tokens=num_text)
    out_BLHD = torch.zeros_like(q_BLHD)
    for b, text_len in enumerate(text_lens):
        valid = num_image_tokens + text_len
        out_BLHD[b : b + 1, :valid] = attention_fn(
            q_BLHD[b : b + 1, :valid],
            k_BLHD[b : b + 1, :valid],
            v_BLHD[b : b + 1, :valid],
            num_text_tokens=text_len,
        )
    return out_BLHD
