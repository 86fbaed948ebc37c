"""Parallel VAE decode: the tiles of one video split over the ranks that generated it.

The tile plan is `vae_tiling.tile_plan`, the same as a one-rank tiled decode. Each rank of the
group decodes a contiguous run of it (runs balanced by latent volume, so no rank idles long while
another decodes) and blends its tiles into a box that covers only those tiles. Then the leader
allocates the full video, adds its own box, and receives and adds the other ranks' boxes one at a
time (point-to-point within the video's own process group, contiguous float32 buffers whose shapes
both sides know from the plan: safe on gloo and NCCL). Over the world group NCCL would build a
two-rank communicator per (leader, sender) pair; within the video group the pairs stay inside
the communicator the video's ranks already share. Only where two runs meet does a sample get its
contributions summed in another order than the one-rank decode, so the result equals it to
float32 rounding (about 1e-7).

Memory: a rank's peak during decode is one tile's activations plus its own box (about 1/N of the
video); the leader's full video is allocated only after its own tiles are decoded. The one-rank
decode holds the full video and one tile's activations together.

With tiling disabled, or a latent that fits one tile, the leader decodes alone and the other ranks
return at once.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
import torch.distributed as dist

from hvbatch.models.vae import AutoencoderKLCausal3D
from hvbatch.models.vae_tiling import Tile, VaeTilingConfig, blend_tiles, output_extent, tile_plan
from hvbatch.parallel.dims import ParallelGroups
from hvbatch.parallel.transport import from_wire, to_wire


def assign_tiles(tiles: list[Tile], parts: int) -> list[list[int]]:
    """Tile indices for each of `parts` ranks: contiguous runs in plan order of near-equal volume.

    Every tile is in exactly one run; with fewer tiles than parts, the last runs are empty.
    """
    count = len(tiles)
    if count <= parts:
        return [[i] for i in range(count)] + [[] for _ in range(parts - count)]
    prefix = [0, *itertools.accumulate(tile.volume for tile in tiles)]
    bounds = [0]
    for k in range(1, parts):
        target = prefix[-1] * k / parts
        lo, hi = bounds[-1] + 1, count - (parts - k)  # leave at least one tile to every later run
        bounds.append(min(range(lo, hi + 1), key=lambda i: abs(prefix[i] - target)))
    bounds.append(count)
    return [list(range(start, stop)) for start, stop in itertools.pairwise(bounds)]


def segments(tiles: list[Tile]) -> list[list[Tile]]:
    """A run of tiles split where its temporal span changes: each part blends into one box.

    A run that crosses from one temporal span to the next would otherwise need a box over both
    spans' full height and width.
    """
    return [list(group) for _, group in itertools.groupby(tiles, key=lambda tile: tile.t)]


def parallel_tiled_decode(
    decode: Callable[[torch.Tensor], torch.Tensor],
    z_BCTHW: torch.Tensor,
    tiles: list[Tile],
    ranks: list[int],
    rank: int,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor | None:
    """The blended float32 video of all `tiles` on `ranks[0]`, None on the other ranks.

    Every rank of `ranks` (global ranks, leader first) calls this with the same latent; boxes go
    point-to-point over `group` (the video's group; None: the world group), which must hold all of
    `ranks`.
    """
    runs = assign_tiles(tiles, len(ranks))
    boxes = [
        blend_tiles(decode, z_BCTHW, part) for part in segments([tiles[i] for i in runs[ranks.index(rank)]])
    ]
    if rank != ranks[0]:
        for box_BCTHW in boxes:
            dist.send(to_wire(box_BCTHW.contiguous(), group), dst=ranks[0], group=group)
        return None
    batch, channels = boxes[0].shape[:2]  # the leader's run is never empty
    _, frames, _, height, _, width = output_extent(tiles)
    out_BCTHW = torch.zeros(batch, channels, frames, height, width, device=z_BCTHW.device)
    for part, box_BCTHW in zip(segments([tiles[i] for i in runs[0]]), boxes, strict=True):
        _add_box(out_BCTHW, box_BCTHW, part)
    del boxes
    for src, run in zip(ranks[1:], runs[1:], strict=True):
        for part in segments([tiles[i] for i in run]):
            t0, t1, h0, h1, w0, w1 = output_extent(part)
            received = torch.empty(batch, channels, t1 - t0, h1 - h0, w1 - w0, device=z_BCTHW.device)
            wire = to_wire(received, group)
            dist.recv(wire, src=src, group=group)
            _add_box(out_BCTHW, from_wire(wire, received.device), part)
            del received
    return out_BCTHW


def _add_box(out_BCTHW: torch.Tensor, box_BCTHW: torch.Tensor, tiles: list[Tile]) -> None:
    t0, t1, h0, h1, w0, w1 = output_extent(tiles)
    out_BCTHW[:, :, t0:t1, h0:h1, w0:w1] += box_BCTHW


class ParallelVaeDecoder:
    """`decoder(vae, latents, tiling)` over the ranks of one video: the video in [0, 1] on the leader.

    A drop-in for `Pipeline.decoder`: every rank of `ranks` (global ranks, leader first) calls it
    with the same latents; the leader gets the float32 video, the others None.
    """

    def __init__(self, ranks: list[int], rank: int, group: dist.ProcessGroup | None = None) -> None:
        if rank not in ranks:
            raise ValueError(f"rank {rank} is not in the decode group {ranks}")
        self.ranks, self.rank, self.group = ranks, rank, group

    @property
    def is_leader(self) -> bool:
        return self.rank == self.ranks[0]

    def __call__(
        self, vae: AutoencoderKLCausal3D, latents: torch.Tensor, tiling: VaeTilingConfig
    ) -> torch.Tensor | None:
        config = vae.config
        ratios = (config.temporal_compression_ratio, config.spatial_compression_ratio)
        tiles = tile_plan(tuple(latents.shape), tiling, *ratios)
        if not tiling.enabled or len(tiles) == 1 or len(self.ranks) == 1:
            return vae.decode_latents(latents, tiling) if self.is_leader else None
        # What `AutoencoderKLCausal3D.decode_latents` does around its tiled decode.
        param = next(vae.parameters())
        z = (latents.to(device=param.device, dtype=torch.float32) / config.scaling_factor).to(param.dtype)
        video = parallel_tiled_decode(vae.decode, z, tiles, self.ranks, self.rank, self.group)
        return None if video is None else video.div_(2).add_(0.5).clamp_(0.0, 1.0)


def video_decoder(groups: ParallelGroups) -> ParallelVaeDecoder | None:
    """The parallel decoder over the ranks that generate this rank's video, sending within the
    video's own group (cfg x SP block); None for one rank."""
    ranks = groups.video_ranks
    return ParallelVaeDecoder(ranks, groups.rank, groups.video) if len(ranks) > 1 else None
