"""Load HunyuanVideo-1.5 transformer checkpoints of both layouts, by their own names.

Layouts (detected from the folder's `config.json`):
- official: `transformer/<version>/` (e.g. `480p_t2v`, `720p_i2v_distilled`, `480p_i2v_step_distilled`,
  the super-resolution `720p_sr_distilled` and `1080p_sr_distilled`)
  with a `HunyuanVideo_1_5_DiffusionTransformer` config.json and `diffusion_pytorch_model.safetensors`
  (or shards with their `.index.json`); also the checkpoint root holding `transformer/`, with
  `version=` naming the folder when it holds several;
- diffusers: `transformer/` of a `HunyuanVideo-1.5-Diffusers-*` model with a
  `HunyuanVideo15Transformer3DModel` config.json and safetensors (sharded or not); also the model root.

The architecture and the variant facts (MeanFlow, input channels, resolution, task) come from the
checkpoint's config.json. Loading is strict: every tensor the model has, with its shape, and
nothing else, else a ValueError naming the missing / unexpected / mis-shaped keys. The model is
built on the meta device and each tensor goes once into its parameter (safetensors never unpickle).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from hvbatch.models.hunyuan_video_15.config import (
    DIFFUSERS_CLASS_NAME,
    OFFICIAL_CLASS_NAME,
    HunyuanVideo15TransformerConfig,
)
from hvbatch.models.hunyuan_video_15.transformer import HunyuanVideo15Transformer
from hvbatch.models.hunyuan_video_15.transformer_names import name_rule
from hvbatch.models.state_dict_check import report_mismatch

WEIGHTS = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX = "diffusion_pytorch_model.safetensors.index.json"
OFFICIAL, DIFFUSERS = "official", "diffusers"
_OTHER_FAMILIES = {
    "HunyuanVideoTransformer3DModel": "a HunyuanVideo 1.0 transformer (use a 1.0 preset)",
    "HYVideoDiffusionTransformer": "a HunyuanVideo 1.0 transformer (use a 1.0 preset)",
}
_TARGET_SIZE_RESOLUTION = {640: "480p", 960: "720p", 1440: "1080p"}
_RESOLUTIONS = ("480p", "720p", "1080p")


@dataclass(frozen=True)
class CheckpointFacts:
    """What a checkpoint's config says about its variant."""

    layout: str
    version: str | None
    """The official folder name (`480p_t2v`, ...), None for the diffusers layout."""
    use_meanflow: bool
    in_channels: int
    resolution: str | None
    """`480p` / `720p` (`1080p` for an SR model): official `ideal_resolution` (else the folder name),
    diffusers `target_size` 640 / 960 / 1440."""
    task: str | None
    """`t2v` / `i2v`: official `ideal_task`, diffusers `task_type` (its conversion script writes
    `i2v` for the 480p text-to-video model: do not rely on it alone)."""
    sparse_attention: bool
    """Official `attn_mode: flex-block-attn` or a `*_sparse` folder: the checkpoint runs SSTA
    (`hvbatch.models.ssta_attention.resolve_attention_mode`)."""
    attn_param: dict[str, Any] | None = field(default=None, compare=False)
    """The official config's `attn_param` (SSTA's tile, window, top-k); None: the official defaults."""
    super_resolution: bool = False
    """An SR transformer (98 input channels in its config: the low-resolution latents and mask too)."""


@dataclass
class TransformerCheckpoint:
    """A checkpoint seen through official names, read lazily one tensor at a time."""

    facts: CheckpointFacts
    folder: Path
    files: list[Path]
    config: HunyuanVideo15TransformerConfig
    shapes: dict[str, torch.Size]
    """Official name -> shape, for every official tensor the checkpoint can provide."""
    get_tensor: Callable[[str], torch.Tensor]
    missing_sources: list[str] = field(default_factory=list)
    """Checkpoint keys an official tensor needs but the checkpoint lacks (diffusers layout)."""
    unused_sources: list[str] = field(default_factory=list)
    """Checkpoint keys no official tensor uses (diffusers layout)."""
    unresolved: set[str] = field(default_factory=set)
    """Official names that could not be built because of `missing_sources`."""

    @property
    def format_name(self) -> str:
        return f"HunyuanVideo-1.5 {self.facts.layout} folder"


class _Safetensors:
    """Tensors of one or several safetensors files, memory-mapped, by key (headers read up front)."""

    def __init__(self, files: list[Path]) -> None:
        self._owner: dict[str, Any] = {}
        for file in files:
            handle = safe_open(str(file), framework="pt", device="cpu")
            for key in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
                self._owner[key] = handle

    def keys(self) -> list[str]:
        return list(self._owner)

    def shape(self, key: str) -> torch.Size:
        return torch.Size(self._owner[key].get_slice(key).get_shape())

    def get(self, key: str) -> torch.Tensor:
        return self._owner[key].get_tensor(key)


def _listing(folder: Path) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    return ", ".join(names[:15]) + (f" (+{len(names) - 15} more)" if len(names) > 15 else "") or "nothing"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(raw, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return raw


def _layout_of(raw: dict[str, Any], config_path: Path) -> str:
    class_name = raw.get("_class_name")
    if class_name == DIFFUSERS_CLASS_NAME:
        return DIFFUSERS
    if class_name == OFFICIAL_CLASS_NAME or (class_name is None and "mm_double_blocks_depth" in raw):
        return OFFICIAL
    what = _OTHER_FAMILIES.get(str(class_name), f"_class_name {class_name!r}")
    raise ValueError(
        f"{config_path} describes {what}, not a HunyuanVideo-1.5 transformer "
        f"({OFFICIAL_CLASS_NAME} or {DIFFUSERS_CLASS_NAME})"
    )


def _version_folder(transformers: Path, version: str | None) -> Path:
    versions = sorted(p.name for p in transformers.iterdir() if (p / "config.json").is_file())
    if version is not None:
        if version not in versions:
            raise ValueError(
                f"{transformers} has no transformer version {version!r}; it has {versions or 'none'}"
            )
        return transformers / version
    if len(versions) != 1:
        raise ValueError(
            f"{transformers} holds transformer versions {versions or 'none'}: name one "
            "(version=..., e.g. 480p_t2v) or pass its folder"
        )
    return transformers / versions[0]


def locate_transformer(path: str | Path, version: str | None = None) -> tuple[str, Path, dict[str, Any]]:
    """`(layout, folder, config.json contents)` of the 1.5 transformer at `path`."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ValueError(f"transformer checkpoint {path} does not exist")
    folder = path.parent if path.is_file() else path
    if not (folder / "config.json").is_file():
        transformers = folder / "transformer"
        if (transformers / "config.json").is_file():
            folder = transformers
        elif transformers.is_dir():
            folder = _version_folder(transformers, version)
        else:
            raise ValueError(
                f"{folder} is not a HunyuanVideo-1.5 transformer folder: no config.json and no transformer/ "
                f"(found: {_listing(folder)}); expected an official transformer/<version>/ folder or a "
                "diffusers transformer/ folder"
            )
    raw = _read_json(folder / "config.json")
    return _layout_of(raw, folder / "config.json"), folder, raw


def _weight_files(folder: Path) -> list[Path]:
    index = folder / WEIGHTS_INDEX
    if index.is_file():
        names = sorted(set(_read_json(index).get("weight_map", {}).values()))
        absent = [name for name in names if not (folder / name).is_file()]
        if absent or not names:
            raise ValueError(f"{index} lists shards that do not exist: {', '.join(absent) or 'none listed'}")
        return [folder / name for name in names]
    if (folder / WEIGHTS).is_file():
        return [folder / WEIGHTS]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{folder} has config.json but no .safetensors weights; found: {_listing(folder)}")
    return files


def _facts(
    layout: str, folder: Path, raw: dict[str, Any], config: HunyuanVideo15TransformerConfig
) -> CheckpointFacts:
    if layout == OFFICIAL:
        return CheckpointFacts(
            layout,
            folder.name,
            config.use_meanflow,
            config.in_channels,
            raw.get("ideal_resolution") or next((r for r in _RESOLUTIONS if folder.name.startswith(r)), None),
            raw.get("ideal_task") or next((t for t in ("t2v", "i2v") if f"_{t}" in folder.name), None),
            raw.get("attn_mode") == "flex-block-attn" or folder.name.endswith("_sparse"),
            raw.get("attn_param") if isinstance(raw.get("attn_param"), dict) else None,
            super_resolution=config.is_super_resolution,
        )
    target = raw.get("target_size")
    return CheckpointFacts(
        layout,
        None,
        config.use_meanflow,
        config.in_channels,
        _TARGET_SIZE_RESOLUTION.get(int(target)) if isinstance(target, int | float) else None,
        raw.get("task_type"),
        False,
        super_resolution=config.is_super_resolution,
    )


def _expected_keys(config: HunyuanVideo15TransformerConfig) -> list[str]:
    with torch.device("meta"):
        return list(HunyuanVideo15Transformer(config).state_dict())


def open_transformer_checkpoint(path: str | Path, *, version: str | None = None) -> TransformerCheckpoint:
    """The checkpoint at `path`, its config and variant facts; headers only, no tensor read."""
    layout, folder, raw = locate_transformer(path, version)
    origin = str(folder / "config.json")
    if layout == OFFICIAL:
        config = HunyuanVideo15TransformerConfig.from_official_config(raw, origin)
    else:
        config = HunyuanVideo15TransformerConfig.from_diffusers_config(raw, origin)
    files = _weight_files(folder)
    reader = _Safetensors(files)
    facts = _facts(layout, folder, raw, config)
    if layout == OFFICIAL:
        shapes = {k: reader.shape(k) for k in reader.keys()}  # noqa: SIM118
        return TransformerCheckpoint(facts, folder, files, config, shapes, reader.get)
    available = set(reader.keys())
    used: set[str] = set()
    shapes, missing, unresolved = {}, [], set()
    for key in _expected_keys(config):
        rule = name_rule(key)
        used.update(rule.diffusers)
        absent = [s for s in rule.diffusers if s not in available]
        if absent:
            missing.extend(absent)
            unresolved.add(key)
            continue
        parts = [reader.shape(s) for s in rule.diffusers]
        shapes[key] = torch.Size([sum(p[0] for p in parts), *parts[0][1:]])

    def get_tensor(key: str) -> torch.Tensor:
        rule = name_rule(key)
        return rule.to_official(reader.get(s) for s in rule.diffusers)

    return TransformerCheckpoint(
        facts,
        folder,
        files,
        config,
        shapes,
        get_tensor,
        sorted(missing),
        sorted(available - used),
        unresolved,
    )


def _check_against_model(checkpoint: TransformerCheckpoint, model: HunyuanVideo15Transformer) -> None:
    expected = {k: v.shape for k, v in model.state_dict().items()}
    missing = checkpoint.missing_sources + sorted(
        k for k in expected if k not in checkpoint.shapes and k not in checkpoint.unresolved
    )
    unexpected = checkpoint.unused_sources + sorted(k for k in checkpoint.shapes if k not in expected)
    mismatched = sorted(
        f"{k} (checkpoint {tuple(checkpoint.shapes[k])}, model {tuple(expected[k])})"
        for k in expected
        if k in checkpoint.shapes and checkpoint.shapes[k] != expected[k]
    )
    report_mismatch(
        missing=missing,
        unexpected=unexpected,
        mismatched=mismatched,
        format_name=checkpoint.format_name,
        path=checkpoint.folder,
        hint=f"The architecture came from {checkpoint.folder / 'config.json'}: the weights must match it.",
    )


def inspect_transformer(
    path: str | Path, *, version: str | None = None
) -> tuple[HunyuanVideo15Transformer, TransformerCheckpoint]:
    """A meta-device model and the checkpoint it fits (names and shapes checked from the headers,
    no tensor read): ValueError naming what is missing, unexpected or mis-shaped. For doctor."""
    checkpoint = open_transformer_checkpoint(path, version=version)
    with torch.device("meta"):
        model = HunyuanVideo15Transformer(checkpoint.config)
    _check_against_model(checkpoint, model)
    return model, checkpoint


def load_transformer(
    path: str | Path,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    version: str | None = None,
) -> HunyuanVideo15Transformer:
    """Load a 1.5 transformer of either layout; `model.config` is the checkpoint's architecture and
    `model.checkpoint_facts` its variant facts. Every tensor is cast to `dtype`."""
    model, checkpoint = inspect_transformer(path, version=version)
    state = {k: checkpoint.get_tensor(k).to(device=device, dtype=dtype) for k in model.state_dict()}
    model.load_state_dict(state, strict=True, assign=True)
    del state
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    assert not leftover, f"tensors left unloaded: {leftover[:5]}"
    model.checkpoint_format = checkpoint.format_name
    model.checkpoint_facts = checkpoint.facts
    return model.eval().requires_grad_(False)


def random_transformer(
    config: HunyuanVideo15TransformerConfig,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> HunyuanVideo15Transformer:
    """Seeded random weights for tiny presets and benchmarks (the same on every rank of a device type).

    Matrices and convolutions ~ N(0, 1/fan_in), biases and embeddings ~ N(0, 0.02^2), norm
    weights 1 + N(0, 0.02^2): unlike the official init (zero final layer, zero modulations) every
    block changes the output, so tests see every part of the model.
    """
    with torch.device("meta"):
        model = HunyuanVideo15Transformer(config)
    model.to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator, device=device, dtype=torch.float32)
            if param.ndim >= 2 and "cond_type_embedding" not in name:
                value = noise / math.sqrt(param[0].numel())
            elif "norm" in name and name.endswith("weight"):
                value = 1.0 + 0.02 * noise
            else:
                value = 0.02 * noise
            param.copy_(value)
    return model.to(dtype=dtype).eval().requires_grad_(False)
