"""Ulysses x Ring (USP) attention with joint text tokens, behind the model's `attention_fn` seam.

Shape legend: B batch, L tokens, H heads, D head dim, u Ulysses degree, r ring degree,
P = u*r ranks of one sequence-parallel (SP) group, Ll = image tokens per rank, T text tokens.

Per call, each rank holds `[B, Ll + T, H, D]`: its shard of the image tokens (shard `sp_index`
of the padded sequence) followed by the valid text tokens, which every rank holds in full.

1. Ulysses: one `all_to_all_single` turns the image q, k, v from sequence-sharded/all heads
   into the u shards of this Ulysses group with H/u heads. The text q, k, v are not sent:
   each rank slices its own H/u heads from its replicated copy.
2. Ring: the image K/V block rotates through the r ring ranks with `batch_isend_irecv`; the
   next transfer is in flight while the current block is attended. Block results merge through
   their log-sum-exp in float32. The text K/V is attended once, as a block of its own, so every
   query sees every image key and every text key exactly once. Image padding (the sequence is
   padded to a multiple of P) is sliced off each K/V block before attention: it never changes a
   valid output, and no mask is built.
3. The image output goes back with the reverse all-to-all; the text output (the same on every
   ring rank, because its block results are merged in a fixed order) is all-gathered over heads.

With `comm_dtype="fp8"` the image q/k/v and output all-to-alls and the ring K/V transfers carry
float8 e4m3 values with one float32 scale per token and head (absmax / 448), packed into one uint8
message (gloo and NCCL both carry uint8; gloo refuses float8): D + 4 bytes per token and head instead
of 2 D (bf16) or 4 D (float32). A rank's own shard never goes through float8; the text all-gather and
the runner's final gather stay exact.

With ring degree 1 there is one image block: the text keys join the valid image keys in a single
plain attention call (no log-sum-exp, no merge). The kernel is the model's: `backend` (default:
what `model.attention=auto` picks for the device and dtype of the first call).

`comm_dtype="auto"` resolves per layout (`resolve_comm_dtype`): fp8 only where a Ulysses or ring
group crosses nodes. Inside a node (NVLink) packing and unpacking cost 2-3 GB of extra memory
traffic per block to save about 150 MB of link traffic; across nodes the link is 10x slower.

Transfers go through `hvbatch.parallel.transport` (host staging for gloo with CUDA tensors).
With `local_only` set (the compile warm-up) no collective runs: each rank attends its own tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F

from hvbatch.models.attention_backends import AttentionBackend, backend_for
from hvbatch.parallel.dims import ParallelDims, ParallelGroups
from hvbatch.parallel.transport import from_wire, to_wire

DEFAULT_BACKEND = AttentionBackend("default")
BlockFn = Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
COMM_DTYPES = ("none", "fp8")
COMM_DTYPE_CHOICES = ("auto", *COMM_DTYPES)
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max
SCALE_BYTES = 4  # one float32 scale per token and head


def pack_fp8(x_D: torch.Tensor) -> torch.Tensor:
    """`[..., D]` -> `[..., D + 4]` uint8: e4m3 values scaled by their row's absmax, then the scale."""
    x = x_D.float().contiguous()
    scale = (x.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp_min(torch.finfo(torch.float32).tiny)
    values = (x / scale).to(FP8_DTYPE).view(torch.uint8)
    return torch.cat([values, scale.view(torch.uint8)], dim=-1)


def unpack_fp8(packed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The inverse of `pack_fp8`: `[..., D + 4]` uint8 -> `[..., D]` in `dtype`."""
    values = packed[..., :-SCALE_BYTES].contiguous().view(FP8_DTYPE).float()
    scale = packed[..., -SCALE_BYTES:].contiguous().view(torch.float32)
    return (values * scale).to(dtype)


def crosses_nodes(ranks: list[int], gpus_per_node: int) -> bool:
    """Whether global ranks `ranks` sit on more than one node (`gpus_per_node` ranks per node, in order)."""
    return len({rank // max(1, gpus_per_node) for rank in ranks}) > 1


def resolve_comm_dtype(comm_dtype: str, dims: ParallelDims, gpus_per_node: int) -> str:
    """`parallel.comm_dtype` for a layout: `auto` is fp8 when a Ulysses or ring group (the compressed
    transfers) spans nodes, else none; `none` and `fp8` are kept."""
    if comm_dtype not in COMM_DTYPE_CHOICES:
        raise ValueError(f"parallel.comm_dtype={comm_dtype!r} is not one of {', '.join(COMM_DTYPE_CHOICES)}")
    if comm_dtype != "auto":
        return comm_dtype
    groups = [dims.ulysses_ranks(r) for r in range(dims.world_size)]
    groups += [dims.ring_ranks(r) for r in range(dims.world_size) if dims.ring > 1]
    return "fp8" if any(crosses_nodes(g, gpus_per_node) for g in groups) else "none"


def attention_with_lse(
    q_BHLD: torch.Tensor,
    k_BHLD: torch.Tensor,
    v_BHLD: torch.Tensor,
    backend: AttentionBackend = DEFAULT_BACKEND,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused attention returning `(out [B, H, L, D], logsumexp [B, H, L] float32)` via `backend`."""
    return backend.attention_with_lse(q_BHLD, k_BHLD, v_BHLD)


def merge_blocks(
    out: torch.Tensor | None, lse: torch.Tensor | None, block_out: torch.Tensor, block_lse: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Online-softmax merge of two partial attentions over disjoint keys, in float32."""
    if out is None or lse is None:
        return block_out.float(), block_lse
    out = out - torch.sigmoid(block_lse - lse)[..., None] * (out - block_out.float())
    lse = lse - F.logsigmoid(lse - block_lse)
    return out, lse


@dataclass
class CommStats:
    """Bytes this rank sent, by collective; for tests and the scaling benchmark."""

    bytes_sent: dict[str, int] = field(
        default_factory=lambda: {"ulysses": 0, "ring": 0, "text": 0, "gather": 0, "cfg": 0}
    )
    calls: int = 0

    def add(self, kind: str, num_bytes: float) -> None:
        self.bytes_sent[kind] += int(num_bytes)


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


class USPAttention:
    """The sequence-parallel `AttentionFn`; `set_sequence` tells it the current token layout."""

    def __init__(
        self, groups: ParallelGroups, backend: AttentionBackend | None = None, comm_dtype: str = "none"
    ) -> None:
        if comm_dtype not in COMM_DTYPES:
            raise ValueError(f"parallel.comm_dtype={comm_dtype!r} is not one of {', '.join(COMM_DTYPES)}")
        self.groups = groups
        self.backend = backend
        self.compress = comm_dtype == "fp8"
        self.stats = CommStats()
        self.num_image_tokens = 0
        self.shard_len = 0
        self.local_only = False
        """Attend this rank's own tokens only, with no collective (the compile warm-up)."""

    def _backend(self, q: torch.Tensor) -> AttentionBackend:
        if self.backend is None:
            self.backend = backend_for("auto", q.device, q.dtype, q.shape[-1])
        return self.backend

    def set_sequence(self, num_image_tokens: int, shard_len: int) -> None:
        """Valid image tokens of the whole video, and image tokens per rank (padded)."""
        self.num_image_tokens, self.shard_len = num_image_tokens, shard_len

    def _all_to_all(self, x: torch.Tensor, kind: str) -> torch.Tensor:
        """Exchange the leading dim (size u) across the Ulysses group (last dim: head dim)."""
        u = self.groups.dims.ulysses
        if u == 1:
            return x
        send = to_wire(pack_fp8(x) if self.compress else x.contiguous(), self.groups.ulysses)
        received = torch.empty_like(send)
        dist.all_to_all_single(received, send, group=self.groups.ulysses)
        self.stats.add(kind, _nbytes(send) * (u - 1) / u)
        received = from_wire(received, x.device)
        if not self.compress:
            return received
        out = unpack_fp8(received, x.dtype)
        mine = self.groups.ulysses_ranks.index(self.groups.rank)
        out[mine] = x[mine]  # this rank's own slice never left it: keep it exact
        return out

    def _seq_to_heads(self, qkv_3BLHD: torch.Tensor) -> torch.Tensor:
        """`[3, B, Ll, H, D]` -> `[3, B, u*Ll, H/u, D]` (this group's shards, this rank's heads)."""
        u = self.groups.dims.ulysses
        three, batch, shard, heads, dim = qkv_3BLHD.shape
        x = qkv_3BLHD.reshape(three, batch, shard, u, heads // u, dim).permute(3, 0, 1, 2, 4, 5)
        x = self._all_to_all(x, "ulysses")  # [u (source shard), 3, B, Ll, H/u, D]
        return x.permute(1, 2, 0, 3, 4, 5).reshape(three, batch, u * shard, heads // u, dim)

    def _heads_to_seq(self, out_BLHD: torch.Tensor) -> torch.Tensor:
        """`[B, u*Ll, H/u, D]` -> `[B, Ll, H, D]`."""
        u = self.groups.dims.ulysses
        batch, length, heads_local, dim = out_BLHD.shape
        x = out_BLHD.reshape(batch, u, length // u, heads_local, dim).permute(1, 0, 2, 3, 4)
        x = self._all_to_all(x, "ulysses")  # [u (source head group), B, Ll, H/u, D]
        return x.permute(1, 2, 0, 3, 4).reshape(batch, length // u, u * heads_local, dim)

    def _valid_in_block(self, ring_index: int) -> int:
        """Valid (non-padding) keys in the image block owned by ring rank `ring_index`."""
        block = self.groups.dims.ulysses * self.shard_len
        return max(0, min(block, self.num_image_tokens - ring_index * block))

    def _ring(
        self,
        q_BHLD: torch.Tensor,
        kv_2BHLD: torch.Tensor,
        text_kv: tuple[torch.Tensor, torch.Tensor] | None,
        block_fn: BlockFn | None = None,
    ) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
        """Attend q to every ring block and to the text block once: `(block id, out, lse)` per block.

        `block_fn(owner, k_b, v_b)` replaces the dense call on an image block (a grid-aware kernel:
        SSTA); it gets the owner's ring index and its valid keys."""
        r, my_index = self.groups.dims.ring, self.groups.ring_ranks.index(self.groups.rank)
        parts: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        if text_kv is not None:
            out_t, lse_t = attention_with_lse(q_BHLD, *text_kv, self._backend(q_BHLD))
            parts.append((-1, out_t, lse_t))  # the text block sorts first
        # With fp8 the packed block rotates as it is (quantized once, by its owner).
        current = pack_fp8(kv_2BHLD) if self.compress else kv_2BHLD.contiguous()
        wire = to_wire(current, self.groups.ring)  # what travels (host memory for gloo on a GPU)
        for step in range(r):
            pending, incoming = None, None
            if step + 1 < r:
                incoming = torch.empty_like(wire)
                nxt = self.groups.ring_ranks[(my_index + 1) % r]
                prv = self.groups.ring_ranks[(my_index - 1) % r]
                pending = dist.batch_isend_irecv(
                    [
                        dist.P2POp(dist.isend, wire, nxt, self.groups.ring),
                        dist.P2POp(dist.irecv, incoming, prv, self.groups.ring),
                    ]
                )
                self.stats.add("ring", _nbytes(wire))
            owner = (my_index - step) % r
            valid = self._valid_in_block(owner)
            if valid > 0:
                kv_b = current[:, :, :, :valid]
                if self.compress:  # this rank's own block stays exact
                    kv_b = kv_2BHLD[:, :, :, :valid] if step == 0 else unpack_fp8(kv_b, kv_2BHLD.dtype)
                k_b, v_b = kv_b[0], kv_b[1]
                if block_fn is None:
                    out_b, lse_b = attention_with_lse(q_BHLD, k_b, v_b, self._backend(q_BHLD))
                else:
                    out_b, lse_b = block_fn(owner, k_b, v_b)
                parts.append((owner, out_b, lse_b))
            if pending is not None:
                for request in pending:
                    request.wait()
                assert incoming is not None
                wire, current = incoming, from_wire(incoming, kv_2BHLD.device)
        return parts

    # Inside compiled blocks (model.compile) the collectives run eagerly: dynamo stops here.
    @torch.compiler.disable
    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, num_text_tokens: int = 0
    ) -> torch.Tensor:
        dims, shard = self.groups.dims, q.shape[1] - num_text_tokens
        assert shard == self.shard_len, f"image shard {shard} != {self.shard_len} set by the runner"
        if self.local_only:
            q_BHLD, k_BHLD, v_BHLD = (t.transpose(1, 2) for t in (q, k, v))
            return self._backend(q_BHLD).attention(q_BHLD, k_BHLD, v_BHLD).transpose(1, 2)
        u, heads = dims.ulysses, q.shape[2]
        heads_local = heads // u
        first_head = self.groups.ulysses_ranks.index(self.groups.rank) * heads_local
        head_slice = slice(first_head, first_head + heads_local)
        qkv_img = self._seq_to_heads(torch.stack([q[:, :shard], k[:, :shard], v[:, :shard]]))
        q_all = torch.cat([qkv_img[0], q[:, shard:, head_slice]], dim=1).transpose(1, 2)
        kv_img = qkv_img[1:].transpose(2, 3)  # [2, B, H/u, u*Ll, D]
        text_kv = None
        if num_text_tokens:
            text_kv = (k[:, shard:, head_slice].transpose(1, 2), v[:, shard:, head_slice].transpose(1, 2))
        img_len = u * shard
        if dims.ring == 1:
            return self._joint_call(q_all, kv_img, text_kv, img_len, q.dtype)
        parts = self._ring(q_all, kv_img, text_kv)
        out, lse = None, None
        for _, out_b, lse_b in parts:  # image queries: any order
            out, lse = merge_blocks(out, lse, out_b[:, :, :img_len], lse_b[:, :, :img_len])
        assert out is not None
        img_out = self._heads_to_seq(out.to(q.dtype).transpose(1, 2))
        if not num_text_tokens:
            return img_out
        txt, txt_lse = None, None
        for _, out_b, lse_b in sorted(parts, key=lambda part: part[0]):  # fixed order: same bits on all ranks
            txt, txt_lse = merge_blocks(txt, txt_lse, out_b[:, :, img_len:], lse_b[:, :, img_len:])
        assert txt is not None
        return torch.cat([img_out, self._gather_heads(txt.to(q.dtype).transpose(1, 2))], dim=1)

    def _joint_call(
        self,
        q_BHLD: torch.Tensor,
        kv_2BHLD: torch.Tensor,
        text_kv: tuple[torch.Tensor, torch.Tensor] | None,
        img_len: int,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        """Ring degree 1: valid image keys and text keys in one call, no log-sum-exp merge."""
        valid = self._valid_in_block(0)
        k_BHSD, v_BHSD = kv_2BHLD[0][:, :, :valid], kv_2BHLD[1][:, :, :valid]
        if text_kv is not None:
            k_BHSD = torch.cat([k_BHSD, text_kv[0]], dim=2)
            v_BHSD = torch.cat([v_BHSD, text_kv[1]], dim=2)
        out_BLHD = self._backend(q_BHLD).attention(q_BHLD, k_BHSD, v_BHSD).to(dtype).transpose(1, 2)
        img_out = self._heads_to_seq(out_BLHD[:, :img_len])
        if text_kv is None:
            return img_out
        return torch.cat([img_out, self._gather_heads(out_BLHD[:, img_len:])], dim=1)

    def _gather_heads(self, txt_BTHD: torch.Tensor) -> torch.Tensor:
        """`[B, T, H/u, D]` from each Ulysses rank -> `[B, T, H, D]` on all of them."""
        u = self.groups.dims.ulysses
        if u == 1:
            return txt_BTHD
        wire = to_wire(txt_BTHD.contiguous(), self.groups.ulysses)
        chunks = [torch.empty_like(wire) for _ in range(u)]
        dist.all_gather(chunks, wire, group=self.groups.ulysses)
        self.stats.add("text", _nbytes(wire) * (u - 1))
        return from_wire(torch.cat(chunks, dim=2), txt_BTHD.device)
