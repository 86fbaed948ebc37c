"""Sequence parallelism applied from outside: shard image tokens at entry, gather at exit.

`SequenceParallelTransformer` has the model's calling convention (`model(x, t, cond, *, t_next_B,
step_cache)`, `hvbatch.models.protocols`), so the sampler runs it unchanged; it composes the
model's stages (`token_grid`, `rope`, `embed_image`, `forward_tokens`, `unpatchify`) of any family.
The model file is untouched: only its `attention_fn` is swapped for `USPAttention`.
`CfgParallelTransformer` splits a CFG batch of 2 over the two SP blocks of a cfg 2 layout.

`warm_up(runner, ...)` runs one forward with no collective at all (each rank attends only its
own tokens), so that compiled blocks (`model.compile`) compile on every rank at its own pace
before the first collective, whose timeout must not absorb uneven compile times.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from hvbatch.models.attention import set_token_grid
from hvbatch.models.protocols import Conditioning, StagedTransformer, conditioning_for_tokens
from hvbatch.parallel.attention import CommStats, USPAttention
from hvbatch.parallel.dims import ParallelGroups
from hvbatch.parallel.ssta_attention import usp_attention_for
from hvbatch.parallel.transport import from_wire, to_wire
from hvbatch.sampling.cache import StepCache


class SequenceParallelTransformer:
    """`model(x, t, cond, *, t_next_B, step_cache)` over one SP group.

    Every rank of the group receives the same inputs and returns the same full velocity.
    """

    def __init__(self, model: StagedTransformer, groups: ParallelGroups, comm_dtype: str = "none") -> None:
        self.model = model
        self.groups = groups
        # The kernel `model.attention` chose for one device serves the sequence-parallel blocks too
        # (an SSTA model's grid-aware kernel included); a model never configured (library use) gets
        # `auto` on the device of the first call.
        self.attention = usp_attention_for(model.attention_fn, groups, comm_dtype)
        self.single_device_attention_fn = model.attention_fn
        model.attention_fn = self.attention

    @property
    def config(self) -> Any:
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
        wire = to_wire(shard_BLC.contiguous(), self.groups.sp)
        chunks = [torch.empty_like(wire) for _ in range(self.groups.dims.sp)]
        dist.all_gather(chunks, wire, group=self.groups.sp)
        self.attention.stats.add("gather", shard_BLC.numel() * shard_BLC.element_size() * (len(chunks) - 1))
        return from_wire(torch.cat(chunks, dim=1)[:, :num_tokens], shard_BLC.device)

    def _reduce_sums(self, sums: torch.Tensor) -> torch.Tensor:
        wire = to_wire(sums, self.groups.sp)
        dist.all_reduce(wire, op=dist.ReduceOp.SUM, group=self.groups.sp)
        if self.groups.cfg is not None:  # cfg 2: add the other CFG branch's half of the video
            dist.all_reduce(wire, op=dist.ReduceOp.SUM, group=self.groups.cfg)
        return from_wire(wire, sums.device)

    def __call__(
        self,
        x_BCTHW: torch.Tensor,
        t_B: torch.Tensor,
        cond: Conditioning,
        *,
        t_next_B: torch.Tensor | None = None,
        step_cache: StepCache | None = None,
    ) -> torch.Tensor:
        grid = self.model.token_grid(x_BCTHW.shape)
        num_tokens = grid[0] * grid[1] * grid[2]
        out_BLP = self._forward_shard(x_BCTHW, t_B, cond, t_next_B, step_cache)
        self.attention.stats.calls += 1
        return self.model.unpatchify(self._gather(out_BLP, num_tokens), grid)

    def _forward_shard(
        self,
        x_BCTHW: torch.Tensor,
        t_B: torch.Tensor,
        cond: Conditioning,
        t_next_B: torch.Tensor | None,
        step_cache: StepCache | None,
    ) -> torch.Tensor:
        """This rank's final-layer outputs (its shard of the image tokens)."""
        model = self.model
        grid = model.token_grid(x_BCTHW.shape)
        set_token_grid(self.attention, grid)
        img_BLD = model.embed_image(x_BCTHW, cond)
        cos_LD, sin_LD = model.rope(grid, x_BCTHW.device)
        num_tokens = img_BLD.shape[1]
        shard_len = math.ceil(num_tokens / self.groups.dims.sp)
        self.attention.set_sequence(num_tokens, shard_len)
        start = self.groups.sp_index * shard_len
        if step_cache is not None:  # the cache decides on sums over the whole video, padding left out
            step_cache.valid_tokens = max(0, min(shard_len, num_tokens - start))
            step_cache.reduce_sums = self._reduce_sums
        return model.forward_tokens(
            self._shard(img_BLD, shard_len),
            (self._shard(cos_LD, shard_len), self._shard(sin_LD, shard_len)),
            t_B,
            conditioning_for_tokens(cond, grid, start, start + shard_len),  # which tokens this shard holds
            t_next_B=t_next_B,
            step_cache=step_cache,
        )

    def warm_up(
        self,
        x_BCTHW: torch.Tensor,
        t_B: torch.Tensor,
        cond: Conditioning,
        t_next_B: torch.Tensor | None = None,
    ) -> None:
        """One forward of this rank's shard with no collective (attention over its own tokens only):
        compiles the blocks for these shapes. The output is meaningless and dropped."""
        self.attention.local_only = True
        try:
            self._forward_shard(x_BCTHW, t_B, cond, t_next_B, None)
        finally:
            self.attention.local_only = False


def _branch(value: torch.Tensor | None, index: int) -> torch.Tensor | None:
    """Batch element `index` of a tensor input (None stays None)."""
    return None if value is None else value[index : index + 1]


class CfgParallelTransformer:
    """`model(...)` for cfg 2: each SP block runs one element of the CFG batch of 2 (0 unconditional,
    1 conditional) and the cfg group all-gathers the two velocities, so every rank returns the full
    batch, as one rank would. A batch of 1 (a video without CFG) runs whole on both blocks.
    """

    def __init__(
        self, inner: StagedTransformer | SequenceParallelTransformer, groups: ParallelGroups
    ) -> None:
        self.inner = inner
        self.groups = groups
        self.stats = inner.attention.stats if isinstance(inner, SequenceParallelTransformer) else CommStats()

    @property
    def model(self) -> StagedTransformer:
        return self.inner.model if isinstance(self.inner, SequenceParallelTransformer) else self.inner

    @property
    def config(self) -> Any:
        return self.inner.config

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.inner.compute_dtype

    def __call__(
        self,
        x_BCTHW: torch.Tensor,
        t_B: torch.Tensor,
        cond: Conditioning,
        *,
        t_next_B: torch.Tensor | None = None,
        step_cache: StepCache | None = None,
    ) -> torch.Tensor:
        cache = {} if step_cache is None else {"step_cache": step_cache}
        if step_cache is not None and not isinstance(self.inner, SequenceParallelTransformer):
            step_cache.reduce_sums = self._reduce_sums  # (the SP runner sets its own, cfg included)
        if x_BCTHW.shape[0] != self.groups.dims.cfg:
            return self.inner(x_BCTHW, t_B, cond, t_next_B=t_next_B, **cache)
        i = self.groups.cfg_index
        own = self.inner(
            x_BCTHW[i : i + 1], t_B[i : i + 1], cond.select(i), t_next_B=_branch(t_next_B, i), **cache
        ).contiguous()
        wire = to_wire(own, self.groups.cfg)
        chunks = [torch.empty_like(wire) for _ in range(self.groups.dims.cfg)]
        dist.all_gather(chunks, wire, group=self.groups.cfg)
        self.stats.add("cfg", own.numel() * own.element_size() * (len(chunks) - 1))
        return from_wire(torch.cat(chunks), own.device)

    def warm_up(
        self,
        x_BCTHW: torch.Tensor,
        t_B: torch.Tensor,
        cond: Conditioning,
        t_next_B: torch.Tensor | None = None,
    ) -> None:
        """Compile this rank's branch (batch element `cfg_index` of a CFG batch) with no collective."""
        i = self.groups.cfg_index
        if x_BCTHW.shape[0] != self.groups.dims.cfg:  # a batch of 1 runs whole on both halves
            warm_up(self.inner, x_BCTHW, t_B, cond, t_next_B)
            return
        warm_up(self.inner, x_BCTHW[i : i + 1], t_B[i : i + 1], cond.select(i), _branch(t_next_B, i))

    def _reduce_sums(self, sums: torch.Tensor) -> torch.Tensor:
        wire = to_wire(sums, self.groups.cfg)
        dist.all_reduce(wire, op=dist.ReduceOp.SUM, group=self.groups.cfg)
        return from_wire(wire, sums.device)


Runner = StagedTransformer | SequenceParallelTransformer | CfgParallelTransformer


def parallelize(model: StagedTransformer, groups: ParallelGroups, comm_dtype: str = "none") -> Runner:
    """The model as this rank's video block runs it: itself for sp 1 and cfg 1, else wrapped in a
    sequence-parallel runner (sp > 1, its attention transfers in `comm_dtype`: `none` or `fp8`)
    and/or a cfg-parallel one (cfg 2).

    Undo with `unparallelize` before the model is parallelized for another layout.
    """
    assert not isinstance(model.attention_fn, USPAttention), "unparallelize the model first"
    runner: StagedTransformer | SequenceParallelTransformer = model
    if groups.dims.sp > 1:
        runner = SequenceParallelTransformer(model, groups, comm_dtype)
    return CfgParallelTransformer(runner, groups) if groups.dims.cfg > 1 else runner


def warm_up(
    runner: Runner,
    x_BCTHW: torch.Tensor,
    t_B: torch.Tensor,
    cond: Conditioning,
    t_next_B: torch.Tensor | None = None,
) -> None:
    """Compile `runner`'s blocks for the shapes of these inputs (the model's call) without any
    collective; a plain model just runs them (it has no collective to delay)."""
    with torch.no_grad():
        if isinstance(runner, (SequenceParallelTransformer, CfgParallelTransformer)):
            runner.warm_up(x_BCTHW, t_B, cond, t_next_B)
        else:
            runner(x_BCTHW, t_B, cond, t_next_B=t_next_B)


def unparallelize(runner: Runner) -> StagedTransformer:
    """The plain model again, with the attention it had before `parallelize`."""
    if isinstance(runner, CfgParallelTransformer):
        runner = runner.inner
    if isinstance(runner, SequenceParallelTransformer):
        runner.model.attention_fn = runner.single_device_attention_fn
        return runner.model
    return runner
