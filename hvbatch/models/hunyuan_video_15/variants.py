"""HunyuanVideo-1.5's released checkpoints and their official defaults, and its size buckets.

Plain Python (no torch): the control plane checks steps and sizes with it.

Sources (Tencent-Hunyuan/HunyuanVideo-1.5): `hyvideo/commons/__init__.py` `PIPELINE_CONFIGS` (CFG
scale, flow shift, embedded guidance None, the step-distilled model's 12 steps), the README's model
table ("the cfg distilled model ... must use 50 steps"; the step-distilled model "8 or 12 steps
(recommended)", "4 steps ... slightly reduced quality"), `generate.py` (121 frames, 24 fps, 16:9,
50 steps), the pipeline's `target_size_config` (480p: base 640, 720p: base 960, stride 16) and
`hyvideo/utils/data_utils.py` (the crop-size list and the closest ratio).
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
"""Every 1.5 transformer of the official model table (the super-resolution ones are a separate
pipeline and not listed)."""


def variant(name: str) -> Variant15:
    """A variant by official name (`480p_t2v`) or preset (`hunyuan-video-1.5-480p-t2v`)."""
    by_preset = {v.preset: v for v in VARIANTS.values()}
    found = VARIANTS.get(name) or by_preset.get(name)
    if found is None:
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
