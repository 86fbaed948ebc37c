"""Parallel VAE decode (gloo, CPU, several processes) equals the one-rank tiled decode."""

from __future__ import annotations

import itertools
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from hvbatch.models.vae import AutoencoderKLCausal3D
from hvbatch.models.vae_tiling import VaeTilingConfig, tile_plan
from hvbatch.parallel.dims import ParallelDims, ProcessGroups
from hvbatch.parallel.vae_decode import ParallelVaeDecoder, assign_tiles, video_decoder
from hvbatch.pipeline import TINY_VAE
from tests.parallel_worker import init_gloo
from tests.test_parallel import free_port

# 2 temporal x 2 height x 3 width tiles of at most 3 x 2 x 2 latent cells: 12 tiles that overlap on
# every axis, a 13-frame 24 x 32 video, decoded in about a second on one thread.
TILING = VaeTilingConfig(
    tile_latent_size=2, tile_latent_overlap=1, tile_latent_frames=2, tile_latent_frame_overlap=1
)
LATENTS_SHAPE = (1, 16, 4, 3, 4)


class LiveTensorBytes(TorchDispatchMode):
    """Bytes of the tensors created inside the mode that are still alive, and their peak.

    The CPU proxy of a GPU allocator's peak: storages are counted once (views and in-place results
    share them) and released when PyTorch frees them; weights and inputs made outside are not.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self._storages: set[int] = set()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for value in tree_leaves(out):
            if isinstance(value, torch.Tensor):
                storage = value.untyped_storage()
                key, size = storage.data_ptr(), storage.nbytes()
                if size and key not in self._storages:
                    self._storages.add(key)
                    self.live += size
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._free, key, size)
        return out

    def _free(self, key: int, size: int) -> None:
        self._storages.discard(key)
        self.live -= size


def tiny_vae() -> AutoencoderKLCausal3D:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        return AutoencoderKLCausal3D(TINY_VAE).eval().requires_grad_(False)


def latents() -> torch.Tensor:
    return 1.5 * torch.randn(LATENTS_SHAPE, generator=torch.Generator().manual_seed(4))


def measured(decode: Any) -> dict[str, Any]:
    """`decode()`'s result and the peak bytes it held."""
    with torch.no_grad(), LiveTensorBytes() as memory:
        video = decode()
    return {"video": video, "peak": memory.peak}


def decode_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """Rank 0 decodes alone (the reference) while ranks [1, 2] decode together; then all three do."""
    init_gloo(rank, world, port)
    try:
        vae, z = tiny_vae(), latents()
        results: dict[str, Any] = {}
        if rank == 0:
            results["one"] = measured(lambda: vae.decode_latents(z, TILING))
        else:
            results["two"] = measured(lambda: ParallelVaeDecoder([1, 2], rank)(vae, z, TILING))
        dist.barrier()
        results["three"] = measured(lambda: ParallelVaeDecoder([0, 1, 2], rank)(vae, z, TILING))
        # Tiling off (or one tile): the leader, here rank 2, decodes alone; the others return None.
        untiled = VaeTilingConfig(enabled=False)
        results["untiled"] = ParallelVaeDecoder([2, 0, 1], rank)(vae, z[:, :, :2, :2, :2], untiled)
        torch.save(results, Path(out_dir) / f"vae-rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_parallel_decode_equals_one_rank_with_lower_peak_memory(tmp_path: Path) -> None:
    assert len(tile_plan(LATENTS_SHAPE, TILING, 4, 8)) == 12
    mp.spawn(decode_worker, args=(3, free_port(), str(tmp_path)), nprocs=3, join=True)
    per_rank = [torch.load(tmp_path / f"vae-rank{r}.pt") for r in range(3)]
    one = per_rank[0]["one"]
    assert one["video"].shape == (1, 3, 13, 24, 32)
    for case, ranks in (("two", [1, 2]), ("three", [0, 1, 2])):
        leader, *others = ranks
        video = per_rank[leader][case]["video"]
        assert video.shape == one["video"].shape
        assert (video - one["video"]).abs().max().item() <= 1e-6, case
        assert all(per_rank[r][case]["video"] is None for r in others)
        for r in ranks:  # every rank, the leader too, holds less at its peak than one rank alone
            assert per_rank[r][case]["peak"] < one["peak"], (case, r, per_rank[r][case]["peak"], one["peak"])
    with torch.no_grad():
        untiled = tiny_vae().decode_latents(latents()[:, :, :2, :2, :2])
    assert torch.equal(per_rank[2]["untiled"], untiled)
    assert per_rank[0]["untiled"] is None and per_rank[1]["untiled"] is None


def video_group_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """dp 2 x ulysses 2: each video's two ranks decode it; record every send and receive."""
    init_gloo(rank, world, port)
    transfers: list[dict[str, Any]] = []

    def recording(op: Any, kind: str) -> Any:
        def wrapped(tensor: torch.Tensor, *args: Any, group: Any = None, **kwargs: Any) -> Any:
            peer = kwargs.get("dst", kwargs.get("src", args[0] if args else None))
            members = dist.get_process_group_ranks(group) if group is not None else list(range(world))
            transfers.append({"kind": kind, "peer": peer, "group": members})
            return op(tensor, *args, group=group, **kwargs)

        return wrapped

    dist.send, dist.recv = recording(dist.send, "send"), recording(dist.recv, "recv")  # this process only
    try:
        groups = ProcessGroups(world, rank).for_layout(
            ParallelDims(dp=2, ulysses=2, ring=1, world_size=world)
        )
        decoder = video_decoder(groups)
        assert decoder is not None and decoder.group is groups.video
        vae, z = tiny_vae(), latents()
        with torch.no_grad():
            video = decoder(vae, z, TILING)
        torch.save(
            {"video": video, "transfers": transfers, "video_ranks": groups.video_ranks},
            Path(out_dir) / f"g{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def test_decode_transfers_stay_inside_the_video_group(tmp_path: Path) -> None:
    """Boxes go point-to-point within the video's own group (not the world: NCCL would build a
    two-rank communicator per leader-sender pair there), and the video is still right."""
    mp.spawn(video_group_worker, args=(4, free_port(), str(tmp_path)), nprocs=4, join=True)
    per_rank = [torch.load(tmp_path / f"g{r}.pt") for r in range(4)]
    with torch.no_grad():
        one = tiny_vae().decode_latents(latents(), TILING)
    for rank, result in enumerate(per_rank):
        assert result["video_ranks"] == ([0, 1] if rank < 2 else [2, 3])
        assert result["transfers"], rank
        for transfer in result["transfers"]:
            assert transfer["group"] == result["video_ranks"] and transfer["peer"] in result["video_ranks"]
        if rank in (0, 2):
            assert (result["video"] - one).abs().max().item() <= 1e-6
        else:
            assert result["video"] is None


@pytest.mark.parametrize(
    ("shape", "tiling"),
    [
        (LATENTS_SHAPE, TILING),
        ((1, 16, 33, 90, 160), VaeTilingConfig()),  # 720p, 129 frames: 3 x 4 x 7 tiles
        (
            (1, 16, 9, 17, 5),
            VaeTilingConfig(
                tile_latent_size=4, tile_latent_overlap=1, tile_latent_frames=3, tile_latent_frame_overlap=1
            ),
        ),
    ],
)
def test_tile_assignment_covers_every_tile_once(shape: tuple[int, ...], tiling: VaeTilingConfig) -> None:
    tiles = tile_plan(shape, tiling, 4, 8)
    total = sum(tile.volume for tile in tiles)
    for parts in range(1, 10):
        runs = assign_tiles(tiles, parts)
        assert len(runs) == parts
        assert list(itertools.chain(*runs)) == list(range(len(tiles)))  # each once, contiguous, in order
        assert all(runs[: min(parts, len(tiles))])  # nobody idles while there are tiles for everyone
        if len(tiles) >= parts:  # balanced by volume, to within one tile
            biggest = max(tile.volume for tile in tiles)
            assert max(sum(tiles[i].volume for i in run) for run in runs) <= total / parts + biggest
