"""Tiled VAE decoding: overlapping latent tiles in T, H and W, blended linearly over the overlaps.

Shapes: `B` batch, `C` channels, `T` frames, `H`, `W`; `z_BCTHW` raw latent, `x_BCTHW` video.

All sizes are in LATENT units. With the defaults (the official HunyuanVideo tiling):
  * temporal tiles of 1 + 16 latent frames (65 video frames) start every 12 latent frames; every
    tile but the first drops its first decoded frame (it has no past context), so neighbouring
    tiles share 4 * 4 = 16 video frames;
  * spatial tiles of 32 x 32 latent cells (256 px) start every 24 cells, sharing 64 px.
Over a shared stretch of n samples the earlier tile's weight falls as 1 - y/n and the later one's
rises as y/n (y = 0..n-1), so the weights sum to exactly one everywhere; in H and W the 2-D
weight is the product of the two 1-D ramps. Tiles are added straight into one float32 output, so
peak memory is one tile's activations plus the output video. The plan (`tile_plan`), one tile's
weighted decode (`decode_tile`) and the blending (`blend_tiles`) are separate steps, so that
`hvbatch.parallel.vae_decode` can split the plan over the ranks of a video from outside.

Two switches serve VAEs tiled the way HunyuanVideo-1.5's official code tiles (see VaeTilingConfig):
`temporal=False` gives every spatial tile all frames, and `blend="sequential"` places tiles at
every stride below the size and weights them as the official in-place, row-by-row blending does
(equal to bilinear weights except in a row's bottom band, where the horizontal ramps are squared).
The defaults keep the rule above.

Tiled output is not bit-equal to untiled decoding: GroupNorm statistics and the mid-block
attention see one tile instead of the whole video, and the causal convs of a later temporal tile
start without past frames. The blending keeps the difference small (see tests/test_vae.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

BLEND_RULES = ("bilinear", "sequential")


@dataclass(frozen=True, kw_only=True)
class VaeTilingConfig:
    """How `decode_latents` splits a latent into tiles. All sizes are latent cells / latent frames."""

    enabled: bool = True
    """Decode in tiles; False decodes the whole latent at once."""
    tile_latent_size: int = 32
    """Spatial tile edge in latent cells (x8 in pixels: 32 -> 256 px)."""
    tile_latent_overlap: int = 8
    """Latent cells shared by neighbouring spatial tiles; blended over 8x that many pixels."""
    tile_latent_frames: int = 16
    """Latent frames per temporal tile besides its first (16 -> tiles of 17 latent, 65 video frames)."""
    tile_latent_frame_overlap: int = 4
    """Latent frames shared by neighbouring temporal tiles; blended over 4x that many video frames."""
    temporal: bool = True
    """Tile along T as well; False decodes all frames in every spatial tile (HunyuanVideo-1.5:
    its official decode tiles H and W only)."""
    blend: str = "bilinear"
    """How spatial tiles are placed and weighted. `bilinear`: tiles until one reaches the edge, each
    weighted by the product of its two 1-D ramps. `sequential`: the official HunyuanVideo rule (and
    diffusers'): a tile at every stride below the size (once either side exceeds one tile), a ramp
    no longer than the later tile, and the weights of blending row by row in place (blend_v, then
    blend_h), which square the horizontal ramps in the band a row shares with the next."""

    def __post_init__(self) -> None:
        if self.blend not in BLEND_RULES:
            raise ValueError(f"VaeTilingConfig: blend={self.blend!r} is not one of {BLEND_RULES}")
        for name, tile, overlap in (
            ("tile_latent_size", self.tile_latent_size, self.tile_latent_overlap),
            ("tile_latent_frames", self.tile_latent_frames, self.tile_latent_frame_overlap),
        ):
            if tile < 1 or overlap < 0 or 2 * overlap > tile:
                raise ValueError(
                    f"VaeTilingConfig: {name}={tile} with overlap {overlap} is invalid; need "
                    f"tile >= 1 and 0 <= overlap <= tile / 2 so that only two tiles ever overlap"
                )


@dataclass(frozen=True)
class TileSpan:
    """One tile along one axis: latent slice, the output samples it writes, and its blend ramps."""

    latent_start: int
    latent_stop: int
    out_start: int
    out_stop: int
    drop_first: int
    """Decoded samples to discard at the front (1 for non-first temporal tiles)."""
    ramp_in: int
    """Samples at the front blended with the previous tile (weight rising y/n)."""
    ramp_out: int
    """Samples at the back blended with the next tile (weight falling 1 - y/n)."""


def _latent_starts(size: int, tile: int, stride: int) -> list[int]:
    """Tile starts 0, stride, 2*stride, ... until a tile reaches the end (none fully inside another)."""
    starts = [0]
    while starts[-1] + tile < size:
        starts.append(starts[-1] + stride)
    return starts


def spatial_spans(size: int, tile: int, overlap: int, ratio: int) -> list[TileSpan]:
    """Spans along H or W for a latent of `size` cells; output is `ratio` pixels per cell."""
    starts = _latent_starts(size, tile, tile - overlap)
    spans = []
    for k, start in enumerate(starts):
        stop = min(start + tile, size)
        ramp_in = ratio * overlap if k > 0 else 0
        ramp_out = ratio * overlap if k < len(starts) - 1 else 0
        spans.append(TileSpan(start, stop, ratio * start, ratio * stop, 0, ramp_in, ramp_out))
    return spans


def sequential_spans(size: int, tile: int, overlap: int, ratio: int) -> list[TileSpan]:
    """Spans along H or W as the official sequential tiler places them: at 0, stride, 2*stride, ...
    while below `size` (so the last tile may be short), each ramp as long as the overlap but never
    longer than the later tile."""
    starts = list(range(0, size, tile - overlap))
    stops = [min(start + tile, size) for start in starts]
    # Ramp k is shared by tiles k-1 and k; ramp 0 and the one after the last tile are empty.
    lengths = [stop - start for start, stop in zip(starts, stops, strict=True)]
    ramps = [0, *(ratio * min(overlap, length) for length in lengths[1:]), 0]
    return [
        TileSpan(start, stop, ratio * start, ratio * stop, 0, ramps[k], ramps[k + 1])
        for k, (start, stop) in enumerate(zip(starts, stops, strict=True))
    ]


def whole_span(size: int, ratio: int, *, causal: bool = False) -> TileSpan:
    """One span over the whole axis: `ratio` samples per cell, or 1 + ratio*(size-1) if `causal`."""
    return TileSpan(0, size, 0, ratio * (size - 1) + 1 if causal else ratio * size, 0, 0, 0)


def temporal_spans(frames: int, tile: int, overlap: int, ratio: int) -> list[TileSpan]:
    """Spans along T for `frames` latent frames; latent frame j >= 1 becomes `ratio` video frames.

    A tile holds 1 + `tile` latent frames. Decoding latent frames [i, stop) yields
    1 + ratio*(stop-1-i) frames; for i > 0 the first one (decoded without past context) is
    dropped and the rest are video frames [ratio*i + 1, ratio*(stop-1) + 1).
    """
    starts = _latent_starts(frames, tile + 1, tile - overlap)
    spans = []
    for k, start in enumerate(starts):
        stop = min(start + tile + 1, frames)
        out_start = 0 if k == 0 else ratio * start + 1
        ramp_in = ratio * overlap if k > 0 else 0
        ramp_out = ratio * overlap if k < len(starts) - 1 else 0
        spans.append(TileSpan(start, stop, out_start, ratio * (stop - 1) + 1, int(k > 0), ramp_in, ramp_out))
    return spans


def blend_weights(span: TileSpan, device: torch.device, *, squared: bool = False) -> torch.Tensor:
    """1-D float32 weights over `span`'s output samples: linear ramps at shared ends, else 1.

    `squared`: the ramps of the sequential rule's bottom band, y^2 rising and 1 - y^2 falling
    (y = 0, 1/n, ..., (n-1)/n), which still sum to one with the neighbour's.
    """
    length = span.out_stop - span.out_start
    assert span.ramp_in + span.ramp_out <= length, span
    weight = torch.ones(length, dtype=torch.float32, device=device)
    if span.ramp_in:
        rising = torch.arange(span.ramp_in, device=device) / span.ramp_in
        weight[: span.ramp_in] = rising.square() if squared else rising
    if span.ramp_out:
        rising = torch.arange(span.ramp_out, device=device) / span.ramp_out
        weight[length - span.ramp_out :] = 1 - (rising.square() if squared else rising)
    return weight


def sequential_weights(h: TileSpan, w: TileSpan, device: torch.device) -> torch.Tensor:
    """[H, W] float32 weights of one tile under the sequential rule.

    Blending row by row in place (each tile first with the finished tile above it, then with the
    finished tile to its left) gives the product of the 1-D ramps, except in the bottom band a row
    shares with the next one: there the tile above is read after its own horizontal blend, which
    turns the horizontal ramps into y^2 / 1 - y^2 (checked against the official loops in
    tests/test_hv15_vae.py).
    """
    h_weight = blend_weights(h, device)
    weight = h_weight[:, None] * blend_weights(w, device)
    if h.ramp_out:
        band = slice(h.out_stop - h.out_start - h.ramp_out, None)
        weight[band] = h_weight[band, None] * blend_weights(w, device, squared=True)
    return weight


@dataclass(frozen=True)
class Tile:
    """One 3-D tile: its span along T, H and W."""

    t: TileSpan
    h: TileSpan
    w: TileSpan
    blend: str = "bilinear"
    """`VaeTilingConfig.blend`: how the H x W weights are formed."""

    def latent_slice(self, z_BCTHW: torch.Tensor) -> torch.Tensor:
        t, h, w = self.t, self.h, self.w
        return z_BCTHW[
            :,
            :,
            t.latent_start : t.latent_stop,
            h.latent_start : h.latent_stop,
            w.latent_start : w.latent_stop,
        ]

    @property
    def out_shape(self) -> tuple[int, int, int]:
        """Output (frames, height, width) the tile writes."""
        return tuple(s.out_stop - s.out_start for s in (self.t, self.h, self.w))  # type: ignore[return-value]

    @property
    def volume(self) -> int:
        """Latent cells decoded: the tile's cost."""
        return math.prod(s.latent_stop - s.latent_start for s in (self.t, self.h, self.w))


def tile_plan(
    latent_shape: tuple[int, ...], tiling: VaeTilingConfig, temporal_ratio: int, spatial_ratio: int
) -> list[Tile]:
    """Every tile of a `[B, C, T, H, W]` latent, in decode order (T outermost, then H, then W).

    One tile means the latent fits in one tile (decoded in a single call, without blending).
    """
    frames, height, width = latent_shape[2:]
    if tiling.temporal:
        t_spans = temporal_spans(
            frames, tiling.tile_latent_frames, tiling.tile_latent_frame_overlap, temporal_ratio
        )
    else:
        t_spans = [whole_span(frames, temporal_ratio, causal=True)]
    size, overlap = tiling.tile_latent_size, tiling.tile_latent_overlap
    if tiling.blend == "bilinear":
        h_spans = spatial_spans(height, size, overlap, spatial_ratio)
        w_spans = spatial_spans(width, size, overlap, spatial_ratio)
        return [Tile(t, h, w) for t in t_spans for h in h_spans for w in w_spans]
    if height <= size and width <= size:  # the official rule tiles only what exceeds one tile
        h_spans, w_spans = [whole_span(height, spatial_ratio)], [whole_span(width, spatial_ratio)]
    else:
        h_spans = sequential_spans(height, size, overlap, spatial_ratio)
        w_spans = sequential_spans(width, size, overlap, spatial_ratio)
    return [Tile(t, h, w, tiling.blend) for t in t_spans for h in h_spans for w in w_spans]


def output_extent(tiles: list[Tile]) -> tuple[int, int, int, int, int, int]:
    """`(t0, t1, h0, h1, w0, w1)`: the output box the tiles write into together."""
    return (
        min(tile.t.out_start for tile in tiles),
        max(tile.t.out_stop for tile in tiles),
        min(tile.h.out_start for tile in tiles),
        max(tile.h.out_stop for tile in tiles),
        min(tile.w.out_start for tile in tiles),
        max(tile.w.out_stop for tile in tiles),
    )


def decode_tile(
    decode: Callable[[torch.Tensor], torch.Tensor], z_BCTHW: torch.Tensor, tile: Tile
) -> torch.Tensor:
    """The tile's float32 output, already multiplied by its blend weights (ready to be added)."""
    device = z_BCTHW.device
    tile_x = decode(tile.latent_slice(z_BCTHW))[:, :, tile.t.drop_first :].float()
    assert tile_x.shape[2:] == tile.out_shape, (tile_x.shape, tile)
    if tile.blend == "sequential":
        t_weight = blend_weights(tile.t, device)
        return tile_x.mul_(t_weight.view(-1, 1, 1)).mul_(sequential_weights(tile.h, tile.w, device))
    t_weight, h_weight, w_weight = (blend_weights(s, device) for s in (tile.t, tile.h, tile.w))
    return tile_x.mul_(t_weight.view(-1, 1, 1)).mul_(h_weight.view(-1, 1)).mul_(w_weight)


def add_tile(
    out_BCTHW: torch.Tensor, tile_x: torch.Tensor, tile: Tile, origin: tuple[int, int, int] = (0, 0, 0)
) -> None:
    """Add a weighted tile into `out_BCTHW`, whose first output sample is at `origin` (t, h, w)."""
    t0, h0, w0 = origin
    t, h, w = tile.t, tile.h, tile.w
    out_BCTHW[
        :,
        :,
        t.out_start - t0 : t.out_stop - t0,
        h.out_start - h0 : h.out_stop - h0,
        w.out_start - w0 : w.out_stop - w0,
    ] += tile_x


def blend_tiles(
    decode: Callable[[torch.Tensor], torch.Tensor], z_BCTHW: torch.Tensor, tiles: list[Tile]
) -> torch.Tensor:
    """Decode `tiles` one by one and blend them into one float32 box covering `output_extent(tiles)`."""
    t0, t1, h0, h1, w0, w1 = output_extent(tiles)
    out: torch.Tensor | None = None
    for tile in tiles:
        tile_x = decode_tile(decode, z_BCTHW, tile)
        if out is None:
            shape = (z_BCTHW.shape[0], tile_x.shape[1], t1 - t0, h1 - h0, w1 - w0)
            out = torch.zeros(shape, dtype=torch.float32, device=z_BCTHW.device)
        add_tile(out, tile_x, tile, (t0, h0, w0))
        del tile_x
    assert out is not None
    return out


def tiled_decode(
    decode: Callable[[torch.Tensor], torch.Tensor],
    z_BCTHW: torch.Tensor,
    tiling: VaeTilingConfig,
    temporal_ratio: int,
    spatial_ratio: int,
) -> torch.Tensor:
    """Decode raw latent `z_BCTHW` tile by tile with `decode` (untiled decode of one tile).

    Returns the float32 video [B, C_out, 1 + temporal_ratio*(T-1), spatial_ratio*H, spatial_ratio*W].
    A latent no larger than one tile is decoded in a single call.
    """
    tiles = tile_plan(tuple(z_BCTHW.shape), tiling, temporal_ratio, spatial_ratio)
    if len(tiles) == 1:
        return decode(z_BCTHW).float()
    return blend_tiles(decode, z_BCTHW, tiles)
