"""SSTA under Ulysses x Ring: the selection is made on the full token grid, never per rank.

Shape legend as `hvbatch.parallel.attention`: B batch, H heads, D head dim, u Ulysses degree,
r ring degree, Ll image tokens per rank; Lb = u * Ll image tokens of one ring block; N tiles, V
tokens per tile, I / J the query / key tiles a block touches.

- Ulysses: after the all-to-all each rank holds every token of its ring block for H/u heads. With
  ring degree 1 that block is the whole grid: the single-device SSTA (`ssta_full_grid`) runs on
  these heads as it is (the selection is per head, so nothing else is exchanged).
- Ring: the q and k tile sums of each ring block add up, in one all-reduce of `[2, B, H/u, N, D]`
  float64 over the ring group, to the whole grid's; every ring rank then selects the same tiles.
  The K/V blocks rotate as for dense attention; on each block a rank's query tiles attend only the
  key tiles they selected that the block holds (its tokens placed in their tiles, positions the
  block does not hold masked). Without a device sync the slots per block are bounded on the host
  (top-k plus the window tiles the block holds, at most its tiles): rows that selected fewer tiles
  there fill the rest with masked slots, so a block costs that bound, not its size. Zero-padded
  tokens are not in any block: their logit-0, value-0 share is added once at the end, from the count of
  padded tokens in the selected tiles (text queries: all of them), as the official layout has it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from hvbatch.models.attention import AttentionFn, sdpa_attention
from hvbatch.models.ssta import (
    TilePlan,
    add_zero_keys,
    merge_partial,
    select_tiles,
    sparse_tile_attention,
    tile_means,
    tile_sums,
)
from hvbatch.models.ssta_attention import SstaAttention, ssta_full_grid
from hvbatch.parallel.attention import USPAttention, attention_with_lse
from hvbatch.parallel.dims import ParallelGroups


class SstaUSPAttention(USPAttention):
    """`USPAttention` whose local kernel is SSTA; `set_grid` gives it the whole video's token grid."""

    def __init__(self, groups: ParallelGroups, local: SstaAttention, comm_dtype: str = "none") -> None:
        super().__init__(groups, backend=local.backend, comm_dtype=comm_dtype)
        self.local = local
        self.grid: tuple[int, int, int] | None = None

    def set_grid(self, grid: tuple[int, int, int]) -> None:
        self.grid = (int(grid[0]), int(grid[1]), int(grid[2]))
        self.local.set_grid(self.grid)

    @torch.compiler.disable
    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, num_text_tokens: int = 0
    ) -> torch.Tensor:
        if self.local_only:  # the compile warm-up: dense over this rank's own tokens, no collective
            return super().__call__(q, k, v, num_text_tokens=num_text_tokens)
        dims, shard = self.groups.dims, q.shape[1] - num_text_tokens
        assert shard == self.shard_len, f"image shard {shard} != {self.shard_len} set by the runner"
        plan = self.local.plan(self.num_image_tokens)
        heads_local = q.shape[2] // dims.ulysses
        first_head = self.groups.ulysses_ranks.index(self.groups.rank) * heads_local
        head_slice = slice(first_head, first_head + heads_local)
        qkv_img = self._seq_to_heads(torch.stack([q[:, :shard], k[:, :shard], v[:, :shard]]))
        qkv_img = qkv_img.transpose(2, 3)  # [3, B, H/u, Lb, D]
        block_len = dims.ulysses * shard
        ring_index = self.groups.ring_ranks.index(self.groups.rank)
        valid = self._valid_in_block(ring_index)
        text = None
        if num_text_tokens:
            text = tuple(x[:, shard:, head_slice].transpose(1, 2) for x in (q, k, v))
        if dims.ring == 1:
            q_i, k_i, v_i = (x[:, :, :valid] for x in qkv_img)
            backend = self._backend(q_i)
            img, txt = ssta_full_grid(
                plan, q_i, k_i, v_i, text, backend, self.local.kernel, self.local.on_selection
            )
        else:
            img, txt = self._ring_ssta(plan, qkv_img, text, ring_index * block_len, valid)
        img = torch.nn.functional.pad(img, (0, 0, 0, block_len - valid))
        img_out = self._heads_to_seq(img.to(q.dtype).transpose(1, 2))
        if txt is None:
            return img_out
        return torch.cat([img_out, self._gather_heads(txt.to(q.dtype).transpose(1, 2))], dim=1)

    def _select(self, plan: TilePlan, q_BHLD: torch.Tensor, k_BHLD: torch.Tensor, start: int) -> torch.Tensor:
        """The full grid's `[B, H/u, N, N]` selection from this ring block's tokens."""
        sums = torch.stack([tile_sums(plan, q_BHLD, start), tile_sums(plan, k_BHLD, start)])
        dist.all_reduce(sums, group=self.groups.ring)
        ring = self.groups.dims.ring
        self.stats.add("ring", sums.numel() * sums.element_size() * 2 * (ring - 1) / ring)
        selected = select_tiles(
            plan, tile_means(plan, sums[0], q_BHLD.dtype), tile_means(plan, sums[1], q_BHLD.dtype)
        )
        if self.local.on_selection is not None:
            self.local.on_selection(plan, selected)
        return selected

    def _ring_ssta(
        self,
        plan: TilePlan,
        qkv_3BHLD: torch.Tensor,
        text: tuple[torch.Tensor, ...] | None,
        start: int,
        valid: int,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """This ring block's image and text outputs (float32) from every block's keys, rotated."""
        q_img = qkv_3BHLD[0][:, :, :valid]
        batch, heads, _, dim = q_img.shape
        volume, backend = plan.tile_volume, self._backend(q_img)
        selected = self._select(plan, q_img, qkv_3BHLD[1][:, :, :valid], start)
        first_q, last_q = plan.tile_range(start, start + max(valid, 1))
        q_tile, q_pos = plan.token_tiles(start, start + valid, q_img.device)
        q_index = (q_tile - first_q) * volume + q_pos
        q_tiles = q_img.new_zeros(batch, heads, (last_q - first_q) * volume, dim).index_copy_(
            2, q_index, q_img
        )
        q_tiles = q_tiles.reshape(batch, heads, last_q - first_q, volume, dim)
        q_txt = None if text is None else text[0]

        def block_fn(owner: int, k_b: torch.Tensor, v_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            k_start = owner * qkv_3BHLD.shape[3]
            first_k, last_k = plan.tile_range(k_start, k_start + k_b.shape[2])
            k_tile, k_pos = plan.token_tiles(k_start, k_start + k_b.shape[2], k_b.device)
            k_index = (k_tile - first_k) * volume + k_pos
            shape = (batch, heads, (last_k - first_k) * volume, dim)
            k_tiles = k_b.new_zeros(shape).index_copy_(2, k_index, k_b).reshape(batch, heads, -1, volume, dim)
            v_tiles = v_b.new_zeros(shape).index_copy_(2, k_index, v_b).reshape(batch, heads, -1, volume, dim)
            present = torch.zeros(shape[2], dtype=torch.bool, device=k_b.device).index_fill_(0, k_index, True)
            out_t, lse_t = sparse_tile_attention(
                q_tiles,
                k_tiles,
                v_tiles,
                selected[:, :, first_q:last_q, first_k:last_k],
                backend,
                max_slots=plan.max_slots_between((first_q, last_q), (first_k, last_k)),
                key_present_JV=present.reshape(-1, volume),
            )
            out = out_t.reshape(batch, heads, -1, dim).index_select(2, q_index)
            lse = lse_t.reshape(batch, heads, -1).index_select(2, q_index)
            rows = qkv_3BHLD.shape[3] - valid  # the block's padding queries: nothing attended
            out = torch.nn.functional.pad(out, (0, 0, 0, rows))
            lse = torch.nn.functional.pad(lse, (0, rows), value=float("-inf"))
            if q_txt is None:
                return out, lse
            out_t, lse_t = attention_with_lse(q_txt, k_b, v_b, backend)
            return torch.cat([out, out_t.float()], dim=2), torch.cat([lse, lse_t], dim=2)

        q_all = qkv_3BHLD[0] if q_txt is None else torch.cat([qkv_3BHLD[0], q_txt], dim=2)
        text_kv = None if text is None else (text[1], text[2])
        out, lse = None, None
        for _, out_b, lse_b in sorted(
            self._ring(q_all, qkv_3BHLD[1:], text_kv, block_fn), key=lambda p: p[0]
        ):
            out, lse = merge_partial(out, lse, out_b, lse_b)  # a fixed order: the same text on every rank
        assert out is not None and lse is not None
        block_len = qkv_3BHLD.shape[3]
        pads = (selected.float() @ plan.pad_per_tile(q_img.device))[:, :, q_tile]  # [B, H/u, valid]
        img, _ = add_zero_keys(out[:, :, :valid], lse[:, :, :valid], pads)
        if q_txt is None:
            return img, None
        txt_pads = torch.full_like(lse[:, :, block_len:], float(plan.num_pad_tokens))
        txt, _ = add_zero_keys(out[:, :, block_len:], lse[:, :, block_len:], txt_pads)
        return img, txt


def usp_attention_for(
    attention_fn: AttentionFn, groups: ParallelGroups, comm_dtype: str = "none"
) -> USPAttention:
    """The sequence-parallel attention serving a model whose single-device attention is `attention_fn`."""
    if isinstance(attention_fn, SstaAttention):
        return SstaUSPAttention(groups, attention_fn, comm_dtype)
    unconfigured = attention_fn is sdpa_attention
    backend = None if unconfigured else getattr(attention_fn, "backend", None)
    return USPAttention(groups, backend=backend, comm_dtype=comm_dtype)
