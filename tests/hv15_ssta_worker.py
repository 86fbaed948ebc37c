"""Gloo worker of the HunyuanVideo-1.5 SSTA sequence-parallel test (spawned, so importable).

The 1.5 shard/gather harness of `hv15_parallel_worker` with the SSTA attention: `usp_attention_for`
turns the model's `SstaAttention` into `SstaUSPAttention`, which is told the whole video's grid.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from hvbatch.models.attention_backends import AttentionBackend
from hvbatch.models.hunyuan_video_15.config import HunyuanVideo15TransformerConfig
from hvbatch.models.hunyuan_video_15.transformer import HunyuanVideo15Transformer
from hvbatch.models.hunyuan_video_15.transformer_loading import random_transformer
from hvbatch.models.ssta import SstaParams
from hvbatch.models.ssta_attention import SstaAttention
from hvbatch.parallel.dims import ParallelDims, build_groups, destroy_groups
from hvbatch.parallel.ssta_attention import SstaUSPAttention, usp_attention_for
from tests.hv15_helpers import Inputs, make_inputs
from tests.hv15_parallel_worker import sharded_forward
from tests.parallel_worker import init_gloo

TEST_PARAMS = SstaParams(tile=(2, 2, 4), window=(1, 3, 3), topk=4)
"""Small tiles so tiny grids have many (one frame: the official one-frame tile (1, 4, 4))."""
CASES = {
    # name: (MeanFlow model, latent grid, text lengths, glyph lengths, i2v): 270 / 90 image tokens,
    # tiles that straddle every shard and ring-block boundary, a grid the tile does not divide.
    "t2v-cfg-batch": (False, (5, 6, 9), [9, 3], [0, 4], False),
    "i2v-one-frame": (True, (1, 9, 10), [6], [2], True),
}


def ssta_model(meanflow: bool) -> HunyuanVideo15Transformer:
    model = random_transformer(HunyuanVideo15TransformerConfig.tiny(use_meanflow=meanflow), seed=11)
    model.attention_fn = SstaAttention(TEST_PARAMS, AttentionBackend("default"), kernel="portable")
    return model


def case_inputs(model: HunyuanVideo15Transformer, name: str) -> Inputs:
    _, grid, text_lens, glyph_lens, image = CASES[name]
    return make_inputs(
        model.config, grid=grid, text_lens=text_lens, glyph_lens=glyph_lens, image=image, seed=5
    )


def one_rank_outputs() -> dict[str, torch.Tensor]:
    out = {}
    for name, (meanflow, *_rest) in CASES.items():
        model = ssta_model(meanflow)
        inputs = case_inputs(model, name)
        with torch.no_grad():
            out[name] = model(inputs.x, inputs.t, inputs.cond(), t_next_B=inputs.t_next)
    return out


def ssta_sp_worker(rank: int, world: int, port: int, out_dir: str, layouts: list[tuple[int, int]]) -> None:
    init_gloo(rank, world, port)
    try:
        for ulysses, ring in layouts:
            dims = ParallelDims(dp=1, ulysses=ulysses, ring=ring, world_size=world)
            dims.validate(12)
            groups = build_groups(dims, rank)
            results = {}
            for name, (meanflow, *_rest) in CASES.items():
                model = ssta_model(meanflow)
                attention = usp_attention_for(model.attention_fn, groups)
                assert isinstance(attention, SstaUSPAttention)
                inputs = case_inputs(model, name)
                attention.set_grid(model.token_grid(inputs.x.shape))
                model.attention_fn = attention
                results[name] = sharded_forward(model, attention, groups, inputs)
            torch.save(results, Path(out_dir) / f"u{ulysses}r{ring}-rank{rank}.pt")
            destroy_groups(groups)
    finally:
        dist.destroy_process_group()
