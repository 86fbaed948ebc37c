"""The phases of `gpu_check.py`, each run in a process of its own (`python gpu_check.py --child NAME`).

A phase writes what it has measured to its record file after every measurement (`Recorder`), so a
phase killed at its budget still reports what it finished. Sizes are the real ones on a GPU and
tiny ones with `--cpu-smoke`. Only torch, einops, safetensors, pyarrow and hvbatch are imported
(no omegaconf, submitit or imageio-ffmpeg: the GPU machine has none of them).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hvbatch.config import TransformerConfig
from hvbatch.models.attention import LocalAttention
from hvbatch.models.attention_backends import (
    AttentionBackend,
    auto_choice,
    cudnn_problem,
    device_info,
    installed_kernels,
    math_with_lse,
)
from hvbatch.models.transformer import HunyuanVideoTransformer, TextLengths
from hvbatch.models.vae import VaeConfig
from hvbatch.parallel.attention import merge_blocks
from hvbatch.sampling.sizes import latent_shape

FULL_DEPTH = (20, 40)
SDPA_OPS = (
    "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_attention_math",
)
TINY = TransformerConfig(
    num_heads=12, head_dim=16, num_double_blocks=2, num_single_blocks=2, num_refiner_blocks=1,
    rope_axes_dim=[4, 6, 6], text_dim=64, pooled_text_dim=32,
)  # fmt: skip
"""The `tiny` preset's architecture, written out (no YAML reader needed)."""
ACCURACY_ROWS = 256
"""Query rows checked against the float32 reference: the last 144 (the tail block past the last
multiple of 128 is where an old cuDNN goes wrong), the first 16, and evenly spread others."""
NVLINK_GBPS, INFINIBAND_GBPS = 450.0, 50.0
"""Assumed per-GPU link bandwidths (H100 SXM NVLink, one 400 Gb/s NIC) for the comm_dtype verdict."""


@dataclass
class Sizes:
    """Full sizes on a GPU; tiny ones for `--cpu-smoke`."""

    device: str
    dtype: torch.dtype
    tokens: int
    heads: int
    head_dim: int
    accuracy_lengths: tuple[int, ...]
    text_tokens: int
    videos: dict[str, tuple[int, int, int]]
    depth: tuple[int, int]
    transformer: TransformerConfig
    vae: VaeConfig
    vae_tile: tuple[int, int]
    sp_video: tuple[int, int, int]
    sp_layouts: tuple[tuple[int, int], ...]
    compile_backend: str = "inductor"
    compiled_videos: int = 2
    """Videos the compiled variant runs (each size compiles anew)."""
    repeats: int = 2
    """Timed calls after the warm-up (the best one counts)."""

    @classmethod
    def full(cls) -> Sizes:
        return cls(
            "cuda", torch.bfloat16, 119_056, 24, 128, (4_112, 119_056), 250,
            {"720p": (720, 1280, 129), "544p": (544, 960, 129)}, (2, 4), TransformerConfig(), VaeConfig(),
            (32, 16), (544, 960, 33), ((2, 1), (2, 2)),
        )  # fmt: skip

    @classmethod
    def smoke(cls) -> Sizes:
        tiny_vae = VaeConfig(block_out_channels=(8, 16, 32, 32), layers_per_block=1, norm_num_groups=4)
        return cls(
            "cpu", torch.float32, 96, 2, 16, (40, 100), 7, {"64p": (64, 64, 5), "48p": (48, 64, 5)},
            (1, 2), TINY, tiny_vae, (4, 2), (48, 112, 5), ((2, 1), (1, 2)), "aot_eager", 1, 1,
        )  # fmt: skip


class Recorder(dict[str, Any]):
    """The phase's results; every assignment rewrites the record file (atomically)."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path

    def __setitem__(self, key: str, value: Any) -> None:
        super().__setitem__(key, value)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps(self, default=str))
        tmp.replace(self.path)


@dataclass
class Context:
    sizes: Sizes
    deadline: float
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Records of the phases before this one (e.g. the fastest attention kernel)."""

    def left(self) -> float:
        return self.deadline - time.monotonic()


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


def kernel_names(with_math: bool) -> list[str]:
    names = ["default", "cudnn", "flash", "efficient", *sorted(installed_kernels())]
    return [*names, "math"] if with_math else names


def _nccl_version() -> str:
    version = torch.cuda.nccl.version()
    return ".".join(map(str, version)) if isinstance(version, tuple) else str(version)


def phase_versions(ctx: Context, rec: Recorder) -> None:
    cuda = torch.cuda.is_available()
    rec["python"] = platform.python_version()
    rec["torch"] = torch.__version__
    rec["cuda"] = torch.version.cuda
    rec["cudnn"] = torch.backends.cudnn.version() if cuda else None
    rec["nccl"] = _nccl_version() if cuda else None
    rec["gpu"] = torch.cuda.get_device_name() if cuda else None
    rec["capability"] = list(torch.cuda.get_device_capability()) if cuda else None
    rec["memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if cuda else None
    rec["external_kernels"] = sorted(installed_kernels())
    info = device_info(ctx.sizes.device)
    rec["cudnn_trusted"] = info.cudnn_trusted
    rec["cudnn_rule"] = cudnn_problem(info) or "PyTorch prefers cuDNN here"
    rec["auto_backend"] = auto_choice(info, ctx.sizes.dtype, ctx.sizes.head_dim)


def phase_dispatch(ctx: Context, rec: Recorder) -> None:
    """SDPA's priority order read after a first SDPA call (PyTorch sets it lazily, on first dispatch),
    then the aten kernel each production call site runs, at lengths that are not multiples of 128."""
    s = ctx.sizes
    q, k, v = qkv(s, 500 if s.device == "cuda" else 30, 512 if s.device == "cuda" else 33)
    torch.nn.functional.scaled_dot_product_attention(q, k, v)
    info = device_info(s.device)
    rec["our_rule_trusts_cudnn"] = info.cudnn_trusted
    try:
        priority = torch._C._get_sdp_priority_order()
    except AttributeError:  # a torch without it: the rest of the phase still runs
        rec["sdpa_priority"] = "unavailable in this torch"
    else:
        order = [str(torch.nn.attention.SDPBackend(i)).split(".")[-1] for i in priority]
        rec["sdpa_priority"] = order
        rec["torch_prefers_cudnn"] = order[0] == "CUDNN_ATTENTION"
        rec["rule_agrees"] = s.device != "cuda" or rec["torch_prefers_cudnn"] == info.cudnn_trusted
    auto = AttentionBackend(auto_choice(info, s.dtype, s.head_dim), info)
    rec["auto_backend"] = auto.name
    q_BLHD, k_BLHD, v_BLHD = (t.transpose(1, 2) for t in (q, k, v))
    sites = {
        "blocks (model.attention=auto)": lambda: LocalAttention(auto)(q_BLHD, k_BLHD, v_BLHD),
        "token refiner (SDPA default)": lambda: AttentionBackend("default").attention(q, k, v),
        "sequence parallel, ring > 1 (LSE)": lambda: auto.attention_with_lse(q, k, v),
        "sequence parallel, ring 1 (joint call)": lambda: auto.attention(q, k, v),
    }
    rec["call_sites"] = {site: ops_run(fn) or [f"external {auto.name}"] for site, fn in sites.items()}
    rec["fallbacks"] = dict(auto.fallbacks)


def phase_attention_tflops(ctx: Context, rec: Recorder) -> None:
    s = ctx.sizes
    q, k, v = qkv(s, s.tokens, s.tokens)
    flops = 4.0 * s.tokens**2 * s.heads * s.head_dim
    info = device_info(s.device)
    rec["tokens"], rec["heads"], rec["head_dim"], rec["dtype"] = s.tokens, s.heads, s.head_dim, str(s.dtype)
    speeds: dict[str, float] = {}
    for name in kernel_names(with_math=s.device == "cpu"):
        if ctx.left() < 10:
            rec[name] = "skipped: phase budget"
            continue
        try:
            backend = AttentionBackend(name, info)
            ran = ops_run(lambda b=backend: b.attention(q, k, v)) or [f"external {name}"]
            seconds = timed(
                lambda b=backend: b.attention(q, k, v), s.device, s.repeats + 1, min(30, ctx.left())
            )
            speeds[name] = flops / seconds / 1e12
            rec[name] = {"ms": round(seconds * 1e3, 2), "tflops": round(speeds[name], 1), "ran": ran}
            rec[name] |= {"fallbacks": dict(backend.fallbacks)} if backend.fallbacks else {}
        except Exception as err:
            rec[name] = f"error: {type(err).__name__}: {str(err)[:160]}"
        rec["best"] = max(speeds, key=speeds.__getitem__) if speeds else None


def _rows(length: int) -> torch.Tensor:
    tail = list(range(max(0, length - 144), length))
    spread = torch.linspace(0, length - 1, max(0, ACCURACY_ROWS - len(tail) - 16)).long().tolist()
    return torch.tensor(sorted(set(tail) | set(range(min(16, length))) | set(spread)))


def _reference_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor) -> tuple:
    """float32 output and LSE of the given query rows, one head at a time (no L x L matrix)."""
    outs, lses = [], []
    for h in range(q.shape[1]):
        out, lse = math_with_lse(
            q[:, h : h + 1, rows].float(), k[:, h : h + 1].float(), v[:, h : h + 1].float()
        )
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs, dim=1), torch.cat(lses, dim=1)


def _errors(
    out: torch.Tensor, ref: torch.Tensor, lse: torch.Tensor | None = None, ref_lse: torch.Tensor | None = None
) -> dict:
    got = out.float()
    errors = {"out_rel": float((got - ref).norm() / ref.norm()), "finite": bool(torch.isfinite(got).all())}
    if lse is not None and ref_lse is not None:
        errors["lse_max_abs"] = float((lse.float() - ref_lse).abs().max())
    return errors


def phase_attention_accuracy(ctx: Context, rec: Recorder) -> None:
    """Every kernel, plain and with its LSE, at query lengths that are not multiples of 128 (4,112 and
    the real 119,056 on a GPU), keys = queries + text tokens; a canary tensor allocated after the
    inputs must come out unchanged (an out-of-bounds write lands in a neighbour)."""
    s = ctx.sizes
    info = device_info(s.device)
    for length in s.accuracy_lengths:
        q, k, v = qkv(s, length, length + s.text_tokens, seed=length)
        canary = torch.full((1 << 20,), 7.0, device=s.device, dtype=s.dtype)
        rows = _rows(length).to(s.device)
        ref_out, ref_lse = _reference_rows(q, k, v, rows)
        for name in kernel_names(with_math=True):
            key = f"{length}/{name}"
            if name == "math" and length > 20_000:
                rec[key] = "skipped: the math kernel holds the L x L scores"
                continue
            if ctx.left() < 10:
                rec[key] = "skipped: phase budget"
                continue
            try:
                backend = AttentionBackend(name, info)
                result = {"plain": _errors(backend.attention(q, k, v)[:, :, rows], ref_out)}
                out, lse = backend.attention_with_lse(q, k, v)
                result["lse"] = _errors(out[:, :, rows], ref_out, lse[:, :, rows], ref_lse)
                if length == min(s.accuracy_lengths):
                    result |= _ring_merges(backend, q, k, v, s.text_tokens, rows, ref_out, ref_lse)
                result["canary_intact"] = bool((canary == 7.0).all())
                result["fallbacks"] = dict(backend.fallbacks)
                rec[key] = result
            except Exception as err:
                rec[key] = f"error: {type(err).__name__}: {str(err)[:160]}"
            synchronize(s.device)
        del q, k, v, canary


def _ring_merges(backend: AttentionBackend, q, k, v, n_text: int, rows, ref_out, ref_lse) -> dict:  # type: ignore[no-untyped-def]
    """2, 4 and 8 image key blocks plus the text block, merged with `merge_blocks`, against one call."""
    out_ = {}
    img_k, img_v = k[:, :, :-n_text], v[:, :, :-n_text]
    for blocks in (2, 4, 8):
        merged, lse = backend.attention_with_lse(q, k[:, :, -n_text:], v[:, :, -n_text:])
        for k_b, v_b in zip(img_k.chunk(blocks, 2), img_v.chunk(blocks, 2), strict=True):
            merged, lse = merge_blocks(merged, lse, *backend.attention_with_lse(q, k_b, v_b))
        out_[f"ring_{blocks}_blocks"] = _errors(merged[:, :, rows], ref_out, lse[:, :, rows], ref_lse)
    return out_


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


def step_inputs(sizes: Sizes, video: tuple[int, int, int], batch: int = 1) -> tuple[tuple, dict]:
    cfg, dev, dtype = sizes.transformer, sizes.device, sizes.dtype
    channels, t, h, w = latent_shape(*video)
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(batch, channels, t, h, w, generator=g, device=dev, dtype=dtype)
    text = torch.randn(batch, sizes.text_tokens, cfg.text_dim, generator=g, device=dev, dtype=dtype)
    pooled = torch.randn(batch, cfg.pooled_text_dim, generator=g, device=dev, dtype=dtype)
    lengths = TextLengths((sizes.text_tokens,) * batch, sizes.text_tokens)
    guidance = torch.full((batch,), 6016.0, device=dev, dtype=dtype)
    return (x, torch.full((batch,), 900.0, device=dev), text, lengths, pooled), {"guidance": guidance}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def phase_sp_multirank(ctx: Context, rec: Recorder) -> None:
    """The real multi-rank sequence-parallel code on this one device (see gpu_check_sp.py), then
    NCCL's eager start-up (`device_id`) and a split group on a world of 1."""
    import gpu_check_sp

    gpu_check_sp.run(ctx, rec)


def peak_gib(device: str) -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None


def reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def env_summary() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith(("TORCH_CUDNN", "NCCL_", "TORCHINDUCTOR"))}
