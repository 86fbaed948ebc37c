"""HunyuanVideo-1.5's released checkpoints and their official defaults, and its size buckets.

Plain Python (no torch): the control plane checks steps and sizes with it.

Sources (Tencent-Hunyuan/HunyuanVideo-1.5): `hyvideo/commons/__init__.py` `PIPELINE_CONFIGS` (CFG
scale, flow shift, embedded guidance None, the step-distilled model's 12 steps), the README's model
table ("the cfg distilled model ... must use 50 steps"; the step-distilled model "8 or 12 steps
(recommended)", "4 steps ... slightly reduced quality"), `generate.py` (121 frames, 24 fps, 16:9,
50 steps), the pipeline's `target_size_config` (480p: base 640, 720p: base 960, stride 16) and
`hyvideo/utils/data_utils.py` (the crop-size list and the closest ratio). The super-resolution
stage's variants and its size map are at the end (`SR_VARIANTS`, `sr_target_size`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from enum import Enum

from hvbatch.images import ClosestRule, ImageSizing, ResizeMode, closest_bucket, crop_size_list

DEFAULT_NUM_FRAMES = 121
FPS = 24
DEFAULT_ASPECT_RATIO = "16:9"
"""Text-to-video's default, written width:height as the official `--aspect_ratio` is."""
BUCKET_STRIDE = 16
BUCKET_MAX_RATIO = 4.0
BUCKET_BASE_SIZE = {"480p": 640, "720p": 960}
SPATIAL_MULTIPLE = 16
"""The 1.5 VAE downsamples 16x and the transformer's patch is 1x1x1."""
TEMPORAL_RATIO = 4
IMAGE_SIZING = ImageSizing(
    tuple(BUCKET_BASE_SIZE.items()),
    BUCKET_STRIDE,
    ClosestRule.NEAREST,
    ResizeMode.COVER_LANCZOS,
    BUCKET_MAX_RATIO,
)
"""Image-to-video: the bucket nearest the image's aspect ratio, and the official Lanczos resize and
centre crop to it (the pipeline's `get_closest_resolution_given_reference_image` and
`get_image_condition_latents`, `hyvideo/utils/data_utils.py` `resize_and_center_crop`)."""


class Task(str, Enum):
    TEXT_TO_VIDEO = "t2v"
    IMAGE_TO_VIDEO = "i2v"


@dataclass(frozen=True)
class Variant15:
    """One released 1.5 transformer and how the official code samples with it."""

    name: str
    """The official folder under `ckpts/transformer/` (diffusers: `HunyuanVideo-1.5-Diffusers-<name>`)."""
    resolution: str
    task: Task
    cfg_scale: float
    flow_shift: float
    default_steps: int
    allowed_steps: tuple[int, ...] | None = None
    """None: any step count; else the only ones the model was distilled for."""
    cfg_distilled: bool = False
    step_distilled: bool = False
    """Step-distilled models condition on the next timestep (`use_meanflow`, `time_r_in`)."""
    sparse_attention: bool = False
    released: bool = True
    embedded_guidance_scale: float | None = None
    """None for every 1.5 variant: no guidance embedding (the official pipeline asserts it)."""

    @property
    def preset(self) -> str:
        return "hunyuan-video-1.5-" + self.name.replace("_", "-")

    @property
    def meanflow(self) -> bool:
        return self.step_distilled

    @property
    def bucket_base_size(self) -> int:
        return BUCKET_BASE_SIZE[self.resolution]

    @property
    def unsupported_reason(self) -> str | None:
        """Why hvbatch cannot run this variant yet, or None."""
        if not self.released:
            return f"{self.name} is listed by Tencent but not released yet"
        if self.task is Task.IMAGE_TO_VIDEO:
            return f"{self.name} is image-to-video (SigLIP tokens, first-frame latent): not in hvbatch yet"
        return None

    def check_steps(self, num_steps: int) -> None:
        """ValueError when this variant cannot run `num_steps` steps, saying which it can."""
        if num_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_steps}")
        if self.allowed_steps is None or num_steps in self.allowed_steps:
            return
        choices = " or ".join(str(s) for s in self.allowed_steps)
        why = (
            "it was step-distilled for these (8 or 12 recommended; 4 is faster with slightly lower quality)"
            if self.step_distilled
            else "the official README: the CFG-distilled models must use 50 steps to give correct results"
        )
        raise ValueError(
            f"{self.preset} runs {choices} steps, not num_inference_steps={num_steps}: {why}; "
            f"set sampling.num_inference_steps={self.default_steps}"
        )


def _row(
    name: str,
    cfg_scale: float,
    flow_shift: float,
    *,
    steps: int = 50,
    allowed: tuple[int, ...] | None = None,
    step_distilled: bool = False,
    sparse: bool = False,
    released: bool = True,
) -> Variant15:
    resolution, task = name.split("_")[:2]
    return Variant15(
        name,
        resolution,
        Task(task),
        cfg_scale,
        flow_shift,
        default_steps=steps,
        allowed_steps=allowed,
        cfg_distilled=name.endswith(("_distilled", "_distilled_sparse")) and not step_distilled,
        step_distilled=step_distilled,
        sparse_attention=sparse,
        released=released,
    )


_FIFTY = (50,)
VARIANTS: dict[str, Variant15] = {
    v.name: v
    for v in [
        _row("480p_t2v", 6.0, 5.0),
        _row("480p_i2v", 6.0, 5.0),
        _row("720p_t2v", 6.0, 9.0),
        _row("720p_i2v", 6.0, 7.0),
        _row("480p_t2v_distilled", 1.0, 5.0, allowed=_FIFTY),
        _row("480p_i2v_distilled", 1.0, 5.0, allowed=_FIFTY),
        _row("720p_t2v_distilled", 1.0, 9.0, allowed=_FIFTY, released=False),
        _row("720p_i2v_distilled", 1.0, 7.0, allowed=_FIFTY),
        _row("720p_t2v_distilled_sparse", 1.0, 9.0, allowed=_FIFTY, sparse=True, released=False),
        _row("720p_i2v_distilled_sparse", 1.0, 7.0, allowed=_FIFTY, sparse=True),
        _row("480p_i2v_step_distilled", 1.0, 7.0, steps=12, allowed=(4, 8, 12), step_distilled=True),
    ]
}
"""Every 1.5 base transformer of the official model table (the super-resolution ones: `SR_VARIANTS`)."""


def variant(name: str) -> Variant15:
    """A variant by official name (`480p_t2v`) or preset (`hunyuan-video-1.5-480p-t2v`)."""
    by_preset = {v.preset: v for v in VARIANTS.values()}
    found = VARIANTS.get(name) or by_preset.get(name)
    if found is None:
        if any(name in (v.name, v.preset) for v in SR_VARIANTS.values()):
            raise ValueError(
                f"{name!r} is a super-resolution transformer, not a base model: pick a base variant "
                "and set the super-resolution stage to its resolution (720p or 1080p)"
            )
        raise ValueError(f"unknown HunyuanVideo-1.5 variant {name!r}; known: {', '.join(VARIANTS)}")
    return found


def variant_from_official_folder(folder_name: str) -> Variant15:
    """The variant of an official `ckpts/transformer/<folder_name>/` (the folder name is the version)."""
    return variant(folder_name)


def variant_from_diffusers_config(
    transformer_config: dict[str, object], guider_config: dict[str, object] | None = None
) -> Variant15:
    """The variant of a diffusers folder from its `transformer/` and `guider/` config.json.

    The transformer's `target_size` (640 / 960), `task_type` and `use_meanflow` give resolution,
    task and step distillation; a guider `guidance_scale` of 1 marks the CFG-distilled models
    (their transformer configs are the same as the base models').
    """
    sizes = {base: res for res, base in BUCKET_BASE_SIZE.items()}
    target = transformer_config.get("target_size", 640)
    if target not in sizes:
        raise ValueError(f"transformer config target_size={target}: expected one of {sorted(sizes)}")
    name = f"{sizes[target]}_{transformer_config.get('task_type', 'i2v')}"  # type: ignore[index]
    if transformer_config.get("use_meanflow"):
        name += "_step_distilled"
    elif guider_config is not None and float(guider_config.get("guidance_scale", 6.0)) <= 1.0:  # type: ignore[arg-type]
        name += "_distilled"
    return variant(name)


@functools.cache
def generate_crop_size_list(
    base_size: int, stride: int = BUCKET_STRIDE, max_ratio: float = BUCKET_MAX_RATIO
) -> tuple[tuple[int, int], ...]:
    """The official bucket list (`hvbatch.images.crop_size_list`); each pair is `(height, width)`."""
    return crop_size_list(base_size, stride, max_ratio)


def parse_aspect_ratio(aspect_ratio: str) -> tuple[int, int]:
    """`"W:H"` -> `(width, height)`, positive integers as the official code requires."""
    parts = aspect_ratio.split(":")
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ValueError(
            f"aspect_ratio={aspect_ratio!r}: write it width:height in positive integers, e.g. 16:9"
        )
    return int(parts[0]), int(parts[1])


def bucket_for(aspect_ratio: str | tuple[int, int], resolution: str) -> tuple[int, int]:
    """`(height, width)` of the official bucket closest to `aspect_ratio` at `resolution`.

    `aspect_ratio` is `"W:H"` (text-to-video) or an image's `(width, height)`. Closest means the
    smallest |bucket h/w (rounded to 5 places) - H/W|, the first in the list on a tie.
    """
    if resolution not in BUCKET_BASE_SIZE:
        raise ValueError(f"resolution={resolution!r}: HunyuanVideo-1.5 has {' and '.join(BUCKET_BASE_SIZE)}")
    width, height = parse_aspect_ratio(aspect_ratio) if isinstance(aspect_ratio, str) else aspect_ratio
    buckets = generate_crop_size_list(BUCKET_BASE_SIZE[resolution])
    return closest_bucket(width, height, buckets, IMAGE_SIZING.closest)


def _nearest_multiples(value: int, multiple: int) -> str:
    low = max(multiple, value // multiple * multiple)
    return f"{low} or {low + multiple}" if low < value else f"{low}"


def check_size(height: int, width: int, num_frames: int, *, resolution: str | None = None) -> None:
    """ValueError unless the 1.5 VAE takes `height x width x num_frames`; names what to use instead."""
    problems = [
        f"{name}={value} is not a positive multiple of {SPATIAL_MULTIPLE} (the 1.5 VAE downsamples 16x; "
        f"nearest: {_nearest_multiples(value, SPATIAL_MULTIPLE)})"
        for name, value in (("height", height), ("width", width))
        if value < SPATIAL_MULTIPLE or value % SPATIAL_MULTIPLE
    ]
    if num_frames < 1 or (num_frames - 1) % TEMPORAL_RATIO:
        low = max(1, (num_frames - 1) // TEMPORAL_RATIO * TEMPORAL_RATIO + 1)
        choices = f"{low} or {low + TEMPORAL_RATIO}" if low < num_frames else f"{low}"
        problems.append(f"num_frames={num_frames} is not of the form 4k+1 (nearest: {choices}; default 121)")
    if not problems:
        return
    if resolution is not None and resolution in BUCKET_BASE_SIZE and height > 0 and width > 0:
        bucket_h, bucket_w = bucket_for((width, height), resolution)
        problems.append(
            f"the official {resolution} bucket for this aspect ratio is {bucket_h}x{bucket_w} (h x w)"
        )
    raise ValueError("invalid HunyuanVideo-1.5 video size: " + "; ".join(problems))


SR_BUCKET_BASE_SIZE = {"480p": 640, "720p": 960, "1080p": 1440}
"""The official SR pipeline's `SizeMap` (bucket base size of each resolution)."""
SR_NONE = "none"


@dataclass(frozen=True)
class SRVariant15:
    """A released super-resolution transformer and its upsampler, as the official SR pipeline runs them.

    Sources: `hyvideo/commons/__init__.py` `SR_PIPELINE_CONFIGS` and `TRANSFORMER_VERSION_TO_SR_VERSION`,
    `hyvideo/pipelines/hunyuan_video_sr_pipeline.py` (`noise_scale = 0.7`, the condition drop
    `t < 1000 * noise_scale`, `BucketMap`), the README's inference table (steps 6 and 8).
    """

    name: str
    """The official folder under `ckpts/transformer/` and `ckpts/upsampler/`."""
    resolution: str
    """The output resolution (`720p`, `1080p`)."""
    base_resolution: str
    """The resolution of the base video it takes (`480p`, `720p`)."""
    default_steps: int
    upsampler_class: str
    """The official module the `upsampler/<name>/` folder holds (chosen by `"720p" in name`)."""
    flow_shift: float = 2.0
    cfg_scale: float = 1.0
    noise_strength: float = 0.7
    """The upsampled low-resolution latents are noised to t = 1000 * noise_strength."""
    embedded_guidance_scale: float | None = None

    @property
    def preset(self) -> str:
        return "hunyuan-video-1.5-" + self.name.replace("_", "-")

    @property
    def allowed_steps(self) -> tuple[int, ...]:
        return (self.default_steps,)

    @property
    def condition_drop_timestep(self) -> float:
        """Steps at timesteps below this run with the low-resolution condition zeroed."""
        return 1000.0 * self.noise_strength

    def check_steps(self, num_steps: int) -> None:
        """ValueError unless `num_steps` is the step count this model was distilled for."""
        if num_steps != self.default_steps:
            raise ValueError(
                f"{self.preset} runs {self.default_steps} steps, not {num_steps}: it is step-distilled "
                f"(official README: {self.base_resolution}->{self.resolution} SR, {self.default_steps} "
                f"steps); leave the super-resolution steps at {self.default_steps}"
            )


SR_VARIANTS: dict[str, SRVariant15] = {
    v.name: v
    for v in [
        SRVariant15("720p_sr_distilled", "720p", "480p", 6, "SRTo720pUpsampler"),
        SRVariant15("1080p_sr_distilled", "1080p", "720p", 8, "SRTo1080pUpsampler"),
    ]
}


def sr_variant(name: str) -> SRVariant15:
    """An SR variant by output resolution (`720p`), official name (`720p_sr_distilled`) or preset."""
    for found in SR_VARIANTS.values():
        if name in (found.name, found.resolution, found.preset):
            return found
    known = ", ".join(f"{v.resolution} ({v.name})" for v in SR_VARIANTS.values())
    raise ValueError(f"unknown HunyuanVideo-1.5 super-resolution {name!r}; known: {SR_NONE}, {known}")


def sr_variant_for_base(base: Variant15, super_resolution: str) -> SRVariant15 | None:
    """The SR stage `super_resolution` (`none`, `720p`, `1080p`) after `base`, checked.

    The official pairing (`TRANSFORMER_VERSION_TO_SR_VERSION`): every 480p model goes to 720p, every
    720p model to 1080p; the SR pipeline's bucket map only knows that base resolution.
    """
    if super_resolution == SR_NONE:
        return None
    sr = sr_variant(super_resolution)
    if base.resolution != sr.base_resolution:
        fits = next(v.resolution for v in SR_VARIANTS.values() if v.base_resolution == base.resolution)
        raise ValueError(
            f"super_resolution={super_resolution!r} takes a {sr.base_resolution} base video, but "
            f"{base.preset} makes {base.resolution}: use super_resolution={fits!r} (or {SR_NONE!r})"
        )
    return sr


def sr_target_size(height: int, width: int, sr: SRVariant15) -> tuple[int, int]:
    """`(height, width)` of the SR output for a base video of `height x width` (official `BucketMap`).

    The base size must be one of the base resolution's buckets; the output is the SR resolution's
    bucket whose width/height is closest to the base's (the first in the list on a tie).
    """
    base_buckets = generate_crop_size_list(SR_BUCKET_BASE_SIZE[sr.base_resolution])
    if (width, height) not in base_buckets:
        near_h, near_w = bucket_for((width, height), sr.base_resolution)
        raise ValueError(
            f"super-resolution to {sr.resolution} takes a {sr.base_resolution} bucket size; "
            f"{height}x{width} (h x w) is not one (the nearest by aspect ratio is {near_h}x{near_w}): "
            f"leave height/width to the preset's bucket, or set super_resolution={SR_NONE!r}"
        )
    ratio = float(width) / float(height)
    buckets = generate_crop_size_list(SR_BUCKET_BASE_SIZE[sr.resolution])
    distances = [abs(float(w) / float(h) - ratio) for w, h in buckets]
    out_w, out_h = buckets[distances.index(min(distances))]
    return out_h, out_w


TRANSFORMER_HIDDEN = 2048
TRANSFORMER_DOUBLE_BLOCKS = 54


def latent_grid(height: int, width: int, num_frames: int) -> tuple[int, int, int]:
    """`(T, H, W)` latent (= token, patch 1) grid of a video: 4x in time (causal), 16x in space."""
    return ((num_frames - 1) // TEMPORAL_RATIO + 1, height // SPATIAL_MULTIPLE, width // SPATIAL_MULTIPLE)


def transformer_pass_flops(image_tokens: int, condition_tokens: int = 0) -> float:
    """Matmul FLOPs of one pass of the released 8.3B transformer (base and SR alike).

    Per double block and token: q, k, v, out projections and the 4x MLP, `2 * 12 * hidden^2`; joint
    attention over all `L` tokens, `4 * L * hidden` per token. Embeddings, modulation, norms and
    the token refiner are left out (under 1% at video lengths).
    """
    tokens = image_tokens + condition_tokens
    per_block = 24 * TRANSFORMER_HIDDEN**2 * tokens + 4 * TRANSFORMER_HIDDEN * tokens * tokens
    return float(TRANSFORMER_DOUBLE_BLOCKS * per_block)


@dataclass(frozen=True)
class StageWork:
    """The transformer work of one stage of one video: what the planner and shard costs count."""

    stage: str
    """`base` or `sr`."""
    variant: str
    height: int
    width: int
    grid: tuple[int, int, int]
    """Latent `(T, H, W)`; the image tokens are its product (patch 1)."""
    steps: int
    passes_per_step: int
    """2 with true CFG (`[negative, positive]` in one batch), else 1."""

    @property
    def tokens(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]

    @property
    def transformer_passes(self) -> int:
        return self.steps * self.passes_per_step

    def flops(self, condition_tokens: int = 0) -> float:
        return self.transformer_passes * transformer_pass_flops(self.tokens, condition_tokens)


def video_stages(
    base: Variant15,
    height: int,
    width: int,
    num_frames: int,
    *,
    num_steps: int | None = None,
    super_resolution: str = SR_NONE,
) -> tuple[StageWork, ...]:
    """The stages one video runs: the base pass at `height x width`, then (unless `none`) the SR
    pass at its bucket (`sr_target_size`), with their token grids, steps and passes per step."""
    steps = base.default_steps if num_steps is None else num_steps
    stages = [
        StageWork(
            "base", base.name, height, width, latent_grid(height, width, num_frames), steps,
            2 if base.cfg_scale > 1.0 else 1,
        )
    ]  # fmt: skip
    sr = sr_variant_for_base(base, super_resolution)
    if sr is not None:
        sr_height, sr_width = sr_target_size(height, width, sr)
        stages.append(
            StageWork(
                "sr", sr.name, sr_height, sr_width, latent_grid(sr_height, sr_width, num_frames),
                sr.default_steps, 2 if sr.cfg_scale > 1.0 else 1,
            )
        )  # fmt: skip
    return tuple(stages)
