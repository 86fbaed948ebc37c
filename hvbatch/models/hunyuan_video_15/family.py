"""HunyuanVideo-1.5 text-to-video, registered as a model family (no torch imported here).

Presets: one per released variant with a preset (`settings.PRESET_VARIANTS`), each sampling with
its official defaults (`variants.py`), and `tiny-1.5`. The loaders and the doctor checks import the
torch-side modules when they are called.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from hvbatch.models.family import Components, ModelFamily, WeightReport, register_family
from hvbatch.models.hunyuan_video_15 import layout
from hvbatch.models.hunyuan_video_15.config import (
    DIFFUSERS_CLASS_NAME,
    OFFICIAL_CLASS_NAME,
    HunyuanVideo15TransformerConfig,
)
from hvbatch.models.hunyuan_video_15.figures import (
    GEOMETRY,
    SECONDS_PER_TOKEN_STEP,
    STEP_CACHE,
    memory_figures,
)
from hvbatch.models.hunyuan_video_15.settings import (
    RELEASED_PRESETS,
    TINY_PRESET,
    TextEncoderConfig15,
    preset_variant,
)
from hvbatch.models.hunyuan_video_15.variants import (
    DEFAULT_ASPECT_RATIO,
    DEFAULT_NUM_FRAMES,
    Task,
    bucket_for,
)

if TYPE_CHECKING:
    from pathlib import Path

    import torch

    from hvbatch.config import ModelConfig, SamplingConfig

NAME = "hunyuan-video-1.5"
TINY_SAMPLING: dict[str, Any] = {
    "height": 64,
    "width": 96,
    "num_frames": 9,
    "num_inference_steps": 4,
    "guidance_scale": 1.0,
    "cfg_scale": 1.0,
    "flow_shift": 5.0,
}
"""tiny-1.5: a video a CPU makes in seconds (raise `sampling.cfg_scale` for true CFG)."""


def _load(model: ModelConfig, device: torch.device) -> Components:
    from hvbatch.models.hunyuan_video_15.components import load_components

    return load_components(model, device)


def _check_weights(model: ModelConfig) -> list[WeightReport]:
    from hvbatch.models.hunyuan_video_15.weights_check import check_weights

    return check_weights(model)


def _example_conditioning(config: Any, batch: int, text_tokens: int, device: torch.device) -> Any:
    from hvbatch.models.hunyuan_video_15.conditioning import HunyuanVideo15Conditioning

    return HunyuanVideo15Conditioning.example(config, batch, text_tokens, device)


def _detect(root: Path) -> str | None:
    return layout.detect(root)


def _sampling_defaults(preset: str) -> Mapping[str, Any]:
    """The official defaults of the preset's variant: steps, CFG, shift, 121 frames, the 16:9 bucket."""
    found = preset_variant(preset)
    if found is None:
        return TINY_SAMPLING
    height, width = bucket_for(DEFAULT_ASPECT_RATIO, found.resolution)
    return {
        "height": height,
        "width": width,
        "num_frames": DEFAULT_NUM_FRAMES,
        "num_inference_steps": found.default_steps,
        "guidance_scale": 1.0,  # no 1.5 variant embeds a guidance scale
        "cfg_scale": found.cfg_scale,
        "flow_shift": found.flow_shift,
    }


def _config_problems(model: ModelConfig) -> list[str]:
    """The architecture's consistency, the encoder settings' ranges, what this family cannot run."""
    problems = []
    try:
        model.transformer.validate()
    except ValueError as err:
        problems.append(f"model.transformer: {err}")
    encoder = model.text_encoder
    for name in ("max_text_tokens", "glyph_max_tokens"):
        if getattr(encoder, name) < 1:
            problems.append(f"model.text_encoder.{name}={getattr(encoder, name)} must be >= 1")
    if encoder.hidden_state_skip_layer < 0:
        problems.append(
            f"model.text_encoder.hidden_state_skip_layer={encoder.hidden_state_skip_layer} must be >= 0"
        )
    if encoder.crop_start is not None and encoder.crop_start < 0:
        problems.append(f"model.text_encoder.crop_start={encoder.crop_start} must be >= 0 or null")
    if model.text_encoder_2_path:
        problems.append(
            f"model.text_encoder_2_path={model.text_encoder_2_path}: HunyuanVideo-1.5 reads both its text "
            "encoders from model.text_encoder_path (a folder of either layout); leave it unset"
        )
    if model.transformer.is_super_resolution:
        problems.append(
            "model.transformer.in_channels: a super-resolution transformer is not a base model; "
            "use a base preset"
        )
    return problems


def _run_problems(model: ModelConfig) -> list[str]:
    """The image-to-video variants: their input image is not wired to 1.5 yet."""
    found = preset_variant(model.name)
    if found is not None and found.task is Task.IMAGE_TO_VIDEO:
        return [
            f"model={model.name} is an image-to-video model ({found.name}): hvbatch does not give 1.5 models "
            "an input image yet; use a text-to-video preset (hunyuan-video-1.5-480p-t2v, -720p-t2v, "
            "-480p-t2v-distilled)"
        ]
    return []


def _sampling_problems(model: ModelConfig, sampling: SamplingConfig) -> list[str]:
    """A distilled variant's fixed step counts."""
    found = preset_variant(model.name)
    if found is None:
        return []
    try:
        found.check_steps(sampling.num_inference_steps)
    except ValueError as err:
        return [f"sampling.num_inference_steps: {err}"]
    return []


FAMILY = register_family(
    ModelFamily(
        name=NAME,
        description="HunyuanVideo-1.5 (8.3B, Qwen2.5-VL + byT5 glyph text encoders, 16x VAE)",
        presets=(*RELEASED_PRESETS, TINY_PRESET),
        config_sections={"transformer": HunyuanVideo15TransformerConfig, "text_encoder": TextEncoderConfig15},
        conditioning="hvbatch.models.hunyuan_video_15.conditioning:HunyuanVideo15Conditioning",
        geometry=GEOMETRY,
        load=_load,
        check_weights=_check_weights,
        detect=_detect,
        memory=memory_figures,
        seconds_per_token_step=SECONDS_PER_TOKEN_STEP,
        step_cache=STEP_CACHE,
        example_conditioning=_example_conditioning,
        sampling_defaults=_sampling_defaults,
        config_problems=_config_problems,
        sampling_problems=_sampling_problems,
        run_problems=_run_problems,
        sampling_convention="hvbatch.models.hunyuan_video_15.sampling",
        vae_tiling={"temporal": False, "blend": "sequential"},
        vae_defaults={"tile_latent_size": 16, "tile_latent_overlap": 2},
        markers=(
            NAME,
            *RELEASED_PRESETS,
            TINY_PRESET,
            OFFICIAL_CLASS_NAME,
            DIFFUSERS_CLASS_NAME,
            "AutoencoderKLHunyuanVideo15",
            "HunyuanVideo15Pipeline",
            "Qwen2.5-VL",
            "Glyph-SDXL-v2",
            "byT5",
        ),
    )
)
