"""CFG parallelism: the two CFG branches on two SP blocks give the 1-rank output (gloo, CPU)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hvbatch.config import SamplingConfig, transformer_preset
from hvbatch.models import random_transformer
from hvbatch.parallel.dims import ParallelDims, ParallelGroups, ProcessGroups
from hvbatch.parallel.runner import CfgParallelTransformer, parallelize, unparallelize
from hvbatch.sampling import denoise, initial_noise, new_step_cache
from tests.helpers import rel_err
from tests.parallel_worker import LATENT_SHAPE, conditioning, run_cases
from tests.test_parallel import free_port

# (dp, cfg, ulysses, ring) on 4 ranks: cfg 2 x ulysses 1 (two videos at a time), cfg 2 x ulysses 2.
LAYOUTS = [(2, 2, 1, 1), (1, 2, 2, 1)]
# Step caching with CFG: the skip decision is taken on sums over both branches (the cfg group).
CACHED = SamplingConfig(num_inference_steps=6, seed=2, cfg_scale=3.0, cache="teacache", cache_threshold=0.2)


def cached_cfg(model: object) -> tuple[torch.Tensor, list[bool]]:
    step_cache = new_step_cache(CACHED)
    assert step_cache is not None
    noise = initial_noise(LATENT_SHAPE, CACHED.seed)
    negative = conditioning(3, 5)
    latents = denoise(model, noise, conditioning(2, 12), CACHED, negative=negative, step_cache=step_cache)  # type: ignore[arg-type]
    return latents, step_cache.history


def cfg_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    from tests.parallel_worker import init_gloo

    init_gloo(rank, world, port)
    try:
        model = random_transformer(transformer_preset("tiny"), seed=0)
        job_groups = ProcessGroups(world, rank)  # as a job: one group per member set, reused by layouts
        for dp, cfg, ulysses, ring in LAYOUTS:
            dims = ParallelDims(dp=dp, ulysses=ulysses, ring=ring, world_size=world, cfg=cfg)
            dims.validate(model.config.num_heads, cfg_scale=3.0)
            groups = job_groups.for_layout(dims)
            runner = parallelize(model, groups)
            assert isinstance(runner, CfgParallelTransformer)
            latents = run_cases(runner)  # "cfg" splits its batch of 2; "plain" runs whole on both halves
            result = {"latents": latents, "cfg_bytes": runner.stats.bytes_sent["cfg"]}
            result["cached"], result["history"] = cached_cfg(runner)
            result |= {"leader": groups.is_sp_leader, "cfg_index": groups.cfg_index}
            torch.save(result, Path(out_dir) / f"d{dp}c{cfg}u{ulysses}r{ring}-rank{rank}.pt")
            assert unparallelize(runner) is model
            dist.barrier()
    finally:
        dist.destroy_process_group()


def test_cfg_parallel_equals_one_rank(tmp_path: Path) -> None:
    world = 4
    model = random_transformer(transformer_preset("tiny"), seed=0)
    reference = run_cases(model)
    cached, history = cached_cfg(model)
    assert history.count(False) >= 2
    mp.spawn(cfg_worker, args=(world, free_port(), str(tmp_path)), nprocs=world, join=True)
    for dp, cfg, ulysses, ring in LAYOUTS:
        per_rank = [torch.load(tmp_path / f"d{dp}c{cfg}u{ulysses}r{ring}-rank{r}.pt") for r in range(world)]
        for name, expected in reference.items():
            for result in per_rank:
                got = result["latents"][name]
                assert rel_err(got, expected) <= 1e-5, (dp, cfg, ulysses, name, rel_err(got, expected))
            assert result["history"] == history
            assert rel_err(result["cached"], cached) <= 1e-5
        # One velocity [1, 16, 5, 14, 2] float32 sent per step of the CFG case (2 steps), none for "plain".
        assert all(result["cfg_bytes"] == 2 * 16 * 5 * 14 * 2 * 4 for result in per_rank)
        assert sum(result["leader"] for result in per_rank) == dp  # one decoder and writer per video
        group = cfg * ulysses * ring
        assert [result["cfg_index"] for result in per_rank] == [
            (r % group) // (ulysses * ring) for r in range(4)
        ]


def test_cfg_rank_layout_and_leaders() -> None:
    dims = ParallelDims(dp=2, ulysses=2, ring=2, world_size=16, cfg=2)
    dims.validate(24, cfg_scale=6.0)
    assert dims.coordinates(13) == (1, 1, 0, 1)  # 13 = ((1 * 2 + 1) * 2 + 0) * 2 + 1
    assert dims.sp_ranks(13) == [12, 13, 14, 15]
    assert dims.cfg_ranks(13) == [9, 13]
    assert dims.video_ranks(13) == list(range(8, 16))
    assert dims.ring_ranks(13) == [13, 15]
    assert dims.ulysses_ranks(13) == [12, 13]

    def groups(rank: int) -> ParallelGroups:
        lists = (dims.ulysses_ranks(rank), dims.ring_ranks(rank), dims.sp_ranks(rank))
        return ParallelGroups(dims, rank, None, None, None, *lists, cfg_ranks=dims.cfg_ranks(rank))

    assert [r for r in range(16) if groups(r).is_sp_leader] == [0, 8]
    assert groups(13).sp_index == 1 and groups(13).cfg_index == 1 and groups(13).dp_index == 1


@pytest.mark.parametrize(
    ("dims", "cfg_scale", "message"),
    [
        (ParallelDims(1, 1, 1, 3, cfg=3), 6.0, "cfg(3) must be 1 or 2"),
        (ParallelDims(1, 2, 1, 2, cfg=2), 6.0, "dp(1) * cfg(2) * ulysses(2) * ring(1) = 4 != WORLD_SIZE(2)"),
        (
            ParallelDims(1, 1, 1, 2, cfg=2),
            1.0,
            "cfg(2) needs two CFG branches, but sampling.cfg_scale(1) <= 1",
        ),
    ],
)
def test_cfg_layout_validation(dims: ParallelDims, cfg_scale: float, message: str) -> None:
    with pytest.raises(ValueError) as info:
        dims.validate(12, cfg_scale=cfg_scale)
    assert message in str(info.value)
