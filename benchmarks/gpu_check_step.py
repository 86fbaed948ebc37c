"""The transformer-step, comm-dtype and VAE phases of `gpu_check.py` (one process per phase).

A step is timed at reduced depth with every block timed on its own (CUDA events around each block,
outside any compiled region), and extrapolated to the full 20 + 40 blocks as
`rest + 20 x mean(double block) + 40 x mean(single block)`, where `rest` is the forward minus its
blocks. Every term is a measured duration (never a difference of two noisy totals), so the
estimate cannot go negative.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from gpu_check_phases import (
    FULL_DEPTH,
    INFINIBAND_GBPS,
    NVLINK_GBPS,
    Context,
    Recorder,
    build_transformer,
    default_dtype,
    peak_gib,
    reset_peak,
    step_inputs,
    synchronize,
    timed,
)
from torch import nn

from hvbatch.models.attention import LocalAttention
from hvbatch.models.attention_backends import AttentionBackend, auto_choice, device_info
from hvbatch.models.fp8 import quantize_model_fp8
from hvbatch.models.runtime import compile_blocks
from hvbatch.models.vae import AutoencoderKLCausal3D
from hvbatch.parallel.attention import pack_fp8, unpack_fp8
from hvbatch.sampling.sizes import latent_shape


class BlockTimer(nn.Module):
    """Times each call of the block it wraps (CUDA events on a GPU, the wall clock on a CPU)."""

    def __init__(self, inner: nn.Module, kind: str, laps: list[tuple[str, Any, Any]]) -> None:
        super().__init__()
        self.inner, self.kind, self.laps = inner, kind, laps

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if torch.cuda.is_available() and next(self.inner.parameters()).is_cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = self.inner(*args, **kwargs)
            end.record()
        else:
            start = time.perf_counter()
            out = self.inner(*args, **kwargs)
            end = time.perf_counter()
        self.laps.append((self.kind, start, end))
        return out


def lap_seconds(start: Any, end: Any) -> float:
    """Seconds of one `BlockTimer` lap (CUDA events or wall-clock floats)."""
    return end - start if isinstance(start, float) else start.elapsed_time(end) / 1e3


def _time_blocks(model: nn.Module, laps: list[tuple[str, Any, Any]]) -> None:
    for blocks, kind in ((model.double_blocks, "double"), (model.single_blocks, "single")):
        for i, block in enumerate(blocks):
            blocks[i] = BlockTimer(block, kind, laps)


def step_flops(model: nn.Module, image: int, text: int, double: int, single: int) -> float:
    """Matmul FLOPs of one forward: each stream's linears on its own tokens, attention on all."""
    config = model.config
    d, mlp = config.hidden_size, int(config.hidden_size * config.mlp_ratio)
    per_token_double = 2 * (3 * d * d + d * d + 2 * d * mlp)  # qkv, proj, fc1, fc2 of one stream
    per_token_single = 2 * (d * (3 * d + mlp) + (d + mlp) * d)  # linear1, linear2
    tokens = image + text
    attention = 4.0 * tokens**2 * d
    return double * (tokens * per_token_double + attention) + single * (tokens * per_token_single + attention)


def _variant(ctx: Context, name: str, backend: str, video: tuple[int, int, int]) -> dict[str, Any]:
    """One step of `video` with variant `name` (eager, compiled or fp8), per block, extrapolated."""
    s = ctx.sizes
    args, kwargs = step_inputs(s, video)
    reset_peak(s.device)
    model = build_transformer(s, *s.depth)
    info = device_info(s.device)
    attention = AttentionBackend(backend, info)
    model.attention_fn = LocalAttention(attention)
    if name == "fp8":
        with torch.no_grad():
            reference = model(*args, **kwargs).float()
        quantize_model_fp8(model)
    if name == "compiled":
        compile_blocks(model, backend=s.compile_backend)
    laps: list[tuple[str, Any, Any]] = []
    _time_blocks(model, laps)
    with torch.no_grad():
        t0 = time.perf_counter()
        out = model(*args, **kwargs)
        synchronize(s.device)
        first_call_s = time.perf_counter() - t0
        best: tuple[float, dict[str, list[float]]] | None = None
        for _ in range(s.repeats):
            laps.clear()
            t0 = time.perf_counter()
            model(*args, **kwargs)
            synchronize(s.device)
            total = time.perf_counter() - t0
            per_kind: dict[str, list[float]] = {"double": [], "single": []}
            for kind, start, end in laps:
                per_kind[kind].append(lap_seconds(start, end))
            if best is None or total < best[0]:
                best = (total, per_kind)
    assert best is not None
    total, per_kind = best
    double = sum(per_kind["double"]) / len(per_kind["double"])
    single = sum(per_kind["single"]) / len(per_kind["single"])
    rest = max(0.0, total - sum(per_kind["double"]) - sum(per_kind["single"]))
    full = rest + FULL_DEPTH[0] * double + FULL_DEPTH[1] * single
    _, t, h, w = latent_shape(*video)
    image = t * (h // 2) * (w // 2)
    result = {
        "backend": backend,
        "first_call_s": round(first_call_s, 2),
        "ms_double_block": round(double * 1e3, 2),
        "ms_single_block": round(single * 1e3, 2),
        "ms_rest": round(rest * 1e3, 2),
        "s_per_step_20+40": round(full, 3),
        "tflops_20+40": round(step_flops(model, image, s.text_tokens, *FULL_DEPTH) / full / 1e12, 1),
        "peak_gib": peak_gib(s.device),
    }
    if name == "fp8":
        result["rel_err_vs_bf16"] = float((out.float() - reference).norm() / reference.norm())
    if attention.fallbacks:
        result["fallbacks"] = dict(attention.fallbacks)
    return result


def _best_backend(ctx: Context) -> str:
    s = ctx.sizes
    measured = ctx.results.get("attention_tflops", {}).get("best")
    return measured or auto_choice(device_info(s.device), s.dtype, s.head_dim)


def _run_variants(ctx: Context, rec: Recorder, variants: list[tuple[str, str, str]]) -> None:
    """`(video label, variant, backend)` in order, each recorded as soon as it is measured."""
    for label, name, backend in variants:
        key = f"{label}/{name}"
        if ctx.left() < 10:
            rec[key] = "skipped: phase budget"
            continue
        try:
            rec[key] = _variant(ctx, name, backend, ctx.sizes.videos[label])
        except Exception as err:
            rec[key] = f"error: {type(err).__name__}: {str(err)[:200]}"
        if ctx.sizes.device == "cuda":
            torch.cuda.empty_cache()


def phase_step_eager(ctx: Context, rec: Recorder) -> None:
    labels = list(ctx.sizes.videos)
    best = _best_backend(ctx)
    rec["best_backend"] = best
    variants = [(labels[0], "default", "default"), (labels[0], "best", best)]
    _run_variants(ctx, rec, [*variants, *((label, "best", best) for label in labels[1:])])


def phase_step_compiled(ctx: Context, rec: Recorder) -> None:
    """Compiled blocks (inductor on a GPU). A compile that overruns the phase budget is abandoned by
    the parent (the whole process is killed); what finished before stays recorded."""
    best = _best_backend(ctx)
    labels = list(ctx.sizes.videos)[: ctx.sizes.compiled_videos]
    _run_variants(ctx, rec, [(label, "compiled", best) for label in labels])


def phase_step_fp8(ctx: Context, rec: Recorder) -> None:
    best = _best_backend(ctx)
    _run_variants(ctx, rec, [(label, "fp8", best) for label in ctx.sizes.videos])


def phase_comm_dtype(ctx: Context, rec: Recorder) -> None:
    """The cost of `parallel.comm_dtype=fp8` on this GPU against what it saves on a link: one block's
    Ulysses q/k/v transfer at ulysses 8 (720p), packed and unpacked, against the bytes saved."""
    s = ctx.sizes
    tokens = s.tokens // 8
    x = torch.randn(3, 1, tokens, s.heads, s.head_dim, device=s.device, dtype=s.dtype)
    seconds = timed(lambda: unpack_fp8(pack_fp8(x), x.dtype), s.device, s.repeats + 1, min(20, ctx.left()))
    saved = x.numel() * x.element_size() - pack_fp8(x).numel()
    rec["tokens_per_rank"] = tokens
    rec["pack_unpack_ms"] = round(seconds * 1e3, 3)
    rec["bytes_saved_mb"] = round(saved / 1e6, 1)
    rec["nvlink_ms_saved"] = round(saved / (NVLINK_GBPS * 1e9) * 1e3, 3)
    rec["infiniband_ms_saved"] = round(saved / (INFINIBAND_GBPS * 1e9) * 1e3, 3)
    rec["assumed_gbps"] = {"nvlink": NVLINK_GBPS, "infiniband": INFINIBAND_GBPS}


def phase_vae_tile(ctx: Context, rec: Recorder) -> None:
    s = ctx.sizes
    dtype = torch.float16 if s.device == "cuda" else torch.float32
    reset_peak(s.device)
    with torch.device(s.device), default_dtype(dtype):
        vae = AutoencoderKLCausal3D(s.vae).eval().requires_grad_(False)
    size, frames = s.vae_tile
    z = torch.randn(1, s.vae.latent_channels, frames, size, size, device=s.device, dtype=dtype)
    with torch.no_grad():
        seconds = timed(lambda: vae.decode(z), s.device, repeats=2, budget_s=min(60, ctx.left()))
    rec["tile_latent"] = [frames, size, size]
    rec["dtype"] = str(dtype)
    rec["s"] = round(seconds, 3)
    rec["peak_gib"] = peak_gib(s.device)
