"""SSTA (selective and sliding tile attention) of the sparse HunyuanVideo-1.5 checkpoints: its
parameters, the tile geometry of a token grid, the tile selection and a portable block-sparse kernel.

Shape legend: B batch, H heads, D head dim, L image tokens of the grid in (t, h, w) order,
N tiles, V tokens per tile (tile volume), S selected-tile slots per query tile.

What the official code (`hyvideo/models/transformers/modules/ssta_attention.py`, `attention.py`)
computes, and this module reproduces:
- the grid is zero-padded up to a multiple of the tile (6, 8, 8) and cut into N tiles of V = 384
  tokens; padded tokens have q = k = v = 0 and stay in the sequence, so a padded key adds exp(0) to
  the softmax of every query that attends its tile (and nothing to the output);
- per head, the tile means of q and k (computed in the input dtype, then float32) give an importance
  score per (query tile, key tile): `lambda * (cos(q_i, k_j) + 1) / 2 - (1 - lambda) * r_j`, where
  r_j is the mean of `(cos(k_j, k_m) + 1) / 2` over the other key tiles m; each query tile keeps its
  top-k key tiles (64; 32 for 2..31 latent frames; lambda 0.7);
- OR'd with the 3x3x3 tile neighbourhood (its centre clipped inward at the grid's border, so a
  border tile still sees 27 tiles);
- text: every query attends every valid text token, and text queries attend every image token.

The kernel here gathers, for each query tile, the K/V of its selected tiles and attends them in
slot groups with log-sum-exp merges: memory O(L * D) per slot group, no L x L tensor.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange

from hvbatch.models.attention_backends import AttentionBackend

SPARSE_TYPES = ("ssta", "sta", "block_attn")
"""Official `attn_sparse_type`: both parts, the window only, the top-k only."""
IMAGE_TILES = {384: (1, 16, 24), 128: (1, 16, 8), 64: (1, 8, 8), 16: (1, 4, 4)}
"""The official tile for a one-frame grid, by tile volume (its window is then 1x1x1)."""
SHORT_VIDEO_FRAMES = 31
"""Official: top-k halves for grids of 2..31 latent frames (121 frames at 24 fps)."""
SLOTS_PER_CALL = 4
"""Selected key tiles attended per kernel call (a guess: not tuned on a GPU)."""
# attn_param values the official code reads, and the only ones implemented here.
_FIXED = {
    "ssta_sampling_type": ("importance",),
    "ssta_threshold": (0, 0.0),
    "ssta_adaptive_pool": (None,),
    "attn_pad_type": ("zero",),
    "attn_mask_share_within_head": (0, False),
    "win_type": ("fixed",),
}


@dataclass(frozen=True)
class SstaParams:
    """The official `attn_param` of a sparse checkpoint (defaults: the official model's own)."""

    sparse_type: str = "ssta"
    tile: tuple[int, int, int] = (6, 8, 8)
    window: tuple[int, int, int] = (3, 3, 3)
    topk: int = 64
    importance_lambda: float = 0.7

    def __post_init__(self) -> None:
        problems = []
        if self.sparse_type not in SPARSE_TYPES:
            problems.append(f"attn_sparse_type={self.sparse_type!r} is not one of {', '.join(SPARSE_TYPES)}")
        if len(self.tile) != 3 or min(self.tile) < 1:
            problems.append(f"tile_size={list(self.tile)} must be 3 positive sizes (t, h, w)")
        if len(self.window) != 3 or min(self.window) < 1 or not all(k % 2 for k in self.window):
            problems.append(f"win_size={list(self.window)} must be 3 odd sizes (t, h, w)")
        if self.topk < 1:
            problems.append(f"ssta_topk={self.topk} must be >= 1")
        if problems:
            raise ValueError("unsupported SSTA parameters: " + "; ".join(problems))

    @classmethod
    def from_official(cls, attn_param: Mapping[str, Any] | None, origin: str = "config.json") -> SstaParams:
        """The checkpoint config's `attn_param` (None: the official defaults); ValueError naming any
        value hvbatch does not implement."""
        if attn_param is None:
            return cls()
        unsupported = [
            f"{key}={attn_param[key]!r} (supported: {', '.join(repr(v) for v in allowed)})"
            for key, allowed in _FIXED.items()
            if key in attn_param and attn_param[key] not in allowed
        ]
        if unsupported:
            raise ValueError(
                f"{origin}: attn_param has settings hvbatch's SSTA does not implement: "
                f"{'; '.join(unsupported)}. "
                "Run this checkpoint with model.attention_mode=dense, or file an issue with the config."
            )
        defaults = cls()
        window = attn_param.get("win_size", [list(defaults.window)])
        window = window[0] if window and isinstance(window[0], list | tuple) else window
        try:
            return cls(
                sparse_type=str(attn_param.get("attn_sparse_type", defaults.sparse_type)),
                tile=tuple(int(s) for s in attn_param.get("tile_size", defaults.tile)),  # type: ignore[arg-type]
                window=tuple(int(s) for s in window),  # type: ignore[arg-type]
                topk=int(attn_param.get("ssta_topk", defaults.topk)),
                importance_lambda=float(attn_param.get("ssta_lambda", defaults.importance_lambda)),
            )
        except ValueError as err:
            raise ValueError(f"{origin}: attn_param: {err}") from err

    def plan(self, grid: tuple[int, int, int]) -> TilePlan:
        """The official per-grid choices: image tile and 1x1x1 window for one frame, top-k halved
        for short videos."""
        tile, window, topk = self.tile, self.window, self.topk
        if grid[0] == 1:
            volume = math.prod(tile)
            if volume not in IMAGE_TILES:
                raise ValueError(
                    f"tile_size {list(tile)} ({volume} tokens) has no one-frame tile (16/64/128/384)"
                )
            tile, window = IMAGE_TILES[volume], (1, 1, 1)
        elif grid[0] <= SHORT_VIDEO_FRAMES:
            topk = topk // 2
        use_window = self.sparse_type in ("ssta", "sta")
        use_topk = self.sparse_type in ("ssta", "block_attn") and topk > 0
        return TilePlan(
            tuple(grid), tile, window, topk if use_topk else 0, use_window, self.importance_lambda
        )


@dataclass(frozen=True)
class TilePlan:
    """The tiles of one token grid and how each query tile picks its key tiles."""

    grid: tuple[int, int, int]
    tile: tuple[int, int, int]
    window: tuple[int, int, int]
    topk: int
    """Top-k key tiles per query tile (0: none, the window only)."""
    use_window: bool
    importance_lambda: float

    @property
    def counts(self) -> tuple[int, int, int]:
        return tuple(-(-g // t) for g, t in zip(self.grid, self.tile, strict=True))  # type: ignore[return-value]

    @property
    def padded(self) -> tuple[int, int, int]:
        return tuple(n * t for n, t in zip(self.counts, self.tile, strict=True))  # type: ignore[return-value]

    @property
    def num_tiles(self) -> int:
        return math.prod(self.counts)

    @property
    def tile_volume(self) -> int:
        return math.prod(self.tile)

    @property
    def num_tokens(self) -> int:
        return math.prod(self.grid)

    @property
    def num_pad_tokens(self) -> int:
        return math.prod(self.padded) - self.num_tokens

    @property
    def max_slots(self) -> int:
        """Most key tiles one query tile can select (a host-side bound: no device sync)."""
        window = int(_window_np(self).sum(1).max()) if self.use_window else 0
        return min(self.num_tiles, min(self.topk, self.num_tiles) + window)

    def max_slots_between(self, query_tiles: tuple[int, int], key_tiles: tuple[int, int]) -> int:
        """Most key tiles in the range `key_tiles` one query tile of `query_tiles` can select."""
        window = _window_np(self)[slice(*query_tiles), slice(*key_tiles)]
        most = int(window.sum(1).max()) if self.use_window and window.size else 0
        return min(key_tiles[1] - key_tiles[0], min(self.topk, self.num_tiles) + most)

    @property
    def min_slots(self) -> int:
        """Fewest key tiles any query tile selects: slots below this are valid in every row."""
        window = int(_window_np(self).sum(1).min()) if self.use_window else 0
        return max(min(self.topk, self.num_tiles), window)

    def window_mask(self, device: torch.device | str) -> torch.Tensor:
        """`[N, N]` bool: query tile i attends key tile j by the sliding window."""
        return _on_device(self, "window", torch.device(device))

    def pad_per_tile(self, device: torch.device | str) -> torch.Tensor:
        """`[N]` float32: zero-padded tokens in each tile."""
        return _on_device(self, "pads", torch.device(device))

    def token_tiles(
        self, start: int, stop: int, device: torch.device | str = "cpu"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Tile id and position inside the tile (`[stop - start]` int64) of flat tokens start..stop."""
        return _token_tiles(self, start, stop, torch.device(device))

    def tile_range(self, start: int, stop: int) -> tuple[int, int]:
        """A contiguous tile-id range holding every tile that flat tokens start..stop touch."""
        plane = self.grid[1] * self.grid[2]
        first_row, last_row = (start // plane) // self.tile[0], ((stop - 1) // plane) // self.tile[0]
        per_row = self.counts[1] * self.counts[2]
        return first_row * per_row, (last_row + 1) * per_row

    def to_tiles(self, x_BHLD: torch.Tensor) -> torch.Tensor:
        """All L tokens -> `[B, H, N, V, D]`, zero-padded (the official layout)."""
        (t, h, w), (pt, ph, pw) = self.grid, self.padded
        x = x_BHLD.reshape(*x_BHLD.shape[:2], t, h, w, x_BHLD.shape[-1])
        x = F.pad(x, (0, 0, 0, pw - w, 0, ph - h, 0, pt - t))
        return rearrange(
            x,
            "b n (a i) (c j) (e k) d -> b n (a c e) (i j k) d",
            i=self.tile[0],
            j=self.tile[1],
            k=self.tile[2],
        )

    def from_tiles(self, x_BHNVD: torch.Tensor) -> torch.Tensor:
        """The inverse of `to_tiles`: `[B, H, N, V, D]` -> `[B, H, L, D]` (padding dropped)."""
        (t, h, w), (nt, nh, nw) = self.grid, self.counts
        x = rearrange(
            x_BHNVD, "b n (a c e) (i j k) d -> b n (a i) (c j) (e k) d",
            a=nt, c=nh, e=nw, i=self.tile[0], j=self.tile[1], k=self.tile[2],
        )  # fmt: skip
        return x[:, :, :t, :h, :w].reshape(*x.shape[:2], t * h * w, x.shape[-1])


@functools.lru_cache(maxsize=32)
def _window_np(plan: TilePlan) -> np.ndarray:
    """The official sliding-tile mask: |clip(i, k//2, n-1-k//2) - j| <= k//2 on every axis."""
    _, n_h, n_w = plan.counts
    ids = np.arange(plan.num_tiles)
    coords = (ids // (n_h * n_w), (ids % (n_h * n_w)) // n_w, ids % n_w)
    mask = np.ones((plan.num_tiles, plan.num_tiles), dtype=bool)
    for c, n, k in zip(coords, plan.counts, plan.window, strict=True):
        centre = np.clip(c, k // 2, n - 1 - k // 2)  # lo > hi (n < k): numpy gives hi, as the official
        mask &= np.abs(centre[:, None] - c[None, :]) <= k // 2
    return mask


@functools.lru_cache(maxsize=64)
def _on_device(plan: TilePlan, what: str, device: torch.device) -> torch.Tensor:
    if what == "window":
        return torch.from_numpy(_window_np(plan)).to(device)
    real = torch.zeros(plan.num_tiles)
    real.index_add_(0, plan.token_tiles(0, plan.num_tokens)[0], torch.ones(plan.num_tokens))
    return (plan.tile_volume - real).to(device)


@functools.lru_cache(maxsize=64)
def _token_tiles(
    plan: TilePlan, start: int, stop: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    _, rows, cols = plan.grid
    p = torch.arange(start, stop)
    t, h, w = p // (rows * cols), (p // cols) % rows, p % cols
    (tt, th, tw), (_, nh, nw) = plan.tile, plan.counts
    tile_id = ((t // tt) * nh + h // th) * nw + w // tw
    position = ((t % tt) * th + h % th) * tw + w % tw
    return tile_id.to(device), position.to(device)


def tile_sums(plan: TilePlan, x_BHLD: torch.Tensor, start: int = 0) -> torch.Tensor:
    """`[B, H, N, D]` float64 sums of flat tokens `start .. start + L` into their tiles (the
    partial sums of one rank's tokens add up to the whole grid's)."""
    batch, heads, length, dim = x_BHLD.shape
    sums = x_BHLD.new_zeros((batch, heads, plan.num_tiles, dim), dtype=torch.float64)
    tile_id = plan.token_tiles(start, start + length, x_BHLD.device)[0]
    return sums.index_add_(2, tile_id, x_BHLD.double())


def tile_means(plan: TilePlan, sums_BHND: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Official tile means: over the V tokens of the padded tile, rounded to the input dtype, in float32."""
    return (sums_BHND / plan.tile_volume).to(dtype).float()


def importance_scores(q_BHND: torch.Tensor, k_BHND: torch.Tensor, importance_lambda: float) -> torch.Tensor:
    """`[B, H, N, N]` float32: similarity of query tile i to key tile j minus key tile j's redundancy."""
    q_hat = q_BHND / q_BHND.norm(dim=-1, keepdim=True)
    k_hat = k_BHND / k_BHND.norm(dim=-1, keepdim=True)
    similarity = (q_hat @ k_hat.transpose(-1, -2) + 1.0) / 2.0
    overlap = (k_hat @ k_hat.transpose(-1, -2) + 1.0) / 2.0
    overlap.diagonal(dim1=-2, dim2=-1).fill_(float("nan"))
    redundancy = torch.nanmean(overlap, dim=-2, keepdim=True)
    return importance_lambda * similarity - (1.0 - importance_lambda) * redundancy


def select_tiles(plan: TilePlan, q_mean_BHND: torch.Tensor, k_mean_BHND: torch.Tensor) -> torch.Tensor:
    """`[B, H, N, N]` bool: the key tiles each query tile attends (window OR top-k importance)."""
    batch, heads, num_tiles, _ = q_mean_BHND.shape
    device = q_mean_BHND.device
    if plan.use_window:
        selected = plan.window_mask(device).expand(batch, heads, num_tiles, num_tiles).clone()
    else:
        selected = torch.zeros(batch, heads, num_tiles, num_tiles, dtype=torch.bool, device=device)
    if plan.topk:
        scores = importance_scores(q_mean_BHND, k_mean_BHND, plan.importance_lambda)
        top = scores.topk(min(plan.topk, num_tiles), dim=-1, sorted=False).indices
        selected.scatter_(-1, top, True)
    return selected


def merge_partial(
    out: torch.Tensor | None, lse: torch.Tensor | None, part_out: torch.Tensor, part_lse: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Online-softmax merge of two partial attentions over disjoint keys, float32; a row may be empty
    in either part (lse -inf, out 0)."""
    if out is None or lse is None:
        return part_out.float(), part_lse.float()
    merged = torch.logaddexp(lse, part_lse)
    safe = torch.where(torch.isinf(merged), torch.zeros_like(merged), merged)
    out = out * torch.exp(lse - safe)[..., None] + part_out.float() * torch.exp(part_lse - safe)[..., None]
    return out, merged


def add_zero_keys(
    out: torch.Tensor, lse: torch.Tensor, num_zero_keys: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same attention with `num_zero_keys` more keys of logit 0 and value 0 (zero-padded tokens)."""
    log_count = torch.log(num_zero_keys.float())  # 0 keys: -inf, nothing changes
    merged = torch.logaddexp(lse, log_count)
    return out * torch.exp(lse - merged)[..., None], merged


def masked_attention_with_lse(
    q_BHLD: torch.Tensor, k_BHSD: torch.Tensor, v_BHSD: torch.Tensor, bias_BH1S: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention with an additive key bias (0 or -inf, broadcast over queries) and its log-sum-exp."""
    if q_BHLD.device.type == "cpu" and q_BHLD.dtype in (torch.float32, torch.float16, torch.bfloat16):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q_BHLD, k_BHSD, v_BHSD, 0.0, False, attn_mask=bias_BH1S
        )[:2]
        return out, lse.float()
    if q_BHLD.device.type == "cuda":  # unverified here (no GPU): memory-efficient kernel with a bias
        bias = bias_BH1S.expand(-1, -1, q_BHLD.shape[2], -1)
        try:
            out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
                q_BHLD, k_BHSD, v_BHSD, bias, True
            )[:2]
            return out, lse[..., : q_BHLD.shape[2]].float()
        except RuntimeError:
            pass
    scores = (q_BHLD.float() @ k_BHSD.float().transpose(-1, -2)) * q_BHLD.shape[
        -1
    ] ** -0.5 + bias_BH1S.float()
    lse = torch.logsumexp(scores, dim=-1)
    return (torch.softmax(scores, dim=-1) @ v_BHSD.float()).to(q_BHLD.dtype), lse


def _gather_tiles(x_BHJVD: torch.Tensor, slots_BHIG: torch.Tensor) -> torch.Tensor:
    """`x[b, h, slots[b, h, i, g]]` -> `[B, H*I, G*V, D]`."""
    batch, heads, num_tiles, volume, dim = x_BHJVD.shape
    _, _, num_queries, group = slots_BHIG.shape
    index = slots_BHIG.reshape(batch * heads, num_queries * group, 1).expand(-1, -1, volume * dim)
    gathered = torch.gather(x_BHJVD.reshape(batch * heads, num_tiles, volume * dim), 1, index)
    return gathered.reshape(batch, heads * num_queries, group * volume, dim)


def sparse_tile_attention(
    q_BHIVD: torch.Tensor,
    k_BHJVD: torch.Tensor,
    v_BHJVD: torch.Tensor,
    selected_BHIJ: torch.Tensor,
    backend: AttentionBackend,
    *,
    max_slots: int,
    min_slots: int = 0,
    key_present_JV: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Query tiles attend their selected key tiles: `(out [B, H, I, V, D] float32, lse [B, H, I, V])`.

    `max_slots` bounds the selected tiles per query tile (rows with fewer mask their last slots);
    slots below `min_slots` are known valid in every row. `key_present_JV` marks the key positions
    that exist (None: all, zero padding included); a row that attends nothing gets lse -inf, out 0.
    """
    batch, heads, num_q, volume, dim = q_BHIVD.shape
    max_slots = min(max_slots, selected_BHIJ.shape[-1])
    # Selected tiles first, in ascending order; rows with fewer than max_slots end in unselected ones.
    order = torch.argsort((~selected_BHIJ).to(torch.int8), dim=-1, stable=True)[..., :max_slots]
    count = selected_BHIJ.sum(-1, keepdim=True)
    q = q_BHIVD.reshape(batch, heads * num_q, volume, dim)
    out, lse = None, None
    for first in range(0, max_slots, SLOTS_PER_CALL):
        slots = order[..., first : first + SLOTS_PER_CALL]
        k, v = _gather_tiles(k_BHJVD, slots), _gather_tiles(v_BHJVD, slots)
        if key_present_JV is None and first + slots.shape[-1] <= min_slots:
            part_out, part_lse = backend.attention_with_lse(q, k, v)
            part_out, part_lse = part_out.float(), part_lse.float()
        else:
            in_use = torch.arange(first, first + slots.shape[-1], device=count.device) < count
            keep = in_use[..., None].expand(*in_use.shape, volume)
            if key_present_JV is not None:
                keep = keep & key_present_JV[slots]
            keep = keep.reshape(batch, heads * num_q, 1, -1)
            bias = torch.zeros(keep.shape, dtype=q.dtype, device=q.device).masked_fill_(~keep, float("-inf"))
            part_out, part_lse = masked_attention_with_lse(q, k, v, bias)
            attended = keep.any(-1, keepdim=True)  # [B, H*I, 1, 1]
            part_out = torch.where(attended, part_out.float(), 0.0)
            part_lse = torch.where(attended[..., 0], part_lse.float(), float("-inf"))
        out, lse = merge_partial(out, lse, part_out, part_lse)
    assert out is not None and lse is not None
    return out.reshape(batch, heads, num_q, volume, dim), lse.reshape(batch, heads, num_q, volume)
