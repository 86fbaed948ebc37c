"""Gloo worker of the HunyuanVideo-1.5 sequence-parallel test (spawned, so importable).

A minimal local shard/gather harness around the model's staged interface: contiguous image-token
shards (the sequence padded to a multiple of the rank count), `USPAttention` as `attention_fn`,
the condition tokens replicated on every rank, an all-gather of the final-layer outputs.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from hvbatch.models.hunyuan_video_15.config import HunyuanVideo15TransformerConfig
from hvbatch.models.hunyuan_video_15.transformer import HunyuanVideo15Transformer
from hvbatch.models.hunyuan_video_15.transformer_loading import random_transformer
from hvbatch.parallel.attention import USPAttention
from hvbatch.parallel.dims import ParallelDims, ParallelGroups, build_groups, destroy_groups
from tests.hv15_helpers import Inputs, make_inputs
from tests.parallel_worker import init_gloo

CASES = {
    # name: (MeanFlow model, latent grid (35 / 25 tokens: no rank count of 2..4 divides them), lengths, i2v)
    "t2v-cfg-batch": (False, (5, 1, 7), [9, 3], [0, 4], False),
    "i2v-meanflow": (True, (1, 5, 5), [6], [2], True),
}


def case_models() -> dict[bool, HunyuanVideo15Transformer]:
    return {
        mf: random_transformer(HunyuanVideo15TransformerConfig.tiny(use_meanflow=mf), seed=11)
        for mf in (False, True)
    }


def case_inputs(model: HunyuanVideo15Transformer, name: str) -> Inputs:
    _, grid, text_lens, glyph_lens, image = CASES[name]
    return make_inputs(
        model.config, grid=grid, text_lens=text_lens, glyph_lens=glyph_lens, image=image, seed=5
    )


def one_rank_outputs() -> dict[str, torch.Tensor]:
    models, out = case_models(), {}
    for name, (meanflow, *_rest) in CASES.items():
        inputs = case_inputs(models[meanflow], name)
        with torch.no_grad():
            out[name] = models[meanflow](inputs.x, inputs.t, inputs.cond(), t_next_B=inputs.t_next)
    return out


def _shard(tokens_LC: torch.Tensor, shard_len: int, groups: ParallelGroups) -> torch.Tensor:
    padded = F.pad(tokens_LC, (0, 0, 0, shard_len * groups.dims.sp - tokens_LC.shape[-2]))
    start = groups.sp_index * shard_len
    return padded[..., start : start + shard_len, :].contiguous()


def sharded_forward(
    model: HunyuanVideo15Transformer, attention: USPAttention, groups: ParallelGroups, inputs: Inputs
) -> torch.Tensor:
    cond = inputs.cond()
    grid = model.token_grid(inputs.x.shape)
    img_BLD = model.embed_image(inputs.x, cond)
    cos_LD, sin_LD = model.rope(grid, inputs.x.device)
    num_tokens = img_BLD.shape[1]
    shard_len = math.ceil(num_tokens / groups.dims.sp)
    attention.set_sequence(num_tokens, shard_len)
    rope = (_shard(cos_LD, shard_len, groups), _shard(sin_LD, shard_len, groups))
    with torch.no_grad():
        out_BLP = model.forward_tokens(
            _shard(img_BLD, shard_len, groups), rope, inputs.t, cond, t_next_B=inputs.t_next
        ).contiguous()
    chunks = [torch.empty_like(out_BLP) for _ in range(groups.dims.sp)]
    dist.all_gather(chunks, out_BLP, group=groups.sp)
    return model.unpatchify(torch.cat(chunks, dim=1)[:, :num_tokens], grid)


def sp_worker(rank: int, world: int, port: int, out_dir: str, layouts: list[tuple[int, int]]) -> None:
    init_gloo(rank, world, port)
    try:
        models = case_models()
        for ulysses, ring in layouts:
            dims = ParallelDims(dp=1, ulysses=ulysses, ring=ring, world_size=world)
            dims.validate(12)
            groups = build_groups(dims, rank)
            attention = USPAttention(groups)
            results = {}
            for name, (meanflow, *_rest) in CASES.items():
                model = models[meanflow]
                model.attention_fn = attention
                results[name] = sharded_forward(model, attention, groups, case_inputs(model, name))
            torch.save(results, Path(out_dir) / f"u{ulysses}r{ring}-rank{rank}.pt")
            destroy_groups(groups)
    finally:
        dist.destroy_process_group()
