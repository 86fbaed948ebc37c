"""HunyuanVideo 1.0, registered as a model family (no torch imported here).

Its flavors: text-to-video (`hunyuan-video-t2v-720p`, `tiny`) and HunyuanVideo-I2V, the
image-to-video model of the same architecture (`hunyuan-video-i2v-720p`, `tiny-i2v`; the
`token_replace` form). One family: the variants share the transformer class (an
`image_condition_type` field of its config, as in diffusers' one class), the VAE, CLIP-L, the
loaders and figures; what differs is config (the architecture field, the encoder settings) and
what the preset's config selects (the LLaVA encoder with the image, the I2V checkpoint folders,
the sampling defaults), as 1.5's variants are presets of one family. The loaders and the doctor
checks import the torch-side modules when they are called.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from hvbatch.models.family import Components, ModelFamily, WeightReport, register_family
from hvbatch.models.hunyuan_video import layout
from hvbatch.models.hunyuan_video.config import (
    I2V_PRESET,
    RELEASED_PRESET,
    TINY_I2V_PRESET,
    TINY_PRESET,
    TextEncoderConfig,
    TransformerConfig,
)
from hvbatch.models.hunyuan_video.figures import (
    GEOMETRY,
    I2V_SAMPLING_DEFAULTS,
    SAMPLING_DEFAULTS,
    SECONDS_PER_TOKEN_STEP,
    STEP_CACHE,
    memory_figures,
)

if TYPE_CHECKING:
    from pathlib import Path

    import torch

    from hvbatch.config import ModelConfig

NAME = "hunyuan-video-1.0"
BOUNDED_AT_LEAST_1 = ("max_text_tokens", "clip_max_tokens", "image_embed_interleave")
BOUNDED_AT_LEAST_0 = ("hidden_state_skip_layer", "crop_start_video", "crop_start_image", "crop_start_i2v")
IMAGE_TO_VIDEO_PRESETS = (I2V_PRESET, TINY_I2V_PRESET)


def _load(model: ModelConfig, device: torch.device) -> Components:
    from hvbatch.models.hunyuan_video.components import load_components

    return load_components(model, device)


def _check_weights(model: ModelConfig) -> list[WeightReport]:
    from hvbatch.models.hunyuan_video.weights_check import check_weights

    return check_weights(model)


def _example_conditioning(config: Any, batch: int, text_tokens: int, device: torch.device) -> Any:
    from hvbatch.models.hunyuan_video.conditioning import TextConditioning

    return TextConditioning.example(config, batch, text_tokens, device)


def _detect(root: Path) -> str | None:
    return layout.detect(root)


def _sampling_defaults(preset: str) -> Mapping[str, Any]:
    return I2V_SAMPLING_DEFAULTS if preset in IMAGE_TO_VIDEO_PRESETS else SAMPLING_DEFAULTS


def _config_problems(model: ModelConfig) -> list[str]:
    """The architecture's consistency and the encoder settings' ranges (keys named as in the tree)."""
    problems = []
    try:
        model.transformer.validate()
    except ValueError as err:
        problems.append(f"model.transformer: {err}")
    encoder = model.text_encoder
    for name in (*BOUNDED_AT_LEAST_1, *BOUNDED_AT_LEAST_0):
        value, low = getattr(encoder, name), 1 if name in BOUNDED_AT_LEAST_1 else 0
        if value is None and name.startswith("crop_start"):
            continue  # null: measured with the tokenizer
        if value is None or value < low:
            optional = " or null" if name.startswith("crop_start") else ""
            problems.append(f"model.text_encoder.{name}={value!r} must be >= {low}{optional}")
    return problems


def _sampling_problems(model: ModelConfig, sampling: Any) -> list[str]:
    image_to_video = getattr(model.transformer, "image_condition_type", None) is not None
    if image_to_video and sampling.num_frames < 2:
        return [
            f"num_frames={sampling.num_frames}: model={model.name} (HunyuanVideo-I2V) makes videos only, "
            "num_frames must be at least 5 (1 + 4k)"
        ]
    return []


FAMILY = register_family(
    ModelFamily(
        name=NAME,
        description="HunyuanVideo 1.0 (13B; text-to-video, and image-to-video HunyuanVideo-I2V; "
        "LLaVA-Llama-3 + CLIP-L encoders)",
        presets=(RELEASED_PRESET, TINY_PRESET, I2V_PRESET, TINY_I2V_PRESET),
        default_preset=RELEASED_PRESET,
        config_sections={"transformer": TransformerConfig, "text_encoder": TextEncoderConfig},
        conditioning="hvbatch.models.hunyuan_video.conditioning:TextConditioning",
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
        markers=(
            NAME,
            RELEASED_PRESET,
            I2V_PRESET,
            TINY_I2V_PRESET,
            layout.OFFICIAL_I2V_TEXT_ENCODER,
            layout.OFFICIAL_TRANSFORMER.name,
            "mp_rank_00",
            layout.DIFFUSERS_CLASS_NAME,
            "LLaVA",
            "llava",
            "Llama",
            "CLIP",
        ),
    )
)
