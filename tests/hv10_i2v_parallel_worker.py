"""HunyuanVideo-I2V (token_replace) cases for the gloo workers: spawned, so importable.

Two latent sizes whose token counts neither 2 nor 3 divides evenly in the same way: 3 x 3 x 5 = 45
tokens (15 first-frame ones: at 2 ranks the first shard holds them and 8 more, at 3 ranks a shard
ends exactly after them) and 2 x 5 x 7 = 70 tokens (35 first-frame ones: at 2 ranks the boundary,
at 3 ranks the second shard holds 11 of them and 13 others)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.distributed as dist

from hvbatch.config import SamplingConfig, transformer_preset
from hvbatch.models.hunyuan_video import TextConditioning, random_transformer
from hvbatch.parallel.dims import ParallelDims, build_groups
from hvbatch.parallel.runner import SequenceParallelTransformer
from hvbatch.sampling import denoise, initial_noise, new_step_cache
from tests.helpers import TEACACHE
from tests.parallel_worker import init_gloo

SHAPES = {"45": (1, 16, 3, 6, 10), "70": (1, 16, 2, 10, 14)}


def i2v_conditioning(
    seed: int, text_len: int, shape: tuple[int, ...], stability: bool = True
) -> TextConditioning:
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(1, 24, dtype=torch.long)
    mask[0, :text_len] = 1
    states, pooled = torch.randn(1, 24, 64, generator=g), torch.randn(1, 32, generator=g)
    latent = torch.randn(1, shape[1], 1, *shape[3:], generator=g)
    cond = TextConditioning.from_mask(states, mask, pooled)
    return dataclasses.replace(cond, first_frame_latent=latent, stability=stability)


def cases() -> dict[str, tuple[SamplingConfig, str, TextConditioning, TextConditioning | None]]:
    """name: (sampling, shape, cond, negative); the negative shares the positive's image latent.
    Cache thresholds sit mid-way in the range that skips steps 1 and 2 on one rank (fbcache
    0.45-1.2, teacache 0.2-1.5 measured on both shapes), far from a decision edge."""
    conds = {shape: i2v_conditioning(1, 9, SHAPES[shape]) for shape in SHAPES}
    negatives = {
        shape: dataclasses.replace(
            i2v_conditioning(2, 20, SHAPES[shape]), first_frame_latent=cond.first_frame_latent
        )
        for shape, cond in conds.items()
    }
    cfg = SamplingConfig(num_inference_steps=2, seed=2, cfg_scale=3.0)
    fbcache = SamplingConfig(
        num_inference_steps=4, seed=3, cfg_scale=3.0, cache="fbcache", cache_threshold=0.6
    )
    teacache = SamplingConfig(num_inference_steps=4, seed=4, cache="teacache", cache_threshold=0.4)
    return {
        "cfg-45": (cfg, "45", conds["45"], negatives["45"]),
        "fbcache-70": (fbcache, "70", conds["70"], negatives["70"]),
        "teacache-45": (teacache, "45", dataclasses.replace(conds["45"], stability=False), None),
    }


def run_cases(model: object) -> dict[str, tuple[torch.Tensor, list[bool]]]:
    """Latents of every case and the steps its cache computed (empty without caching)."""
    out = {}
    for name, (sampling, shape, cond, negative) in cases().items():
        cache = new_step_cache(sampling, TEACACHE)
        latents = denoise(
            model,  # type: ignore[arg-type]
            initial_noise(SHAPES[shape], sampling.seed),
            cond,
            sampling,
            negative=negative,
            step_cache=cache,
        )
        out[name] = (latents, [] if cache is None else cache.history)
    return out


def i2v_equivalence_worker(
    rank: int, world: int, port: int, out_dir: str, layouts: list[tuple[int, int]]
) -> None:
    init_gloo(rank, world, port)
    model = random_transformer(transformer_preset("tiny-i2v"), seed=0)
    try:
        for ulysses, ring in layouts:
            dims = ParallelDims(dp=1, ulysses=ulysses, ring=ring, world_size=world)
            dims.validate(model.config.num_heads)
            runner = SequenceParallelTransformer(model, build_groups(dims, rank))
            torch.save(run_cases(runner), Path(out_dir) / f"u{ulysses}r{ring}-rank{rank}.pt")
            model.attention_fn = runner.single_device_attention_fn
    finally:
        dist.destroy_process_group()
