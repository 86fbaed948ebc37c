"""Model families: one registered spec per family, asked by every layer above `models/`.

A family (in the spirit of torchtitan's train specs, looked up by name, and diffusers' dispatch on a
checkpoint's `_class_name`) is a folder `hvbatch/models/<family>/` whose `family.py` calls
`register_family(ModelFamily(...))`. The registry finds those modules itself (any subpackage of
`hvbatch.models` with a `family.py`), so adding a family is one folder and one registration.

Everything the control plane needs (presets, config sections, geometry, token counts, memory and
cost figures, sampler defaults, checkpoint detection) is importable without torch: a family's
`family.py` keeps its torch-heavy loaders behind functions that import them when called.

Presets (flavors) are the YAML files in `configs/model/`; each names its family (`family:`), and
the family lists the presets it ships. `model=<preset>` picks both.
"""

from __future__ import annotations

import importlib
import importlib.resources
import os
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hvbatch.models.geometry import LatentGeometry

if TYPE_CHECKING:
    import torch

    from hvbatch.images import ImageSizing
    from hvbatch.models.protocols import PromptEncoder, StagedTransformer, VideoVae

# `hvbatch.config.ModelConfig` / `SamplingConfig`: not imported, the config tree imports this module.
ModelConfig = Any
SamplingConfig = Any

__all__ = [
    "Components",
    "ImageInput",
    "LatentGeometry",
    "MemoryFigures",
    "ModelFamily",
    "StepCacheFigures",
    "WeightReport",
    "available_presets",
    "default_preset",
    "detect_family",
    "families",
    "family_for_preset",
    "family_of",
    "folder_family_problem",
    "get_family",
    "model_folder_problem",
    "preset_path",
    "register_family",
    "replace_family",
]


@dataclass(frozen=True)
class MemoryFigures:
    """What the planner's per-GPU memory model needs to know about one model (numbers only)."""

    num_heads: int
    """Attention heads (Ulysses must divide them)."""
    hidden_size: int
    """Hidden size D (activations scale with it)."""
    num_params: int
    """All transformer parameters."""
    fp8_params: int = 0
    """Parameters the configured checkpoint stores in float8 (1 byte each), 0 for none."""
    fp8_words: str = ""
    """What the float8 weights are, in words (e.g. `fp8 block weights`); empty without them."""
    fp8_widest_input: int = 0
    """FP8 GEMMs: elements per token of the widest block linear's input (quantized to 1 byte)."""
    fp8_largest_weight: int = 0
    """FP8 without `_scaled_mm`: elements of the largest block linear weight (dequantized per call)."""
    activation_elements_per_token: int = 20
    """Compute-dtype elements per token per hidden channel live in the largest block's forward."""
    rope_float32_elements_per_token: int = 2
    """float32 elements per token per hidden channel (RoPE copies of q and k)."""
    text_tokens: int = 256
    """Conditioning tokens every rank holds besides its image tokens (replicated)."""
    encoder_params: int = 0
    """All text encoder parameters of the released weights (an image encoder declared in the
    family's `ImageInput` is added by the memory plan)."""
    encoder_words: str = ""
    """The encoders, in words (e.g. the model names)."""
    vae_params: int = 0
    """VAE parameters (encoder and decoder) of the released weights."""
    vae_decode_peak_gib_fp16: float = 0.0
    """Peak activations of the tiled VAE decode in float16 at the default tiles."""


@dataclass(frozen=True)
class StepCacheFigures:
    """What step caching knows about a family: TeaCache's rescale polynomial, published speedups."""

    teacache_coefficients: tuple[float, ...] | None
    """TeaCache's polynomial fitted for this model (highest degree first); None: TeaCache is refused."""
    expected_speedups: Mapping[str, tuple[tuple[float, float], ...]]
    """Per cache mode, (threshold, end-to-end speedup) points from published figures."""
    source: str
    """Where the speedups come from, in words (said beside every estimate)."""


def _preset_resolution(model: ModelConfig) -> str:
    return str(getattr(model, "resolution", None) or "")


@dataclass(frozen=True)
class ImageInput:
    """What a family that takes an input image (image-to-video) declares (`ModelFamily.image_input`).

    The control plane sizes, checks and costs a prompts file's `image` column by it; the pipeline
    hands each video's fitted image to `condition`.
    """

    sizing: ImageSizing
    """The bucket list, bucket rule and resize + centre crop (`hvbatch.images.ImageSizing`)."""
    resolution: Callable[[ModelConfig], str] = _preset_resolution
    """The bucket resolution a config samples at (a key of `sizing.base_sizes`, e.g. `480p`)."""
    min_side: int = 16
    """The least shorter side (pixels) of an input image; smaller ones are refused at submit."""
    encoder_params: int = 0
    """Parameters of the image encoder (SigLIP, or the vision tower of a multimodal text encoder).
    The memory plan adds them, and `image_tokens`, to the family's `MemoryFigures` (which should
    then not count them too)."""
    encoder_words: str = ""
    """The image encoder, in words."""
    image_tokens: int = 0
    """Conditioning tokens the image adds beside the text at every step (e.g. 729 for a SigLIP encoder)."""
    condition_channels: int = 0
    """Channels of the condition latents beside the noisy latents (1.5: 32 + a mask channel)."""
    encode_cost: float = 0.0
    """Cost units (image token x step) of encoding one image: image encoder and the first frame's
    VAE encode."""
    refusal: Callable[[ModelConfig], str | None] | None = None
    """Why a config of the family takes no image (e.g. a text-to-video preset of a family that has
    both), None when it does; None (the default): every config takes images."""
    condition: Callable[[Any, Any, Any, SamplingConfig], Any] | None = None
    """`(pipeline, video conditioning, images.InputImage, sampling)` -> the video conditioning with
    the image in it; None while the family's image-to-video sampling is not wired (such a video
    fails with a message saying so)."""

    def extra_cost(self, steps: Any) -> Any:
        """Cost a video with an image adds to its `tokens x steps`: its conditioning tokens at every
        step and the image's encoding (numbers or numpy arrays)."""
        return self.image_tokens * steps + self.encode_cost

    def condition_latent_bytes(self, geometry: LatentGeometry, height: int, width: int, frames: int) -> int:
        """float32 bytes of one video's condition latents (what the pipeline holds beside the noise)."""
        t, h, w = geometry.latent_shape(height, width, frames)[-3:]
        return int(self.condition_channels * t * h * w * 4)


@dataclass
class Components:
    """A loaded model: the three things the pipeline runs."""

    transformer: StagedTransformer
    vae: VideoVae
    text_encoder: PromptEncoder


@dataclass(frozen=True)
class WeightReport:
    """One `hvbatch doctor` line about the model files: `status` is ok, warn or fail."""

    check: str
    status: str
    detail: str
    fix: str = ""


def _no_problems(*_: object) -> list[str]:
    return []


def _no_defaults(_: str) -> Mapping[str, Any]:
    return {}


@dataclass(frozen=True)
class ModelFamily:
    """A model family: what it owns, as values and functions every layer can ask.

    Functions taking a `ModelConfig` read the family's own sections of it (`model.transformer`,
    `model.text_encoder`, typed by `config_sections`) and the generic fields (paths, dtypes).
    """

    name: str
    """Registered name, what `model.family` holds (e.g. in every preset of the family)."""
    description: str
    """The family in a few words, for messages."""
    presets: tuple[str, ...]
    """Its flavors: the presets in configs/model/ that belong to it."""
    config_sections: Mapping[str, type]
    """`model.<section>` -> the dataclass that types and validates it (its defaults are the
    family's), e.g. the architecture under `transformer` and the encoder settings under `text_encoder`."""
    conditioning: str
    """The conditioning class the encoders make and the transformer reads (`module:Class`)."""
    geometry: LatentGeometry
    """Latent channels, VAE ratios, patch, size multiple, latent scale and shift."""
    load: Callable[[ModelConfig, torch.device], Components]
    """Build the components: files of either checkpoint layout, or seeded random weights."""
    check_weights: Callable[[ModelConfig], list[WeightReport]]
    """`hvbatch doctor`'s checks of the model files (headers only, through the loaders' own checks)."""
    detect: Callable[[Path], str | None]
    """What a weights folder of this family holds, in words (e.g. `diffusers folder`), else None."""
    memory: Callable[[ModelConfig], MemoryFigures]
    """The memory model's figures for this config (parameter counts, activations, encoders, VAE)."""
    seconds_per_token_step: float
    """GPU-seconds per (image token x step) of one CFG branch on one GPU: the shard cost's unit
    when `batch.seconds_per_cost_unit` is not set."""
    step_cache: StepCacheFigures
    example_conditioning: Callable[[Any, int, int, torch.device], Any]
    """`(architecture config, batch, text tokens, device)` -> a conditioning of the model's shapes
    (values meaningless): what a compile warm-up runs before the first collective."""
    sampling_defaults: Callable[[str], Mapping[str, Any]] = _no_defaults
    """`sampling.*` defaults of a preset (variant): merged over the built-in defaults."""
    config_problems: Callable[[ModelConfig], list[str]] = _no_problems
    """What is wrong with the family's sections of a resolved config (each naming its key)."""
    sampling_problems: Callable[[ModelConfig, SamplingConfig], list[str]] = _no_problems
    """What a variant refuses in a video's sampling settings (e.g. a fixed step count)."""
    run_problems: Callable[[ModelConfig], list[str]] = _no_problems
    """What the family cannot run yet for this config (e.g. a variant whose inputs are not wired):
    `generate` and `submit` refuse it before writing anything; `plan` and `doctor` still answer."""
    sampling_convention: str | None = None
    """`module` whose `initial_noise`, `flow_schedule` and `combine_cfg` (`protocols.SamplingConvention`)
    the sampler uses instead of its defaults (the family's reference code draws noise, rounds the
    schedule or combines CFG differently); None: the defaults."""
    vae_tiling: Mapping[str, Any] = field(default_factory=dict)
    """Fixed `VaeTilingConfig` fields of the family's VAE (e.g. spatial-only tiles): over `vae.*`."""
    vae_defaults: Mapping[str, Any] = field(default_factory=dict)
    """`vae.*` defaults of the family (tile sizes in its latent cells): merged over the built-in ones."""
    default_preset: str | None = None
    """Set by the one family whose preset is hvbatch's default."""
    image_input: ImageInput | None = None
    """How the family takes an input image (image-to-video); None: it takes none, and a prompts
    file with images is refused at submit."""
    markers: tuple[str, ...] = field(default=())
    """Words only this family's folder may write: checkpoint folder and file names, encoder names.
    `tests/test_layering.py` refuses them (and the family's class names) anywhere else in hvbatch."""

    def section_defaults(self, section: str) -> Any:
        return self.config_sections[section]()

    def conditioning_type(self) -> type:
        module, _, name = self.conditioning.partition(":")
        return getattr(importlib.import_module(module), name)  # type: ignore[no-any-return]

    def sampler_convention(self) -> Any:
        """The `SamplingConvention` module, or None for the sampler's defaults."""
        return None if self.sampling_convention is None else importlib.import_module(self.sampling_convention)

    def attention_heads(self, model: ModelConfig) -> int:
        return self.memory(model).num_heads

    def no_images_reason(self, model: ModelConfig) -> str | None:
        """Why this config cannot take input images, or None when it can."""
        if self.image_input is None:
            return (
                f"model={model.name} is a {self.description} preset, which takes no input image; use an "
                "image-to-video preset, or drop the image column for text-to-video"
            )
        return None if self.image_input.refusal is None else self.image_input.refusal(model)


_REGISTRY: dict[str, ModelFamily] = {}
_discovered = False
FAMILY_MODULES_VAR = "HVBATCH_FAMILY_MODULES"
"""Comma-separated modules imported after hvbatch's own families: each may register (or, with
`replace_family`, extend) a family from outside the package. Jobs inherit it from `submit`."""


def register_family(family: ModelFamily) -> ModelFamily:
    """Add a family; its name and presets must be new (called once, by the family's `family.py`)."""
    if family.name in _REGISTRY:
        raise ValueError(f"model family {family.name!r} is registered twice")
    for other in _REGISTRY.values():
        shared = sorted(set(other.presets) & set(family.presets))
        if shared:
            raise ValueError(f"presets {shared} are claimed by families {other.name!r} and {family.name!r}")
        if other.default_preset and family.default_preset:
            raise ValueError(f"families {other.name!r} and {family.name!r} both claim the default preset")
    if family.default_preset is not None and family.default_preset not in family.presets:
        raise ValueError(f"{family.name}: default preset {family.default_preset!r} is not one of its presets")
    _REGISTRY[family.name] = family
    return family


def replace_family(family: ModelFamily) -> ModelFamily:
    """Put `family` in place of the registered family of its name (an out-of-tree module's way to
    extend one, e.g. a test double that takes images)."""
    _discover()
    if family.name not in _REGISTRY:
        raise ValueError(f"no registered model family {family.name!r} to replace")
    _REGISTRY[family.name] = family
    return family


def _discover() -> None:
    """Import every `hvbatch/models/<folder>/family.py` (once); each registers its family."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    import hvbatch.models as models

    for info in sorted(pkgutil.iter_modules(models.__path__), key=lambda i: i.name):
        folder = Path(str(getattr(info.module_finder, "path", ""))) / info.name
        if info.ispkg and (folder / "family.py").is_file():
            importlib.import_module(f"hvbatch.models.{info.name}.family")
    for module in filter(None, os.environ.get(FAMILY_MODULES_VAR, "").split(",")):
        importlib.import_module(module.strip())  # out-of-tree families (and test doubles)


def families() -> list[ModelFamily]:
    """Every registered family, by name."""
    _discover()
    return [_REGISTRY[name] for name in sorted(_REGISTRY)]


def get_family(name: str) -> ModelFamily:
    _discover()
    if name not in _REGISTRY:
        known = ", ".join(sorted(_REGISTRY)) or "none"
        raise ValueError(f"unknown model family {name!r}; registered families: {known}")
    return _REGISTRY[name]


def family_of(model: ModelConfig) -> ModelFamily:
    """The family of a resolved `model` config section (`model.family`)."""
    return get_family(model.family)


def _preset_dir() -> Path:
    return Path(str(importlib.resources.files("hvbatch.configs"))) / "model"


def available_presets() -> list[str]:
    """Every preset name (the YAML files of configs/model/)."""
    return sorted(p.stem for p in _preset_dir().glob("*.yaml"))


def preset_path(name: str) -> Path:
    """The preset's YAML file; only names `available_presets` lists are resolved, never a path."""
    if name not in available_presets():
        raise ValueError(
            f"unknown model preset {name!r}; available presets: {', '.join(available_presets())}"
        )
    return _preset_dir() / f"{name}.yaml"


def family_for_preset(preset: str) -> ModelFamily:
    """The family a preset names (its YAML's `family:`), which must list the preset as its own."""
    import yaml  # here: the models import this module on a machine that may lack pyyaml

    path = preset_path(preset)
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    name = data.get("family") if isinstance(data, dict) else None
    if not isinstance(name, str):
        raise ValueError(f"model preset {preset!r} ({path}) names no family: add `family: <name>` to it")
    family = get_family(name)
    if preset not in family.presets:
        raise ValueError(
            f"model preset {preset!r} says family {name!r}, but that family's presets are "
            f"{', '.join(family.presets)}: add it there or fix the preset's `family:`"
        )
    return family


def default_preset() -> str:
    """hvbatch's default preset (the one a registered family claims)."""
    claimed = [f.default_preset for f in families() if f.default_preset]
    if not claimed:
        raise ValueError("no registered model family claims the default preset; pass model=<preset>")
    return claimed[0]


def detect_family(path: str | Path) -> tuple[ModelFamily, str] | None:
    """The family whose checkpoint folder `path` is, with what was found in words; None if none."""
    root = Path(path).expanduser()
    for family in families():
        found = family.detect(root)
        if found is not None:
            return family, found
    return None


def folder_family_problem(model: ModelConfig) -> str | None:
    """Why `model.path` cannot serve the configured family: it holds another family's checkpoint
    (None when it is this family's, unrecognised, or not used)."""
    if not model.path or model.random_weights:
        return None
    found = detect_family(model.path)
    if found is None or found[0].name == model.family:
        return None
    other, words = found
    return (
        f"model.path={model.path} holds a {other.description} checkpoint ({words}), but "
        f"model={model.name} is a {get_family(model.family).description} preset: use one of "
        f"{', '.join(other.presets)} (model=<preset>), or the weights of model={model.name}"
    )


def model_folder_problem(model: ModelConfig) -> str | None:
    """Why the configured model cannot run, from its config and its folder's names and config files
    only: what the family cannot run yet (`run_problems`), a `model.path` of another family's
    checkpoint, or of none any registered family recognises (None when all is well). What `submit`
    refuses before writing anything."""
    problems = get_family(model.family).run_problems(model)
    if problems:
        return "; ".join(problems)
    problem = folder_family_problem(model)
    if problem is not None or not model.path or model.random_weights:
        return problem
    root = Path(model.path).expanduser()
    if detect_family(root) is None:
        known = "; ".join(f"{f.description}: {', '.join(f.presets)}" for f in families())
        return (
            f"model.path={model.path} is not a checkpoint folder of any model family hvbatch knows "
            f"({'it does not exist' if not root.exists() else 'no layout of theirs matches'}); point it at "
            f"the official or diffusers folder of the model of model={model.name} (families: {known})"
        )
    return None
