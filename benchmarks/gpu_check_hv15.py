"""The HunyuanVideo-1.5 phases of `gpu_check.py` (one process each): `hv15_step`, `ssta_attention`, `sr_step`.

- `hv15_step`: one denoising step of the 1.5 transformer at full width (hidden 2048 = 16 heads x
  128) and reduced depth (`DEPTH` of its 54 double blocks; random weights N(0, 1/fan_in), bf16),
  text-to-video at 480p x 121, 720p x 121 and 720p x 33 frames (the 16:9 buckets; tokens from the
  1.5 geometry: 16x spatial, 4x temporal, patch 1), with the most condition tokens a prompt has
  (1000 LLM + 256 byT5), without CFG (batch 1) and with it (batch 2 `[negative, positive]`, the
  negative short, so each sample attends its own tokens as in production). The attention is what
  the production path gives a dense 1.5 checkpoint (`configure_attention(model, "auto",
  backend_for("auto", ...))`, resolved on this device). Each block is timed with CUDA events and
  the step extrapolated to 54 blocks as `rest + 54 x mean(block)` (measured durations only: never
  negative, never below the measured forward). Peak memory as measured and with the other 52
  blocks' weights added (activations do not grow with depth in inference). Then seconds and
  minutes per video per GPU (transformer steps only: no text encoding, no VAE decode) at 50 steps
  with CFG, CFG-distilled (50 steps, batch 1) and step-distilled (8 and 12 steps, batch 1), next
  to the published figures (`PUBLISHED`).
- `ssta_attention`: `ssta_phase.ssta_phase` at the 720p x 121 grid with the same 1,256 condition
  tokens: SSTA (portable kernel; the official flex-block-attn kernel when installed) against the
  dense kernel `auto` picks, one attention call each.
- `sr_step`: one step of the SR transformer (98 input channels: `[noisy | image cond + mask |
  noised upsampled low-res latents + mask]`, text-to-video, CFG 1) at the 720p SR (720 x 1280) and
  1080p SR (1072 x 1904) grids, full width, reduced depth, extrapolated as above; then the SR
  stage's upsampler (`upsample_low_res_latents`: bilinear resize plus the official module in float32,
  default config, random weights) from the base latent grid to that grid; the stage's seconds are
  `upsampler + steps x step`.

`--cpu-smoke` runs the same code on the tiny 1.5 model and small grids (float32); its numbers mean
nothing. Only torch, einops, safetensors and hvbatch are imported (no omegaconf).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from gpu_check_phases import Context, Recorder, peak_gib, reset_peak, synchronize, timed
from gpu_check_step import BlockTimer, lap_seconds

from hvbatch.models.attention_backends import backend_for
from hvbatch.models.hunyuan_video_15.conditioning import HunyuanVideo15Conditioning
from hvbatch.models.hunyuan_video_15.config import HunyuanVideo15TransformerConfig
from hvbatch.models.hunyuan_video_15.super_resolution import sr_condition, upsample_low_res_latents
from hvbatch.models.hunyuan_video_15.transformer import HunyuanVideo15Transformer
from hvbatch.models.hunyuan_video_15.transformer_loading import random_transformer
from hvbatch.models.hunyuan_video_15.upsampler import (
    SRTo720pUpsamplerConfig,
    SRTo1080pUpsamplerConfig,
    UpsamplerConfig,
    build_upsampler,
)
from hvbatch.models.hunyuan_video_15.variants import (
    DEFAULT_NUM_FRAMES,
    TRANSFORMER_DOUBLE_BLOCKS,
    bucket_for,
    latent_grid,
    sr_variant,
    transformer_pass_flops,
    variant,
    video_stages,
)
from hvbatch.models.ssta_attention import configure_attention

DEPTH = 2
"""Double blocks built and timed (of 54): each is timed on its own, so two give the mean."""
CONDITION_TOKENS = (1000, 256)
"""The most a prompt gives (LLM max length 1000, byT5 256): the positive prompt's."""
NEGATIVE_TOKENS = (16, 1)
"""A short negative prompt (the official one is empty): its count is immaterial (<0.02% of 720p's
tokens) but differing from the positive's, each CFG sample attends its own tokens in its own call,
as in production."""
TIMESTEP = 900.0
BASE_STEPS = variant("480p_t2v").default_steps
STEP_DISTILLED_STEPS = (8, 12)
"""The step-distilled model's recommended counts (official README: "8 or 12 steps"); it is released
at 480p (image-to-video, 729 image tokens more, not counted here)."""
GPU_TYPES = ("h100", "h200", "b200", "a100", "l40s")
"""`batch.gpu_type` values of the shard-cost table (`hvbatch/batch/control/calibration.py`)."""


@dataclass(frozen=True)
class Published:
    """A published one-video time (`../shared/reference/hunyuanvideo-family.md`), end to end."""

    source: str
    seconds: float
    steps: int
    gpus: int


PUBLISHED: dict[str, tuple[Published, ...]] = {
    "480p": (
        Published("diffusers, 1x H200", 1135.7, 50, 1),
        Published("vLLM-Omni, 1x H200", 259.4, 50, 1),
    ),
    "720p_33f": (
        Published("diffusers, 1x H200", 334.7, 30, 1),
        Published("vLLM-Omni, 1x H200", 88.5, 30, 1),
    ),
    "720p": (Published("official code, 4x H100 (GPU-seconds: x 4)", 8.98 * 60, 50, 4),),
}
"""By video label; all assumed with the default CFG (6). The published resolution at "480p" is not
stated (ours: the 480 x 848 bucket). Published times include text encoding and the VAE decode."""


@dataclass(frozen=True)
class BaseVideo:
    label: str
    height: int
    width: int
    frames: int

    @property
    def grid(self) -> tuple[int, int, int]:
        return latent_grid(self.height, self.width, self.frames)


@dataclass(frozen=True)
class SrVideo:
    label: str
    variant: str
    """The SR variant (`SR_VARIANTS`): its steps and upsampler."""
    base_grid: tuple[int, int, int]
    grid: tuple[int, int, int]


@dataclass(frozen=True)
class Hv15Sizes:
    """Full sizes on a GPU; tiny ones for `--cpu-smoke`."""

    device: str
    dtype: torch.dtype
    config: HunyuanVideo15TransformerConfig
    base_videos: tuple[BaseVideo, ...]
    sr_videos: tuple[SrVideo, ...]
    upsamplers: dict[str, UpsamplerConfig]
    condition_tokens: tuple[int, int]
    negative_tokens: tuple[int, int]
    ssta_grid: tuple[int, int, int]
    ssta_params: Any = None
    """None: the official SSTA defaults."""
    repeats: int = 2

    @classmethod
    def full(cls) -> Hv15Sizes:
        h480, w480 = bucket_for("16:9", "480p")
        h720, w720 = bucket_for("16:9", "720p")
        base = (
            BaseVideo("480p", h480, w480, DEFAULT_NUM_FRAMES),
            BaseVideo("720p", h720, w720, DEFAULT_NUM_FRAMES),
            BaseVideo("720p_33f", h720, w720, 33),
        )
        sr = []
        for base_variant, target in (("480p_t2v", "720p"), ("720p_t2v", "1080p")):
            low, high = video_stages(
                variant(base_variant), *bucket_for("16:9", variant(base_variant).resolution),
                DEFAULT_NUM_FRAMES, super_resolution=target,
            )  # fmt: skip
            sr.append(SrVideo(f"{target}_sr", high.variant, low.grid, high.grid))
        upsamplers: dict[str, UpsamplerConfig] = {
            "720p_sr_distilled": SRTo720pUpsamplerConfig(),
            "1080p_sr_distilled": SRTo1080pUpsamplerConfig(),
        }
        config = HunyuanVideo15TransformerConfig.full().with_changes(num_double_blocks=DEPTH)
        return cls(
            "cuda", torch.bfloat16, config, base, tuple(sr), upsamplers, CONDITION_TOKENS,
            NEGATIVE_TOKENS, base[1].grid,
        )  # fmt: skip

    @classmethod
    def smoke(cls) -> Hv15Sizes:
        from hvbatch.models.ssta import SstaParams

        base = (BaseVideo("64p", 64, 96, 9), BaseVideo("96p", 96, 160, 9))
        sr = (
            SrVideo("96p_sr", "720p_sr_distilled", (3, 4, 6), (3, 6, 10)),
            SrVideo("128p_sr", "1080p_sr_distilled", (3, 6, 10), (3, 8, 14)),
        )
        upsamplers: dict[str, UpsamplerConfig] = {
            "720p_sr_distilled": SRTo720pUpsamplerConfig.tiny(),
            "1080p_sr_distilled": SRTo1080pUpsamplerConfig.tiny(),
        }
        config = HunyuanVideo15TransformerConfig.tiny().with_changes(num_double_blocks=DEPTH)
        params = SstaParams(tile=(2, 2, 4), window=(1, 3, 3), topk=4)
        return cls(
            "cpu", torch.float32, config, base, sr, upsamplers, (8, 4), (3, 0), base[1].grid, params, 1,
        )  # fmt: skip

    def transformer_config(self, *, super_resolution: bool) -> HunyuanVideo15TransformerConfig:
        """The base transformer's (65 input channels) or the SR one's (98)."""
        out = self.config.out_channels
        return self.config.with_changes(in_channels=3 * out + 2 if super_resolution else 2 * out + 1)


def hv15_sizes(ctx: Context) -> Hv15Sizes:
    """The GPU sizes exactly when the check runs on CUDA (`--cpu-smoke` runs on the CPU)."""
    return Hv15Sizes.full() if ctx.sizes.device == "cuda" else Hv15Sizes.smoke()


def extrapolate(total_s: float, block_s: list[float], full_depth: int = TRANSFORMER_DOUBLE_BLOCKS) -> dict:
    """`rest + full_depth x mean(block)`, `rest = max(0, total - sum(blocks))`: every term a measured
    duration, so the estimate is never negative and never below the measured forward."""
    mean = sum(block_s) / len(block_s)
    rest = max(0.0, total_s - sum(block_s))
    return {
        "measured_blocks": len(block_s),
        "measured_forward_s": round(total_s, 4),
        "ms_block": round(mean * 1e3, 3),
        "ms_block_max": round(max(block_s) * 1e3, 3),
        "ms_rest": round(rest * 1e3, 3),
        f"s_per_step_{full_depth}": round(rest + full_depth * mean, 4),
    }


STEP_KEY = f"s_per_step_{TRANSFORMER_DOUBLE_BLOCKS}"


@dataclass
class TimedModel:
    """A 1.5 transformer at reduced depth whose blocks record their durations into `laps`."""

    model: HunyuanVideo15Transformer
    laps: list[tuple[str, Any, Any]]
    backend: Any
    attention: str
    block_bytes: int

    @classmethod
    def build(cls, sizes: Hv15Sizes, *, super_resolution: bool = False) -> TimedModel:
        config = sizes.transformer_config(super_resolution=super_resolution)
        model = random_transformer(config, seed=0, dtype=sizes.dtype, device=sizes.device)
        backend = backend_for("auto", sizes.device, sizes.dtype, config.head_dim)
        attention = configure_attention(model, "auto", backend)  # no checkpoint facts: dense
        block_bytes = sum(p.numel() * p.element_size() for p in model.double_blocks[0].parameters())
        laps: list[tuple[str, Any, Any]] = []
        for i, block in enumerate(model.double_blocks):
            model.double_blocks[i] = BlockTimer(block, "double", laps)
        return cls(model, laps, backend, attention, block_bytes)

    def step(self, sizes: Hv15Sizes, call: Callable[[], object], batch: int, flops_per_sample: float) -> dict:
        """A first call, then `repeats` timed ones (the fastest kept), per block, extrapolated."""
        reset_peak(sizes.device)
        with torch.no_grad():
            t0 = time.perf_counter()
            call()
            synchronize(sizes.device)
            first_s = time.perf_counter() - t0
            best: tuple[float, list[float]] | None = None
            for _ in range(sizes.repeats):
                self.laps.clear()
                t0 = time.perf_counter()
                call()
                synchronize(sizes.device)
                total = time.perf_counter() - t0
                blocks = [lap_seconds(start, end) for _, start, end in self.laps]
                if best is None or total < best[0]:
                    best = (total, blocks)
        assert best is not None
        result = {"batch": batch, "first_call_s": round(first_s, 3), **extrapolate(*best)}
        result["tflops_54"] = round(batch * flops_per_sample / result[STEP_KEY] / 1e12, 1)
        peak = peak_gib(sizes.device)
        result["peak_gib"] = peak
        if peak is not None:
            missing = TRANSFORMER_DOUBLE_BLOCKS - len(self.model.double_blocks)
            result["peak_gib_54_blocks"] = round(peak + missing * self.block_bytes / 2**30, 2)
        if self.backend.fallbacks:
            result["fallbacks"] = dict(self.backend.fallbacks)
        return result


def conditioning(
    sizes: Hv15Sizes, lens: list[tuple[int, int]], cond_latents: torch.Tensor | None = None
) -> HunyuanVideo15Conditioning:
    """Random LLM and byT5 states, right-padded, `lens[b] = (LLM tokens, byT5 tokens)` valid."""
    config, dev = sizes.config, sizes.device
    g = torch.Generator(device=dev).manual_seed(1)
    longest_text, longest_glyph = max(n for n, _ in lens), max(1, max(m for _, m in lens))

    def randn(length: int, dim: int) -> torch.Tensor:
        return torch.randn(len(lens), length, dim, generator=g, device=dev, dtype=sizes.dtype)

    return HunyuanVideo15Conditioning(
        randn(longest_text, config.text_dim), tuple(n for n, _ in lens),
        randn(longest_glyph, config.glyph_dim), tuple(m for _, m in lens), None, cond_latents,
    )  # fmt: skip


def _latents(sizes: Hv15Sizes, batch: int, grid: tuple[int, int, int], seed: int = 0) -> torch.Tensor:
    g = torch.Generator(device=sizes.device).manual_seed(seed)
    shape = (batch, sizes.config.out_channels, *grid)
    return torch.randn(shape, generator=g, device=sizes.device, dtype=sizes.dtype)


def _base_step(timed_model: TimedModel, sizes: Hv15Sizes, video: BaseVideo, cfg: bool) -> dict:
    lens = [sizes.negative_tokens, sizes.condition_tokens] if cfg else [sizes.condition_tokens]
    cond = conditioning(sizes, lens)
    x = _latents(sizes, len(lens), video.grid)
    t = torch.full((len(lens),), TIMESTEP, device=sizes.device)
    tokens = video.grid[0] * video.grid[1] * video.grid[2]
    flops = sum(transformer_pass_flops(tokens, n + m) for n, m in lens) / len(lens)
    return timed_model.step(sizes, lambda: timed_model.model(x, t, cond), len(lens), flops)


def video_times(label: str, record: dict) -> tuple[dict[str, float], list[dict]]:
    """Seconds per video per GPU (transformer steps only) from a video's measured steps, and the
    published figures beside them (GPU-seconds: published seconds x GPUs)."""
    seconds: dict[str, float] = {}
    if isinstance(record.get("cfg"), dict):
        seconds[f"{BASE_STEPS}_steps_cfg"] = BASE_STEPS * record["cfg"][STEP_KEY]
    if isinstance(record.get("no_cfg"), dict):
        step = record["no_cfg"][STEP_KEY]
        seconds[f"{BASE_STEPS}_steps_cfg_distilled"] = BASE_STEPS * step
        seconds |= {f"{n}_steps_step_distilled": n * step for n in STEP_DISTILLED_STEPS}
    compared = []
    if isinstance(record.get("cfg"), dict):
        for pub in PUBLISHED.get(label, ()):
            ours = pub.steps * record["cfg"][STEP_KEY]
            compared.append(
                {"source": pub.source, "published_s": pub.seconds, "gpus": pub.gpus, "steps": pub.steps,
                 "ours_transformer_s": round(ours, 1),
                 "published_gpu_s_over_ours": round(pub.seconds * pub.gpus / ours, 2)}
            )  # fmt: skip
    return {k: round(v, 1) for k, v in seconds.items()}, compared


def _device_facts(rec: Recorder, sizes: Hv15Sizes, timed_model: TimedModel) -> None:
    cuda = sizes.device == "cuda"
    name = torch.cuda.get_device_name() if cuda else "cpu"
    rec["gpu"] = name
    rec["gpu_type"] = next((t for t in GPU_TYPES if t in name.lower()), None)
    rec["backend"] = timed_model.backend.name
    rec["attention"] = timed_model.attention
    rec["dtype"] = str(sizes.dtype).removeprefix("torch.")
    rec["hidden"], rec["heads"] = sizes.config.hidden_size, sizes.config.num_heads
    rec["depth_measured"], rec["full_depth"] = sizes.config.num_double_blocks, TRANSFORMER_DOUBLE_BLOCKS
    rec["condition_tokens"] = list(sizes.condition_tokens)
    rec["negative_tokens"] = list(sizes.negative_tokens)


def _attempt(ctx: Context, fn: Callable[[], dict], device: str) -> dict | str:
    """`fn()`, or the error in words (the phase goes on with its next measurement)."""
    if ctx.left() < 8:
        return "skipped: phase budget"
    try:
        return fn()
    except Exception as err:
        return f"error: {type(err).__name__}: {str(err)[:200]}"
    finally:
        if device == "cuda":
            torch.cuda.empty_cache()


def phase_hv15_step(ctx: Context, rec: Recorder) -> None:
    s = hv15_sizes(ctx)
    timed_model = TimedModel.build(s)
    _device_facts(rec, s, timed_model)
    for video in s.base_videos:
        grid = video.grid
        record: dict[str, Any] = {"size": [video.height, video.width, video.frames], "grid": list(grid)}
        record["image_tokens"] = grid[0] * grid[1] * grid[2]
        for key, cfg in (("no_cfg", False), ("cfg", True)):
            record[key] = _attempt(
                ctx, lambda video=video, cfg=cfg: _base_step(timed_model, s, video, cfg), s.device
            )
            seconds, published = video_times(video.label, record)
            minutes = {k: round(v / 60, 2) for k, v in seconds.items()}
            rec[video.label] = {**record, "video_s": seconds, "video_min": minutes, "published": published}


def phase_ssta_attention(ctx: Context, rec: Recorder) -> None:
    """`ssta_phase.ssta_phase` at the 720p x 121 grid, the step's condition tokens, written as it goes."""
    import ssta_phase

    s = hv15_sizes(ctx)
    config = s.config
    ssta_phase.ssta_phase(
        device=s.device, dtype=s.dtype, grid=s.ssta_grid, heads=config.num_heads, head_dim=config.head_dim,
        text_tokens=sum(s.condition_tokens), params=s.ssta_params, repeats=s.repeats + 1,
        budget_s=max(5.0, ctx.left() - 10.0), into=rec,
    )  # fmt: skip


def _sr_step(timed_model: TimedModel, sizes: Hv15Sizes, video: SrVideo) -> dict:
    low_res = _latents(sizes, 1, video.grid, seed=2).float()
    cond = conditioning(sizes, [sizes.condition_tokens], sr_condition(low_res).to(sizes.dtype))
    x = _latents(sizes, 1, video.grid)
    t = torch.full((1,), TIMESTEP, device=sizes.device)
    tokens = video.grid[0] * video.grid[1] * video.grid[2]
    flops = transformer_pass_flops(tokens, sum(sizes.condition_tokens))
    return timed_model.step(sizes, lambda: timed_model.model(x, t, cond), 1, flops)


def _upsampler(ctx: Context, sizes: Hv15Sizes, video: SrVideo) -> dict:
    """The upsampler as the SR stage runs it: base latents resized to the SR grid, then the module in
    float32 (random weights, its default config), timed, with peak memory."""
    config = sizes.upsamplers[video.variant]
    with torch.device(sizes.device):
        upsampler = build_upsampler(config).eval().requires_grad_(False)
    g = torch.Generator(device=sizes.device).manual_seed(3)
    base = torch.randn(1, 32, *video.base_grid, generator=g, device=sizes.device)
    reset_peak(sizes.device)
    with torch.no_grad():
        seconds = timed(
            lambda: upsample_low_res_latents(base, video.grid[1:], upsampler), sizes.device,
            sizes.repeats, min(30.0, ctx.left()),
        )  # fmt: skip
    return {"class": config.class_name, "config": dataclasses.asdict(config), "s": round(seconds, 4),
            "peak_gib": peak_gib(sizes.device)}  # fmt: skip


def phase_sr_step(ctx: Context, rec: Recorder) -> None:
    s = hv15_sizes(ctx)
    timed_model = TimedModel.build(s, super_resolution=True)
    rec["backend"], rec["attention"] = timed_model.backend.name, timed_model.attention
    rec["in_channels"] = timed_model.model.config.in_channels
    rec["depth_measured"], rec["full_depth"] = s.config.num_double_blocks, TRANSFORMER_DOUBLE_BLOCKS
    for video in s.sr_videos:
        sr = sr_variant(video.variant)
        grid = video.grid
        record: dict[str, Any] = {"variant": sr.name, "base_grid": list(video.base_grid), "grid": list(grid)}
        record |= {"image_tokens": grid[0] * grid[1] * grid[2], "steps": sr.default_steps}
        record["step"] = _attempt(ctx, lambda video=video: _sr_step(timed_model, s, video), s.device)
        rec[video.label] = dict(record)
        record["upsampler"] = _attempt(ctx, lambda video=video: _upsampler(ctx, s, video), s.device)
        if isinstance(record["step"], dict) and isinstance(record["upsampler"], dict):
            steps_s = sr.default_steps * record["step"][STEP_KEY]
            record["stage_s"] = round(record["upsampler"]["s"] + steps_s, 3)
        rec[video.label] = dict(record)
