"""SSTA as a model's `attention_fn` (the sparse 1.5 checkpoints'), and the rule that picks dense or
SSTA per checkpoint.

Shape legend: B batch, H heads, D head dim, L image tokens (the grid, (t, h, w) order), T text
tokens, N tiles, V tokens per tile.

`SstaAttention` is an `AttentionFn` that also needs the image-token grid: whoever runs the model
calls `set_grid(grid)` before the blocks (the model's `forward` does, through
`hvbatch.models.attention.set_token_grid`; the sequence-parallel runner does for its own attention).

Kernels for the image x image part (`kernel`):
- `portable`: `sparse_tile_attention` (gathered tiles, any device, float32 on a CPU);
- `official`: the `flex-block-attn` package's kernel (`pip install flex-block-attn`: Hopper, bf16,
  head dim 128), called on the official tile layout and block mask as the official code does;
  its log-sum-exp is read as the CUDA source writes it (`-sqrt(128) * natural lse`; not verified
  here: no GPU). Optional: `auto` uses it when it imports and serves the call, else `portable`.
Text keys and text queries are dense calls of the model's attention backend, merged by log-sum-exp.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import torch

from hvbatch.models.attention import LocalAttention
from hvbatch.models.attention_backends import AttentionBackend
from hvbatch.models.ssta import (
    SstaParams,
    TilePlan,
    add_zero_keys,
    merge_partial,
    select_tiles,
    sparse_tile_attention,
    tile_means,
)

ATTENTION_MODES = ("auto", "dense", "ssta")
"""`model.attention_mode`: auto (SSTA when the checkpoint asks for it), dense, ssta (forced)."""
KERNELS = ("auto", "official", "portable")
OFFICIAL_HEAD_DIM = 128
SelectionHook = Callable[[TilePlan, torch.Tensor], None]


@functools.cache
def official_kernel() -> Callable[..., Any] | None:
    """`flex_block_attn._flex_block_attn_forward` (returns the output and the LSE) when installed."""
    try:
        from flex_block_attn import _flex_block_attn_forward  # type: ignore[import-not-found]
    except Exception:
        return None
    return _flex_block_attn_forward


def official_kernel_serves(q_BHLD: torch.Tensor) -> bool:
    """The official kernel's own limits: a Hopper GPU, bf16, head dim 128."""
    if official_kernel() is None or q_BHLD.device.type != "cuda":
        return False
    capability = torch.cuda.get_device_capability(q_BHLD.device)
    return capability[0] == 9 and q_BHLD.dtype == torch.bfloat16 and q_BHLD.shape[-1] == OFFICIAL_HEAD_DIM


def _official_tiles(
    plan: TilePlan,
    q_BHNVD: torch.Tensor,
    k_BHNVD: torch.Tensor,
    v_BHNVD: torch.Tensor,
    selected: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    kernel = official_kernel()
    assert kernel is not None
    batch, heads, num_tiles, volume, dim = q_BHNVD.shape
    flat = [
        x.reshape(batch, heads, num_tiles * volume, dim).contiguous() for x in (q_BHNVD, k_BHNVD, v_BHNVD)
    ]
    mask = selected.contiguous()
    out, lse_scaled = kernel(*flat, volume, volume, mask, mask, False)
    lse = lse_scaled[..., 0] / -math.sqrt(dim)
    return out.reshape(q_BHNVD.shape).float(), lse.reshape(batch, heads, num_tiles, volume)


def ssta_full_grid(
    plan: TilePlan,
    q_BHLD: torch.Tensor,
    k_BHLD: torch.Tensor,
    v_BHLD: torch.Tensor,
    text_qkv: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
    backend: AttentionBackend,
    kernel: str = "auto",
    on_selection: SelectionHook | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """SSTA over all L image tokens of the grid (these heads), text `[B, H, T, D]` in full.

    Returns `(image out [B, H, L, D], text out [B, H, T, D] or None)` in the input dtype.
    """
    dtype = q_BHLD.dtype
    q_t, k_t, v_t = (plan.to_tiles(x) for x in (q_BHLD, k_BHLD, v_BHLD))
    q_mean = tile_means(plan, q_t.sum(3, dtype=torch.float64), dtype)
    k_mean = tile_means(plan, k_t.sum(3, dtype=torch.float64), dtype)
    selected = select_tiles(plan, q_mean, k_mean)
    if on_selection is not None:
        on_selection(plan, selected)
    use_official = kernel == "official" or (kernel == "auto" and official_kernel_serves(q_BHLD))
    if use_official:
        out_t, lse_t = _official_tiles(plan, q_t, k_t, v_t, selected)
    else:
        out_t, lse_t = sparse_tile_attention(
            q_t, k_t, v_t, selected, backend, max_slots=plan.max_slots, min_slots=plan.min_slots
        )
    out = plan.from_tiles(out_t)
    if text_qkv is None:
        return out.to(dtype), None
    lse = plan.from_tiles(lse_t[..., None])[..., 0]
    q_txt, k_txt, v_txt = text_qkv
    part_out, part_lse = backend.attention_with_lse(q_BHLD, k_txt, v_txt)
    out, _ = merge_partial(out, lse, part_out, part_lse)
    keys, values = torch.cat([k_BHLD, k_txt], dim=2), torch.cat([v_BHLD, v_txt], dim=2)
    if not plan.num_pad_tokens:
        return out.to(dtype), backend.attention(q_txt, keys, values)
    txt_out, txt_lse = backend.attention_with_lse(q_txt, keys, values)
    pads = torch.full_like(txt_lse, float(plan.num_pad_tokens))
    txt_out, _ = add_zero_keys(txt_out.float(), txt_lse, pads)  # text queries see every padded tile too
    return out.to(dtype), txt_out.to(dtype)


class SstaAttention:
    """The single-device SSTA `AttentionFn` (scale 1/sqrt(D)); `set_grid` gives it the token grid."""

    def __init__(self, params: SstaParams, backend: AttentionBackend, kernel: str = "auto") -> None:
        if kernel not in KERNELS:
            raise ValueError(f"SSTA kernel {kernel!r} is not one of {', '.join(KERNELS)}")
        if kernel == "official" and official_kernel() is None:
            raise ValueError(
                "SSTA kernel 'official' needs the flex-block-attn package: pip install flex-block-attn"
            )
        self.params = params
        self.backend = backend
        self.kernel = kernel
        self.grid: tuple[int, int, int] | None = None
        self.on_selection: SelectionHook | None = None
        """Called with each call's plan and `[B, H, N, N]` selection (sparsity measurements)."""

    def __repr__(self) -> str:
        return f"SstaAttention({self.params}, {self.backend.name!r}, kernel={self.kernel!r})"

    def set_grid(self, grid: tuple[int, int, int]) -> None:
        self.grid = (int(grid[0]), int(grid[1]), int(grid[2]))

    def plan(self, num_image_tokens: int) -> TilePlan:
        assert self.grid is not None, "SSTA needs the token grid: the model's forward (or runner) sets it"
        plan = self.params.plan(self.grid)
        assert plan.num_tokens == num_image_tokens, f"grid {self.grid} != {num_image_tokens} image tokens"
        return plan

    # Inside compiled blocks (model.compile) the data-dependent selection runs eagerly: dynamo stops here.
    @torch.compiler.disable
    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, num_text_tokens: int = 0
    ) -> torch.Tensor:
        num_image = q.shape[1] - num_text_tokens
        q_BHLD, k_BHLD, v_BHLD = (x.transpose(1, 2) for x in (q, k, v))
        text = None
        if num_text_tokens:
            text = (q_BHLD[:, :, num_image:], k_BHLD[:, :, num_image:], v_BHLD[:, :, num_image:])
        img_out, txt_out = ssta_full_grid(
            self.plan(num_image),
            q_BHLD[:, :, :num_image],
            k_BHLD[:, :, :num_image],
            v_BHLD[:, :, :num_image],
            text,
            self.backend,
            self.kernel,
            self.on_selection,
        )
        out = img_out if txt_out is None else torch.cat([img_out, txt_out], dim=2)
        return out.transpose(1, 2)


def resolve_attention_mode(requested: str, facts: Any | None) -> SstaParams | None:
    """`model.attention_mode` for a checkpoint with `facts` (its loader's facts: `sparse_attention`,
    `version`, `attn_param`; None for random weights): SSTA parameters, or None for dense attention."""
    if requested not in ATTENTION_MODES:
        raise ValueError(f"model.attention_mode={requested!r} is not one of {', '.join(ATTENTION_MODES)}")
    sparse = bool(getattr(facts, "sparse_attention", False))
    if requested == "dense" or (requested == "auto" and not sparse):
        return None
    origin = f"the {getattr(facts, 'version', None) or 'transformer'} checkpoint's config.json"
    return SstaParams.from_official(getattr(facts, "attn_param", None), origin)


def configure_attention(model: Any, requested: str, backend: AttentionBackend, kernel: str = "auto") -> str:
    """Give a model (with `checkpoint_facts` when loaded from files) the attention
    `model.attention_mode` asks for; returns it in words."""
    params = resolve_attention_mode(requested, getattr(model, "checkpoint_facts", None))
    if params is None:
        model.attention_fn = LocalAttention(backend)
        return "dense"
    model.attention_fn = SstaAttention(params, backend, kernel)
    return f"ssta (tile {params.tile}, window {params.window}, top-k {params.topk})"
