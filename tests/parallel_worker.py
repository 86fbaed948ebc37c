"""Code that runs inside the gloo worker processes of the parallel tests (spawned, so importable)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from hvbatch.config import SamplingConfig, transformer_preset
from hvbatch.models.hunyuan_video import TextConditioning, random_transformer
from hvbatch.parallel.dims import ParallelDims, build_groups
from hvbatch.parallel.measure import count_flops
from hvbatch.parallel.runner import SequenceParallelTransformer
from hvbatch.sampling import denoise, initial_noise, new_step_cache
from tests.helpers import TEACACHE

# 5 x 7 x 1 = 35 image tokens: not divisible by 2, 3, 4, 6 or 8.
LATENT_SHAPE = (1, 16, 5, 14, 2)


def conditioning(seed: int, text_len: int, dim: int = 64, pooled: int = 32) -> TextConditioning:
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(1, 16, dtype=torch.long)
    mask[0, :text_len] = 1
    states, pooled_states = torch.randn(1, 16, dim, generator=g), torch.randn(1, pooled, generator=g)
    return TextConditioning.from_mask(states, mask, pooled_states)


def guided(cond: TextConditioning) -> TextConditioning:
    """With the embedded guidance 6016 (6.016 x 1000) a direct forward takes."""
    return dataclasses.replace(cond, guidance_scale=6.016)


CASES = {
    # name: (sampling, cond, negative)
    "plain": (SamplingConfig(num_inference_steps=2, seed=1), conditioning(1, 9), None),
    "cfg": (
        SamplingConfig(num_inference_steps=2, seed=2, cfg_scale=3.0),
        conditioning(2, 12),
        conditioning(3, 5),
    ),
}


CACHE_CASES = {
    # name: (sampling, cond, negative); thresholds chosen so that step 1 is skipped, far from the edge
    "teacache": (
        SamplingConfig(num_inference_steps=4, seed=1, cache="teacache", cache_threshold=0.1),
        conditioning(1, 9),
        None,
    ),
    "fbcache-cfg": (
        SamplingConfig(num_inference_steps=4, seed=2, cfg_scale=3.0, cache="fbcache", cache_threshold=0.45),
        conditioning(2, 12),
        conditioning(3, 5),
    ),
}


def run_cached_cases(model: Callable[..., torch.Tensor]) -> dict[str, tuple[torch.Tensor, list[bool]]]:
    """Latents and per-step computed/skipped history of each step-caching case."""
    out = {}
    for name, (sampling, cond, negative) in CACHE_CASES.items():
        cache = new_step_cache(sampling, TEACACHE)
        noise = initial_noise(LATENT_SHAPE, sampling.seed)
        latents = denoise(model, noise, cond, sampling, negative=negative, step_cache=cache)  # type: ignore[arg-type]
        assert cache is not None
        out[name] = (latents, cache.history)
    return out


def run_cases(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, (sampling, cond, negative) in CASES.items():
        noise = initial_noise(LATENT_SHAPE, sampling.seed)
        out[name] = denoise(model, noise, cond, sampling, negative=negative)
    return out


def init_gloo(rank: int, world: int, port: int) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=120),
    )


def equivalence_worker(
    rank: int, world: int, port: int, out_dir: str, layouts: list[tuple[int, int]]
) -> None:
    init_gloo(rank, world, port)
    model = random_transformer(transformer_preset("tiny"), seed=0)
    text_outputs: list[torch.Tensor] = []
    model.double_blocks[-1].register_forward_hook(lambda _m, _i, out: text_outputs.append(out[1].clone()))
    try:
        for ulysses, ring in layouts:
            dims = ParallelDims(dp=1, ulysses=ulysses, ring=ring, world_size=world)
            dims.validate(model.config.num_heads)
            runner = SequenceParallelTransformer(model, build_groups(dims, rank))
            text_outputs.clear()
            latents = run_cases(runner)
            # Text-token states must be bit-identical on every rank.
            local = torch.stack([t.flatten()[:64] for t in text_outputs if t.shape[0] == 1])
            gathered = [torch.empty_like(local) for _ in range(world)]
            dist.all_gather(gathered, local)
            latents["text_agrees"] = torch.tensor(all(torch.equal(g, gathered[0]) for g in gathered))
            if world <= 4:  # step caching at P = 2, 3, 4 (every layout of the world)
                latents["cached"] = run_cached_cases(runner)  # type: ignore[assignment]
            torch.save(latents, Path(out_dir) / f"u{ulysses}r{ring}-rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def one_forward(model: Callable[..., torch.Tensor]) -> torch.Tensor:
    """One forward of `model` on the tiny test latents and a 9-token prompt, without gradients."""
    cond = conditioning(1, 9)
    with torch.no_grad():
        return model(
            initial_noise(LATENT_SHAPE, 1),
            torch.tensor([900.0]),
            guided(cond),
        )


# 9 x 16 x 16 = 2304 image tokens: enough that the replicated parts (text, patch embedding) are small.
LARGE_LATENT_SHAPE = (1, 16, 9, 32, 32)


def count_forward_flops(model: object) -> tuple[int, torch.Tensor]:
    """FLOPs of one forward on the large latent (CPU attention included), and its output."""
    cond = guided(conditioning(4, 16))
    x = initial_noise(LARGE_LATENT_SHAPE, 4)
    return count_flops(lambda: model(x, torch.tensor([900.0]), cond))  # type: ignore[operator]


def work_split_worker(rank: int, world: int, port: int, out_dir: str, ulysses: int, ring: int) -> None:
    init_gloo(rank, world, port)
    try:
        model = random_transformer(transformer_preset("tiny"), seed=0)
        dims = ParallelDims(dp=1, ulysses=ulysses, ring=ring, world_size=world)
        runner = SequenceParallelTransformer(model, build_groups(dims, rank))
        flops, out = count_forward_flops(runner)
        result = {
            "flops": flops,
            "out": out,
            "bytes": dict(runner.attention.stats.bytes_sent),
            "shard_len": runner.attention.shard_len,
        }
        torch.save(result, Path(out_dir) / f"split-rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def forward_worker(rank: int, world: int, port: int, out_dir: str, latent_shape: tuple[int, ...]) -> None:
    """One forward with the auto layout for `world` ranks (ulysses = largest divisor of 12 dividing world)."""
    init_gloo(rank, world, port)
    try:
        model = random_transformer(transformer_preset("tiny"), seed=0)
        ulysses = max(u for u in range(1, world + 1) if world % u == 0 and 12 % u == 0)
        dims = ParallelDims(dp=1, ulysses=ulysses, ring=world // ulysses, world_size=world)
        runner = SequenceParallelTransformer(model, build_groups(dims, rank))
        cond = conditioning(5, 11)
        with torch.no_grad():
            out = runner(
                initial_noise(latent_shape, 5),
                torch.tensor([500.0]),
                guided(cond),
            )
        if rank == 0:
            torch.save(out, Path(out_dir) / "out.pt")
    finally:
        dist.destroy_process_group()


def data_parallel_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """dp 2 x ulysses 2: each dp group samples a different case; every rank saves what it got."""
    init_gloo(rank, world, port)
    try:
        model = random_transformer(transformer_preset("tiny"), seed=0)
        dims = ParallelDims(dp=2, ulysses=2, ring=1, world_size=world)
        groups = build_groups(dims, rank)
        runner = SequenceParallelTransformer(model, groups)
        name = sorted(CASES)[groups.dp_index]
        sampling, cond, negative = CASES[name]
        latents = denoise(
            runner, initial_noise(LATENT_SHAPE, sampling.seed), cond, sampling, negative=negative
        )
        torch.save({"case": name, "latents": latents}, Path(out_dir) / f"dp-rank{rank}.pt")
    finally:
        dist.destroy_process_group()
