"""One-GPU check of the CUDA path, in at most 8 minutes: one JSON line per phase on stdout.

    python benchmarks/gpu_check.py                 # on a CUDA GPU (H100/H200/A100/L40...)
    python benchmarks/gpu_check.py --cpu-smoke     # tiny sizes on the CPU: every phase's code path
    python benchmarks/gpu_check.py --phases versions attention_tflops

Phases (each with its own try/except and time budget; a phase that fails or runs out of time
reports `"ok": false` and the next one runs):
- `versions`: torch, CUDA, cuDNN, NCCL, GPU, installed external attention kernels;
- `dispatch`: SDPA's priority order and the aten kernel each production call site runs
  (model blocks, token refiner, sequence-parallel LSE blocks, the ring-1 joint call);
- `attention_tflops`: TFLOP/s per backend at 119,056 tokens, 24 heads x 128, bf16;
- `attention_lse`: `attention_with_lse` per backend against a float32 reference (output and
  LSE), and 2/4/8 key blocks plus a text block merged with `merge_blocks` against one call;
- `sp_transformer`: the sequence-parallel transformer (NCCL, world size 1) against the plain one;
- `transformer_step`: one step at 720p and 544p (129 frames), full width, depths 2+4 and 4+8
  extrapolated linearly to 20+40 blocks, for the default backend, the best one, compiled, and
  FP8; peak memory per variant (reset between them); weights built directly in bf16 on the GPU;
- `vae_tile`: one VAE decode tile at the official tile size (32x32 latent cells, 16 latent frames).

`--cpu-smoke` runs the same code on the tiny model (float32, `aot_eager` for the compiled
variant so that it takes seconds); tests/test_gpu_check.py runs it in CI. Its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import platform
import socket
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hvbatch.config import transformer_preset
from hvbatch.models.attention import LocalAttention
from hvbatch.models.attention_backends import (
    AttentionBackend,
    auto_choice,
    device_info,
    installed_kernels,
    math_with_lse,
)
from hvbatch.models.family import get_family
from hvbatch.models.fp8 import quantize_model_fp8
from hvbatch.models.hunyuan_video.conditioning import TextConditioning
from hvbatch.models.hunyuan_video.config import TransformerConfig
from hvbatch.models.hunyuan_video.transformer import HunyuanVideoTransformer
from hvbatch.models.hunyuan_video.vae import AutoencoderKLCausal3D, VaeConfig
from hvbatch.models.runtime import compile_blocks
from hvbatch.parallel.attention import merge_blocks

latent_shape = get_family("hunyuan-video-1.0").geometry.latent_shape

FULL_DEPTH = (20, 40)
SDPA_OPS = (
    "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_attention_math",
)


@dataclass
class Sizes:
    """Full sizes on a GPU; tiny ones for `--cpu-smoke`."""

    device: str
    dtype: torch.dtype
    tokens: int
    heads: int
    head_dim: int
    lse_tokens: int
    text_tokens: int
    videos: dict[str, tuple[int, int, int]]
    depths: tuple[tuple[int, int], tuple[int, int]]
    transformer: TransformerConfig
    vae: VaeConfig
    vae_tile: tuple[int, int]
    compile_backend: str = "inductor"
    repeats: int = 2
    """Timed calls after the warm-up (the best one counts)."""

    @classmethod
    def full(cls) -> Sizes:
        config = transformer_preset("hunyuan-video-t2v-720p")
        return cls(
            "cuda", torch.bfloat16, 119_056, 24, 128, 4096, 256,
            {"720p": (720, 1280, 129), "544p": (544, 960, 129)},
            ((2, 4), (4, 8)), config, VaeConfig(), (32, 16),
        )  # fmt: skip

    @classmethod
    def smoke(cls) -> Sizes:
        config = transformer_preset("tiny")
        tiny_vae = VaeConfig(block_out_channels=(8, 16, 32, 32), layers_per_block=1, norm_num_groups=4)
        return cls(
            "cpu", torch.float32, 96, 2, 16, 40, 8,
            {"64p": (64, 64, 5), "48p": (48, 64, 5)},
            ((1, 2), (2, 4)), config, tiny_vae, (4, 2), "aot_eager", 1,
        )  # fmt: skip


@dataclass
class Context:
    sizes: Sizes
    deadline: float
    results: dict[str, dict[str, Any]] = field(default_factory=dict)

    def left(self) -> float:
        return self.deadline - time.monotonic()


class OutOfTime(RuntimeError):
    pass


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: str, repeats: int = 3, budget_s: float = 60.0) -> float:
    """Best seconds per call after one warm-up; fewer repeats when the budget is short."""
    start = time.monotonic()
    fn()
    synchronize(device)
    best = math.inf
    for _ in range(repeats):
        if time.monotonic() - start > budget_s and best < math.inf:
            break
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return best


def ops_run(fn: Callable[[], object]) -> list[str]:
    """The SDPA aten kernels `fn` dispatches to (profiler op names, in call order, deduplicated)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    seen: list[str] = []
    for event in prof.events():
        name = event.name.removeprefix("aten::")
        if name in SDPA_OPS and name not in seen:
            seen.append(name)
    return seen


def qkv(sizes: Sizes, q_len: int, k_len: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator(device=sizes.device).manual_seed(seed)
    shapes = ((1, sizes.heads, q_len, sizes.head_dim), (1, sizes.heads, k_len, sizes.head_dim))
    q = torch.randn(shapes[0], generator=g, device=sizes.device, dtype=sizes.dtype)
    k, v = (torch.randn(shapes[1], generator=g, device=sizes.device, dtype=sizes.dtype) for _ in range(2))
    return q, k, v


def _nccl_version() -> str:
    version = torch.cuda.nccl.version()
    return ".".join(map(str, version)) if isinstance(version, tuple) else str(version)


def phase_versions(ctx: Context) -> dict[str, Any]:
    cuda = torch.cuda.is_available()
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "nccl": _nccl_version() if cuda else None,
        "gpu": torch.cuda.get_device_name() if cuda else None,
        "capability": list(torch.cuda.get_device_capability()) if cuda else None,
        "external_kernels": sorted(installed_kernels()),
    }


def phase_dispatch(ctx: Context) -> dict[str, Any]:
    s = ctx.sizes
    order = [str(torch.nn.attention.SDPBackend(i)).split(".")[-1] for i in torch._C._get_sdp_priority_order()]
    info = device_info(s.device)
    auto = AttentionBackend(auto_choice(info, s.dtype, s.head_dim), info)
    q, k, v = qkv(s, 512 if s.device == "cuda" else 32, 512 if s.device == "cuda" else 32)
    q_BLHD, k_BLHD, v_BLHD = (t.transpose(1, 2) for t in (q, k, v))
    sites = {
        "blocks (model.attention=auto)": lambda: LocalAttention(auto)(q_BLHD, k_BLHD, v_BLHD),
        "token refiner (SDPA default)": lambda: AttentionBackend("default").attention(q, k, v),
        "sequence parallel, ring > 1 (LSE)": lambda: auto.attention_with_lse(q, k, v),
        "sequence parallel, ring 1 (joint call)": lambda: auto.attention(q, k, v),
    }
    return {
        "sdpa_priority": order,
        "auto_backend": auto.name,
        "call_sites": {site: ops_run(fn) or [f"external {auto.name}"] for site, fn in sites.items()},
    }


def attention_backends(with_math: bool) -> list[str]:
    names = ["default", "cudnn", "flash", "efficient", *sorted(installed_kernels())]
    return [*names, "math"] if with_math else names


def phase_attention_tflops(ctx: Context) -> dict[str, Any]:
    s = ctx.sizes
    q, k, v = qkv(s, s.tokens, s.tokens)
    flops = 4.0 * s.tokens**2 * s.heads * s.head_dim
    info = device_info(s.device)
    out: dict[str, Any] = {
        "tokens": s.tokens,
        "heads": s.heads,
        "head_dim": s.head_dim,
        "dtype": str(s.dtype),
    }
    for name in attention_backends(with_math=s.device == "cpu"):
        if ctx.left() < 20:
            out[name] = "skipped: phase budget"
            continue
        try:
            backend = AttentionBackend(name, info)
            ran = ops_run(lambda b=backend: b.attention(q, k, v)) or [f"external {name}"]
            seconds = timed(
                lambda b=backend: b.attention(q, k, v), s.device, s.repeats + 1, min(30, ctx.left())
            )
            out[name] = {
                "ms": round(seconds * 1e3, 2),
                "tflops": round(flops / seconds / 1e12, 1),
                "ran": ran,
            }
        except Exception as err:
            out[name] = f"error: {type(err).__name__}: {str(err)[:160]}"
    timings = {n: r["tflops"] for n, r in out.items() if isinstance(r, dict)}
    out["best"] = max(timings, key=timings.get) if timings else None
    return out


def _errors(out: torch.Tensor, lse: torch.Tensor, ref_out: torch.Tensor, ref_lse: torch.Tensor) -> dict:
    return {
        "out_max_abs": float((out.float() - ref_out).abs().max()),
        "lse_max_abs": float((lse - ref_lse).abs().max()),
    }


def phase_attention_lse(ctx: Context) -> dict[str, Any]:
    s = ctx.sizes
    n_text = s.text_tokens
    q, k, v = qkv(s, s.lse_tokens, s.lse_tokens + n_text, seed=1)
    ref_out, ref_lse = math_with_lse(q.float(), k.float(), v.float())
    info = device_info(s.device)
    out: dict[str, Any] = {"tokens": s.lse_tokens, "text_tokens": n_text}
    for name in attention_backends(with_math=True):
        if ctx.left() < 10:
            out[name] = "skipped: phase budget"
            continue
        try:
            backend = AttentionBackend(name, info)
            result: dict[str, Any] = _errors(*backend.attention_with_lse(q, k, v), ref_out, ref_lse)
            img_k, img_v = k[:, :, :-n_text], v[:, :, :-n_text]
            for blocks in (2, 4, 8):
                merged, lse = backend.attention_with_lse(q, k[:, :, -n_text:], v[:, :, -n_text:])
                for k_b, v_b in zip(img_k.chunk(blocks, 2), img_v.chunk(blocks, 2), strict=True):
                    merged, lse = merge_blocks(merged, lse, *backend.attention_with_lse(q, k_b, v_b))
                result[f"ring_{blocks}_blocks"] = _errors(merged, lse, ref_out, ref_lse)
            out[name] = result
        except Exception as err:
            out[name] = f"error: {type(err).__name__}: {str(err)[:160]}"
    return out


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_transformer(sizes: Sizes, double: int, single: int, seed: int = 0) -> HunyuanVideoTransformer:
    """Random weights made directly on the device in the compute dtype (no fp32 copy)."""
    base = sizes.transformer
    config = TransformerConfig(**{**base.__dict__, "num_double_blocks": double, "num_single_blocks": single})
    torch.manual_seed(seed)
    with torch.device(sizes.device), default_dtype(sizes.dtype):
        model = HunyuanVideoTransformer(config)
        for name, param in model.named_parameters():
            if param.ndim >= 2:  # keep activations in range: N(0, 1/fan_in) like a trained model
                param.data.normal_(0, math.prod(param.shape[1:]) ** -0.5)
            elif "norm" not in name:
                param.data.zero_()
    return model.eval().requires_grad_(False)


def step_inputs(sizes: Sizes, video: tuple[int, int, int]) -> tuple[tuple, dict]:
    cfg, dev, dtype = sizes.transformer, sizes.device, sizes.dtype
    channels, t, h, w = latent_shape(*video)
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(1, channels, t, h, w, generator=g, device=dev, dtype=dtype)
    text = torch.randn(1, sizes.text_tokens, cfg.text_dim, generator=g, device=dev, dtype=dtype)
    pooled = torch.randn(1, cfg.pooled_text_dim, generator=g, device=dev, dtype=dtype)
    cond = TextConditioning(text, (sizes.text_tokens,), pooled, guidance_scale=6.0)
    return (x, torch.tensor([900.0], device=dev), cond), {}


def phase_sp_transformer(ctx: Context) -> dict[str, Any]:
    import torch.distributed as dist

    from hvbatch.parallel.dims import ParallelDims, build_groups
    from hvbatch.parallel.runner import SequenceParallelTransformer

    s = ctx.sizes
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    backend = "nccl" if s.device == "cuda" else "gloo"
    device_id = torch.device("cuda", 0) if backend == "nccl" else None
    # This process alone, on this machine, whatever MASTER_* the environment holds.
    dist.init_process_group(
        backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1, device_id=device_id
    )
    try:
        model = build_transformer(s, *s.depths[0])
        args, kwargs = step_inputs(s, next(iter(s.videos.values())))
        with torch.no_grad():
            plain = model(*args, **kwargs).float()
            groups = build_groups(ParallelDims(dp=1, ulysses=1, ring=1, world_size=1), 0)
            runner = SequenceParallelTransformer(model, groups)
            parallel = runner(*args, **kwargs).float()
        rel = float((parallel - plain).norm() / plain.norm())
        return {"process_group": backend, "layout": "u1 r1", "rel_err": rel, "ok_1e-2": rel < 1e-2}
    finally:
        dist.destroy_process_group()


def _peak_gib(device: str) -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None


def _reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def step_flops(config: TransformerConfig, image: int, text: int, double: int, single: int) -> float:
    """Matmul FLOPs of one forward: each stream's linears on its own tokens, attention on all."""
    d, mlp = config.hidden_size, int(config.hidden_size * config.mlp_ratio)
    per_token_double = 2 * (3 * d * d + d * d + 2 * d * mlp)  # qkv, proj, fc1, fc2 of one stream
    per_token_single = 2 * (d * (3 * d + mlp) + (d + mlp) * d)  # linear1, linear2
    tokens = image + text
    attention = 4.0 * tokens**2 * d
    return double * ((image + text) * per_token_double + attention) + single * (
        tokens * per_token_single + attention
    )


def _variant(ctx: Context, name: str, backend: str, video: tuple[int, int, int]) -> dict[str, Any]:
    """Time depths D1 and D2 (same double:single ratio as 20:40) and extrapolate to 20+40."""
    s = ctx.sizes
    args, kwargs = step_inputs(s, video)
    seconds, peaks = [], []
    for double, single in s.depths:
        _reset_peak(s.device)
        model = build_transformer(s, double, single)
        info = device_info(s.device)
        model.attention_fn = LocalAttention(AttentionBackend(backend, info))
        if name == "fp8":
            quantize_model_fp8(model)
        if name == "compiled":
            compile_blocks(model, backend=s.compile_backend)
        with torch.no_grad():
            budget = min(60, ctx.left())
            seconds.append(timed(lambda m=model: m(*args, **kwargs), s.device, s.repeats, budget))
        peaks.append(_peak_gib(s.device))
        del model
    (d1, _), (d2, _) = s.depths
    unit = (seconds[1] - seconds[0]) / ((d2 - d1) / d1)  # one D1 worth of blocks
    full = seconds[0] + unit * (FULL_DEPTH[0] / d1 - 1)
    _, t, h, w = latent_shape(*video)
    image = t * (h // 2) * (w // 2)
    flops = step_flops(s.transformer, image, s.text_tokens, *FULL_DEPTH)
    return {
        "backend": backend,
        "ms_depth": {f"{d}+{n}": round(x * 1e3, 1) for (d, n), x in zip(s.depths, seconds, strict=True)},
        "s_per_step_20+40": round(full, 3),
        "tflops_20+40": round(flops / full / 1e12, 1) if full > 0 else None,
        "peak_gib": peaks,
    }


def phase_transformer_step(ctx: Context) -> dict[str, Any]:
    s = ctx.sizes
    best = ctx.results.get("attention_tflops", {}).get("best") or auto_choice(
        device_info(s.device), s.dtype, s.head_dim
    )
    variants = [("default", "default"), ("best", best), ("compiled", best), ("fp8", best)]
    out: dict[str, Any] = {}
    for label, video in s.videos.items():
        for name, backend in variants:
            key = f"{label}/{name}"
            if ctx.left() < 15:
                out[key] = "skipped: phase budget"
                continue
            try:
                out[key] = _variant(ctx, name, backend, video)
            except Exception as err:
                out[key] = f"error: {type(err).__name__}: {str(err)[:160]}"
    return out


def phase_vae_tile(ctx: Context) -> dict[str, Any]:
    s = ctx.sizes
    dtype = torch.float16 if s.device == "cuda" else torch.float32
    _reset_peak(s.device)
    with torch.device(s.device), default_dtype(dtype):
        vae = AutoencoderKLCausal3D(s.vae).eval().requires_grad_(False)
    size, frames = s.vae_tile
    z = torch.randn(1, s.vae.latent_channels, frames, size, size, device=s.device, dtype=dtype)
    with torch.no_grad():
        seconds = timed(lambda: vae.decode(z), s.device, repeats=2, budget_s=min(60, ctx.left()))
    return {
        "tile_latent": [frames, size, size],
        "dtype": str(dtype),
        "s": round(seconds, 3),
        "peak_gib": _peak_gib(s.device),
    }


PHASES: dict[str, tuple[Callable[[Context], dict[str, Any]], float]] = {
    # name: (function, share of the total budget)
    "versions": (phase_versions, 0.02),
    "dispatch": (phase_dispatch, 0.04),
    "attention_tflops": (phase_attention_tflops, 0.15),
    "attention_lse": (phase_attention_lse, 0.08),
    "sp_transformer": (phase_sp_transformer, 0.06),
    "transformer_step": (phase_transformer_step, 0.55),
    "vae_tile": (phase_vae_tile, 0.10),
}


def run_phase(name: str, sizes: Sizes, budget_s: float, results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    fn, _ = PHASES[name]
    ctx = Context(sizes, time.monotonic() + budget_s, results)
    _reset_peak(sizes.device)
    start = time.monotonic()
    try:
        record = {"phase": name, "ok": True, **fn(ctx)}
    except Exception as err:
        record = {"phase": name, "ok": False, "error": f"{type(err).__name__}: {err}"[:400],
                  "trace": traceback.format_exc(limit=3)[-600:]}  # fmt: skip
    record["seconds"] = round(time.monotonic() - start, 2)
    record["budget_s"] = round(budget_s, 1)
    results[name] = record
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU (CI)")
    parser.add_argument("--budget-s", type=float, default=480.0, help="total time budget (default 8 min)")
    parser.add_argument("--phases", nargs="+", choices=list(PHASES), default=list(PHASES))
    args = parser.parse_args(argv)
    if not args.cpu_smoke and not torch.cuda.is_available():
        print(json.dumps({"phase": "setup", "ok": False, "error": "no CUDA GPU: run with --cpu-smoke"}))
        return 2
    sizes = Sizes.smoke() if args.cpu_smoke else Sizes.full()
    end = time.monotonic() + args.budget_s
    results: dict[str, dict[str, Any]] = {}
    chosen = [p for p in PHASES if p in args.phases]
    for i, name in enumerate(chosen):
        # This phase's share of what is left: time a phase does not use passes to the next ones.
        share = PHASES[name][1] / sum(PHASES[p][1] for p in chosen[i:])
        budget = max(5.0, (end - time.monotonic()) * share)
        print(json.dumps(run_phase(name, sizes, budget, results), default=str), flush=True)
    return 0 if all(r["ok"] for r in results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
