"""The attention entry point every transformer block calls.

Shapes: B batch, L tokens, H heads, D head dim. q, k, v and the output are `[B, L, H, D]`.

`AttentionFn` is the one seam through which sequence parallelism is applied from outside:
the model calls `self.attention_fn(q, k, v, num_text_tokens=...)` and a parallel runner
swaps that attribute for a Ulysses/Ring implementation. The model itself never masks:
padded text tokens are dropped before attention (see `joint_attention`), so the default
implementation is a single fused `scaled_dot_product_attention` call with no mask, which
lets flash / cuDNN / memory-efficient kernels run on GPU.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F


class AttentionFn(Protocol):
    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, num_text_tokens: int = 0
    ) -> torch.Tensor:
        """Full (non-causal) softmax attention on `[B, L, H, D]` tensors.

        `num_text_tokens` says how many trailing tokens of the sequence are text tokens. A
        single-device implementation ignores it; a sequence-parallel one replicates them.
        """
        ...


def sdpa_attention(
    q_BLHD: torch.Tensor, k_BLHD: torch.Tensor, v_BLHD: torch.Tensor, *, num_text_tokens: int = 0
) -> torch.Tensor:
    """Single-device attention: one fused SDPA call, no mask, scale 1/sqrt(D)."""
    del num_text_tokens
    out_BHLD = F.scaled_dot_product_attention(
        q_BLHD.transpose(1, 2), k_BLHD.transpose(1, 2), v_BLHD.transpose(1, 2)
    )
    return out_BHLD.transpose(1, 2)


def joint_attention(
    attention_fn: AttentionFn,
    q_BLHD: torch.Tensor,
    k_BLHD: torch.Tensor,
    v_BLHD: torch.Tensor,
    *,
    num_image_tokens: int,
    text_lens: list[int],
) -> torch.Tensor:
    """Attention over `[image tokens ; text tokens]` where sample b has `text_lens[b]` valid text tokens.

    The text part of the sequence is `max(text_lens)` long (columns padded for every sample are
    already dropped). When all samples have the same length there is no padding left and one
    call covers the batch. Otherwise each sample attends over exactly its own valid tokens in a
    call of its own; outputs at its padded text positions are zero and are never read by a
    valid token.
    """
    num_text = q_BLHD.shape[1] - num_image_tokens
    if all(n == num_text for n in text_lens):
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
