"""The parallel VAE decode (gloo, 2 CPU processes) with the HunyuanVideo-1.5 VAE equals one rank's.

A file of its own so that the spawned workers import neither diffusers nor the parity fixtures.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hvbatch.models.hunyuan_video_15.vae_config import HunyuanVideo15VaeConfig
from hvbatch.models.hunyuan_video_15.vae_loading import random_vae
from hvbatch.models.vae_tiling import VaeTilingConfig, tile_plan
from hvbatch.parallel.vae_decode import ParallelVaeDecoder, assign_tiles
from tests.parallel_worker import init_gloo
from tests.test_parallel import free_port

# 64 px tiles over 1/4 of a tile (stride 3 cells), spatial only, the official sequential rule.
TILING = VaeTilingConfig(tile_latent_size=4, tile_latent_overlap=1, temporal=False, blend="sequential")
SHAPE = (1, 32, 2, 5, 7)  # 2 x 3 tiles of unequal sizes (the last row and column are short)


def _latents() -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(10))


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    init_gloo(rank, world, port)
    try:
        vae = random_vae(HunyuanVideo15VaeConfig.tiny(), seed=3)
        with torch.no_grad():
            results = {"two": ParallelVaeDecoder([0, 1], rank)(vae, _latents(), TILING)}
            dist.barrier()
            if rank == 0:
                results["one"] = vae.decode_latents(_latents(), TILING)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_parallel_decode_equals_one_rank_tiled(tmp_path: Path) -> None:
    tiles = tile_plan(SHAPE, TILING, 4, 16)
    assert len(tiles) == 6 and len({tile.t for tile in tiles}) == 1
    assert all(assign_tiles(tiles, 2))  # both ranks decode
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    leader, helper = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert helper["two"] is None
    assert leader["two"].shape == leader["one"].shape == (1, 3, 5, 80, 112)
    assert 0.0 < leader["one"].mean().item() < 1.0
    assert (leader["two"] - leader["one"]).abs().max().item() <= 1e-6
