"""SSTA against dense attention at the 720p token count, and SSTA's sparsity on the tiny model.

    python benchmarks/ssta_phase.py                      # on a CUDA GPU: 720p x 121 frames, 16 x 128, bf16
    python benchmarks/ssta_phase.py --cpu-smoke          # tiny sizes on the CPU (the code path only)
    python benchmarks/ssta_phase.py --sparsity 31 30 53  # the tiny model's attended share on a grid (CPU)

`ssta_phase(...)` is the function `benchmarks/gpu_check.py` calls as its SSTA phase: one attention
call (image queries over the grid's tiles, text in full) for each SSTA kernel that can run (the
portable gathered-tile kernel; the official flex-block-attn kernel when installed) and for the dense
kernel the `auto` backend picks, timed with CUDA events (best of `repeats` after a warm-up), with
peak memory and the attended share of key tiles on random q/k. Only torch is imported at module
level, so importing this file costs nothing; hvbatch is imported inside the functions.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from collections.abc import Callable, MutableMapping
from pathlib import Path
from typing import Any

import torch

GRID_720P = (31, 45, 80)
"""720p x 121 frames: (121 - 1) / 4 + 1 latent frames, 720 / 16 x 1280 / 16 (1.5's VAE, patch 1)."""
SMOKE_GRID = (5, 6, 9)


def _elapsed_ms(fn: Callable[[], object], device: str, repeats: int, budget_s: float) -> float:
    """Best milliseconds per call after one warm-up (CUDA events on a GPU, wall clock elsewhere)."""
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    start, best = time.monotonic(), math.inf
    for _ in range(repeats):
        if device == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            end.synchronize()
            best = min(best, begin.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            best = min(best, (time.perf_counter() - t0) * 1e3)
        if time.monotonic() - start > budget_s:
            break
    return best


def _peak_gib(device: str, fn: Callable[[], object]) -> float | None:
    if device != "cuda":
        fn()
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return round(torch.cuda.max_memory_allocated() / 2**30, 2)


def share_bounds(grid: tuple[int, int, int], params: Any = None) -> dict[str, Any]:
    """What the official parameters imply on `grid`: tiles, top-k, and the attended share's bounds
    (top-k alone .. top-k plus a window that overlaps none of them), in tiles and in token pairs."""
    from hvbatch.models.ssta import SstaParams

    plan = (params or SstaParams()).plan(grid)
    dense_pairs = plan.num_tokens**2
    tile_pairs = plan.tile_volume**2 * plan.num_tiles  # one selected key tile per query tile
    return {
        "grid": list(grid),
        "padded_grid": list(plan.padded),
        "tiles": plan.num_tiles,
        "tile": list(plan.tile),
        "topk": plan.topk,
        "tiles_per_query_min": plan.min_slots,
        "tiles_per_query_max": plan.max_slots,
        "tile_share_min": round(plan.min_slots / plan.num_tiles, 4),
        "tile_share_max": round(plan.max_slots / plan.num_tiles, 4),
        "image_pairs_vs_dense_min": round(plan.min_slots * tile_pairs / dense_pairs, 4),
        "image_pairs_vs_dense_max": round(plan.max_slots * tile_pairs / dense_pairs, 4),
    }


def ssta_phase(
    *,
    device: str = "cuda",
    dtype: torch.dtype = torch.bfloat16,
    grid: tuple[int, int, int] = GRID_720P,
    heads: int = 16,
    head_dim: int = 128,
    text_tokens: int = 256,
    params: Any = None,
    repeats: int = 3,
    budget_s: float = 60.0,
    seed: int = 0,
    into: MutableMapping[str, Any] | None = None,
) -> MutableMapping[str, Any]:
    """One SSTA attention call per available kernel vs one dense call (see the module docstring).

    `into`: where to write each figure as soon as it is measured (gpu_check's phase recorder, so a
    phase cut at its budget keeps what it finished); returned. None: a new dict."""
    from hvbatch.models.attention_backends import backend_for
    from hvbatch.models.ssta import SstaParams
    from hvbatch.models.ssta_attention import official_kernel_serves, ssta_full_grid

    params = params or SstaParams()
    plan = params.plan(grid)
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(length: int) -> torch.Tensor:
        return torch.randn(1, heads, length, head_dim, generator=g, device=device, dtype=dtype)

    q, k, v = (randn(plan.num_tokens) for _ in range(3))
    text = tuple(randn(text_tokens) for _ in range(3))
    backend = backend_for("auto", device, dtype, head_dim)
    joint = [torch.cat([x, t], dim=2) for x, t in zip((q, k, v), text, strict=True)]
    shares: list[torch.Tensor] = []
    record: MutableMapping[str, Any] = {} if into is None else into
    facts = {**share_bounds(grid, params), "heads": heads, "head_dim": head_dim, "text_tokens": text_tokens}
    facts |= {"dtype": str(dtype).removeprefix("torch."), "dense_backend": backend.name}
    for key, value in facts.items():
        record[key] = value
    per_kernel = budget_s / 3

    def dense() -> object:
        return backend.attention(*joint)

    record["dense_ms"] = round(_elapsed_ms(dense, device, repeats, per_kernel), 3)
    record["dense_peak_gib"] = _peak_gib(device, dense)
    kernels = ["portable"] + (["official"] if official_kernel_serves(q) else [])
    outputs = {}
    for kernel in kernels:

        def sparse(kernel: str = kernel) -> tuple[torch.Tensor, torch.Tensor | None]:
            return ssta_full_grid(
                plan, q, k, v, text, backend, kernel, lambda _p, s: shares.append(s.float().mean())
            )

        try:  # one kernel failing (the official one is unverified without a GPU) leaves the other
            ms = _elapsed_ms(sparse, device, repeats, per_kernel)
            record[kernel] = {
                "ms": round(ms, 3),
                "speedup_vs_dense": round(record["dense_ms"] / ms, 3),
                "peak_gib": _peak_gib(device, sparse),
            }
            outputs[kernel] = sparse()[0]
        except Exception as err:
            record[kernel] = f"error: {type(err).__name__}: {str(err)[:200]}"
    if shares:
        record["attended_tile_share"] = round(float(shares[-1]), 4)
    if "official" in outputs:  # the two kernels on the same selection
        diff = (outputs["official"].float() - outputs["portable"].float()).norm() / outputs[
            "portable"
        ].float().norm()
        record["official_vs_portable_rel_err"] = float(diff)
    return record


class _FirstSelection(Exception):
    pass


def tiny_model_sparsity(
    grid: tuple[int, int, int], *, seed: int = 0, params: Any = None, first_block_only: bool = False
) -> dict[str, Any]:
    """The attended share of key tiles, per block, of the tiny 1.5 model (random weights, CPU, float32)
    with SSTA on one text-to-video sample of `grid` latents. `first_block_only` stops at the first
    block's selection (it needs no attention computed: minutes less at 720p on a CPU)."""
    from hvbatch.models.attention_backends import AttentionBackend
    from hvbatch.models.hunyuan_video_15.conditioning import HunyuanVideo15Conditioning
    from hvbatch.models.hunyuan_video_15.config import HunyuanVideo15TransformerConfig
    from hvbatch.models.hunyuan_video_15.transformer_loading import random_transformer
    from hvbatch.models.ssta import SstaParams
    from hvbatch.models.ssta_attention import SstaAttention

    config = HunyuanVideo15TransformerConfig.tiny()
    model = random_transformer(config, seed=seed)
    attention = SstaAttention(params or SstaParams(), AttentionBackend("default"), kernel="portable")
    shares: list[float] = []

    def record(_plan: Any, selected: torch.Tensor) -> None:
        shares.append(float(selected.float().mean()))
        if first_block_only:
            raise _FirstSelection

    attention.on_selection = record
    model.attention_fn = attention
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(1, 32, config.text_dim, generator=g)
    cond = HunyuanVideo15Conditioning.from_masks(
        text, torch.ones(1, 32, dtype=torch.long), torch.zeros(1, 1, config.glyph_dim),
        torch.zeros(1, 1, dtype=torch.long), None, None,
    )  # fmt: skip
    x = torch.randn(1, config.out_channels, *grid, generator=g)
    start = time.monotonic()
    with torch.no_grad(), contextlib.suppress(_FirstSelection):
        model(x, torch.tensor([900.0]), cond)
    return {
        **share_bounds(grid, params),
        "model": "tiny-1.5 (random weights)",
        "attended_tile_share_per_block": [round(s, 4) for s in shares],
        "seconds": round(time.monotonic() - start, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU")
    parser.add_argument(
        "--sparsity", type=int, nargs=3, metavar=("T", "H", "W"), help="tiny-model share on a grid"
    )
    parser.add_argument(
        "--first-block-only", action="store_true", help="--sparsity: the first block's selection"
    )
    parser.add_argument("--budget-s", type=float, default=120.0)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    if args.sparsity:
        print(json.dumps(tiny_model_sparsity(tuple(args.sparsity), first_block_only=args.first_block_only)))
        return 0
    if args.cpu_smoke:
        from hvbatch.models.ssta import SstaParams

        smoke = SstaParams(tile=(2, 2, 4), window=(1, 3, 3), topk=4)
        record = ssta_phase(
            device="cpu", dtype=torch.float32, grid=SMOKE_GRID, heads=2, head_dim=16,
            text_tokens=8, params=smoke, repeats=1, budget_s=args.budget_s,
        )  # fmt: skip
    elif not torch.cuda.is_available():
        print(json.dumps({"phase": "ssta", "ok": False, "error": "no CUDA GPU: run with --cpu-smoke"}))
        return 2
    else:
        record = ssta_phase(budget_s=args.budget_s)
    print(json.dumps({"phase": "ssta", "ok": True, **record}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
