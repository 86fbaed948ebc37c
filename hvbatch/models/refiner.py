"""The token refiner `txt_in`: projects the LLM text states and refines them with self-attention.

Shapes: B batch, L text tokens, H heads, D head dim; `text_lens[b]` valid tokens per sample
(right padding). Padded tokens never reach a valid one: attention runs on valid tokens only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from einops import rearrange
from torch import nn

from hvbatch.models.attention import joint_attention, sdpa_attention
from hvbatch.models.layers import LAYER_NORM_EPS, MLP, TextProjection, TimestepEmbedder


class IndividualTokenRefinerBlock(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(hidden_size, eps=LAYER_NORM_EPS)
        self.self_attn_qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.self_attn_proj = nn.Linear(hidden_size, hidden_size)
        self.norm2 = nn.LayerNorm(hidden_size, eps=LAYER_NORM_EPS)
        self.mlp = MLP(hidden_size, int(hidden_size * mlp_ratio), activation="silu")
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x_BLD: torch.Tensor, c_BD: torch.Tensor, text_lens: Sequence[int]) -> torch.Tensor:
        gate_msa, gate_mlp = self.adaLN_modulation(c_BD).chunk(2, dim=-1)
        qkv = self.self_attn_qkv(self.norm1(x_BLD))
        q, k, v = rearrange(qkv, "B L (K H D) -> K B L H D", K=3, H=self.num_heads)
        # The refiner is per-sample local work: it never goes through the swappable entry point.
        attn = joint_attention(sdpa_attention, q, k, v, num_image_tokens=0, text_lens=text_lens)
        x_BLD = x_BLD + gate_msa[:, None] * self.self_attn_proj(attn.flatten(2))
        return x_BLD + gate_mlp[:, None] * self.mlp(self.norm2(x_BLD))


class IndividualTokenRefiner(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, depth: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            [IndividualTokenRefinerBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)]
        )

    def forward(self, x_BLD: torch.Tensor, c_BD: torch.Tensor, text_lens: Sequence[int]) -> torch.Tensor:
        for block in self.blocks:
            x_BLD = block(x_BLD, c_BD, text_lens)
        return x_BLD


class SingleTokenRefiner(nn.Module):
    """`c = t_embedder(t) + c_embedder(mean of valid tokens)`; tokens -> input_embedder -> refiner."""

    def __init__(self, text_dim: int, hidden_size: int, num_heads: int, mlp_ratio: float, depth: int) -> None:
        super().__init__()
        self.input_embedder = nn.Linear(text_dim, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.c_embedder = TextProjection(text_dim, hidden_size)
        self.individual_token_refiner = IndividualTokenRefiner(hidden_size, num_heads, mlp_ratio, depth)

    def forward(self, text_BLC: torch.Tensor, t_B: torch.Tensor, text_lens: Sequence[int]) -> torch.Tensor:
        # Host-side lengths slice each sample: no length tensor is copied to the device.
        pooled_BC = torch.stack([text_BLC[b, :n].float().mean(dim=0) for b, n in enumerate(text_lens)])
        c_BD = self.t_embedder(t_B) + self.c_embedder(pooled_BC.to(text_BLC.dtype))
        x_BLD = self.input_embedder(text_BLC)
        return self.individual_token_refiner(x_BLD, c_BD, text_lens)
