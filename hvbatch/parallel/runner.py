"""Sequence parallelism applied from outside: shard image tokens at entry, gather at exit.

`SequenceParallelTransformer` has the model's forward signature, so the sampler runs it
unchanged. The model file is untouched: only its `attention_fn` is swapped for `USPAttention`.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

from hvbatch.config import TransformerConfig
from hvbatch.models.transformer import HunyuanVideoTransformer
from hvbatch.parallel.attention import USPAttention
from hvbatch.parallel.dims import ParallelGroups


class SequenceParallelTransformer:
    """`model(x, t, text_states, text_mask, text_states_2, guidance)` over one SP group.

    Every rank of the group receives the same inputs and returns the same full velocity.
    """

    def __init__(self, model: HunyuanVideoTransformer, groups: ParallelGroups) -> None:
        self.model = model
        self.groups = groups
        # The kernel `model.attention` chose for one device serves the sequence-parallel blocks too.
        self.attention = USPAttention(groups, backend=getattr(model.attention_fn, "backend", None))
        self.single_device_attention_fn = model.attention_fn
        model.attention_fn = self.attention

    @property
    def config(self) -> TransformerConfig:
        return self.model.config

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.model.compute_dtype

    def _shard(self, tokens_BLC: torch.Tensor, shard_len: int) -> torch.Tensor:
        """Pad the token dim to `shard_len * P` and keep this rank's contiguous slice."""
        pad = shard_len * self.groups.dims.sp - tokens_BLC.shape[-2]
        padded = F.pad(tokens_BLC, (0, 0, 0, pad))
        start = self.groups.sp_index * shard_len
        return padded[..., start : start + shard_len, :].contiguous()

    def _gather(self, shard_BLC: torch.Tensor, num_tokens: int) -> torch.Tensor:
        chunks = [torch.empty_like(shard_BLC) for _ in range(self.groups.dims.sp)]
        dist.all_gather(chunks, shard_BLC.contiguous(), group=self.groups.sp)
        self.attention.stats.add("gather", shard_BLC.numel() * shard_BLC.element_size() * (len(chunks) - 1))
        return torch.cat(chunks, dim=1)[:, :num_tokens]

    def __call__(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        text_states: torch.Tensor,
        text_mask: torch.Tensor | None,
        text_states_2: torch.Tensor,
        guidance: torch.Tensor | None = None,
    ) -> torch.Tensor:
        model = self.model
        grid = model.token_grid(x.shape)
        img_BLD = model.embed_image(x)
        cos_LD, sin_LD = model.rope(grid, x.device)
        num_tokens = img_BLD.shape[1]
        shard_len = math.ceil(num_tokens / self.groups.dims.sp)
        self.attention.set_sequence(num_tokens, shard_len)
        out_BLP = model.forward_tokens(
            self._shard(img_BLD, shard_len),
            (self._shard(cos_LD, shard_len), self._shard(sin_LD, shard_len)),
            t,
            text_states,
            text_mask,
            text_states_2,
            guidance,
        )
        self.attention.stats.calls += 1
        return model.unpatchify(self._gather(out_BLP, num_tokens), grid)


def parallelize(
    model: HunyuanVideoTransformer, groups: ParallelGroups
) -> HunyuanVideoTransformer | SequenceParallelTransformer:
    """The model as this rank's SP group runs it: itself for sp 1, else a sequence-parallel wrapper.

    Undo with `unparallelize` before the model is parallelized for another layout.
    """
    assert not isinstance(model.attention_fn, USPAttention), "unparallelize the model first"
    return SequenceParallelTransformer(model, groups) if groups.dims.sp > 1 else model


def unparallelize(
    runner: HunyuanVideoTransformer | SequenceParallelTransformer,
) -> HunyuanVideoTransformer:
    """The plain model again, with the attention it had before `parallelize`."""
    if isinstance(runner, SequenceParallelTransformer):
        runner.model.attention_fn = runner.single_device_attention_fn
        return runner.model
    return runner
