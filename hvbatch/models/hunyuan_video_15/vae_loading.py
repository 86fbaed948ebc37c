"""Load the HunyuanVideo-1.5 VAE from the official or the diffusers `vae/` folder.

Both layouts hold `config.json` plus `diffusion_pytorch_model.safetensors` (or shards listed in
`diffusion_pytorch_model.safetensors.index.json`); they differ in the config and the names:
  * official (`tencent/HunyuanVideo-1.5`, `vae/`): `_class_name: AutoencoderKLConv3D`,
    `ffactor_spatial` / `ffactor_temporal`, official parameter names (`encoder.down.0.block.0...`);
  * diffusers (`HunyuanVideo-1.5-Diffusers-*`, `vae/`): `_class_name: AutoencoderKLHunyuanVideo15`,
    `spatial_compression_ratio` / `temporal_compression_ratio`, diffusers names
    (`encoder.down_blocks.0.resnets.0...`), renamed to the official ones on read.
Only safetensors are read (no pickle), strictly: every tensor of the model with its shape, no
other. The model is built on the meta device and each tensor converted to the target dtype and
device as it is read, so host memory peaks near one copy.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from hvbatch.models.hunyuan_video_15.vae import AutoencoderKLConv3D
from hvbatch.models.hunyuan_video_15.vae_config import (
    DIFFUSERS_CLASS_NAME,
    OFFICIAL_CLASS_NAME,
    HunyuanVideo15VaeConfig,
)
from hvbatch.models.hunyuan_video_15.vae_names import diffusers_names
from hvbatch.models.state_dict_check import check_state_dict

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
OFFICIAL, DIFFUSERS = "official", "diffusers"
_HV10_CLASS_NAMES = ("AutoencoderKLCausal3D", "AutoencoderKLHunyuanVideo")
_SHOWN_FILES = 20


@dataclass(frozen=True)
class VaeCheckpoint:
    """A checkpoint's tensor listing (from the headers) and a way to read it, without reading it yet."""

    layout: str
    """`official` or `diffusers`."""
    format_name: str
    weights_path: Path
    """The safetensors file, or the shard index."""
    shapes: dict[str, torch.Size]
    """Shape of every tensor, by the checkpoint's own names."""
    files: tuple[Path, ...]
    to_model_name: dict[str, str]
    """Checkpoint name -> model (official) name."""

    def read_all(self, sink: Callable[[str, torch.Tensor], None]) -> None:
        """Call `sink(model_name, tensor)` for every tensor, one file at a time."""
        for path in self.files:
            with safe_open(path, framework="pt", device="cpu") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                    sink(self.to_model_name[key], f.get_tensor(key))


def detect_vae_layout(config: dict[str, Any], origin: str = CONFIG_NAME) -> str:
    """`official` or `diffusers` from a `vae/config.json`; ValueError naming what was found otherwise."""
    class_name = config.get("_class_name")
    if class_name == OFFICIAL_CLASS_NAME or (class_name is None and "ffactor_spatial" in config):
        return OFFICIAL
    if class_name == DIFFUSERS_CLASS_NAME or (class_name is None and "spatial_compression_ratio" in config):
        return DIFFUSERS
    if class_name in _HV10_CLASS_NAMES:
        raise ValueError(
            f"{origin}: _class_name {class_name!r} is the HunyuanVideo 1.0 VAE (8x spatial, 16 channels), "
            f"not HunyuanVideo-1.5's; use a HunyuanVideo-1.5 model folder or a 1.0 model preset"
        )
    raise ValueError(
        f"{origin}: _class_name {class_name!r} is not a HunyuanVideo-1.5 VAE; expected "
        f"{OFFICIAL_CLASS_NAME!r} (official vae/) or {DIFFUSERS_CLASS_NAME!r} (diffusers vae/)"
    )


def load_vae(
    path: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> AutoencoderKLConv3D:
    """Load the VAE from an official or diffusers `vae/` folder (or a model root holding `vae/`).

    Returns the model in eval mode with gradients off. Raises ValueError naming the folder, the
    detected layout and what is wrong when the layout is unknown or the weights do not match.
    """
    if not dtype.is_floating_point:
        raise ValueError(f"load_vae: dtype must be a floating dtype such as torch.float16, got {dtype}")
    model, ckpt = inspect_vae(path)
    state: dict[str, torch.Tensor] = {}

    def sink(name: str, tensor: torch.Tensor) -> None:
        state[name] = tensor.to(device=device, dtype=dtype, copy=True)

    ckpt.read_all(sink)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def inspect_vae(path: str | Path) -> tuple[AutoencoderKLConv3D, VaeCheckpoint]:
    """A meta-device VAE built from the folder's config and the checkpoint it fits (names and shapes
    checked from the headers, no tensor read); ValueError naming the folder and what is wrong."""
    folder = _resolve_folder(Path(path))
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        _weight_files(folder)  # raises, listing the expected and the found files
    raw = _read_json(config_path)
    layout = detect_vae_layout(raw, str(config_path))
    if layout == OFFICIAL:
        cfg = HunyuanVideo15VaeConfig.from_official_config(raw, str(config_path))
    else:
        cfg = HunyuanVideo15VaeConfig.from_diffusers_config(raw, str(config_path))
    with torch.device("meta"):
        model = AutoencoderKLConv3D(cfg)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    to_model = {k: k for k in expected} if layout == OFFICIAL else diffusers_names(list(expected))
    files, weights_path = _weight_files(folder)
    shapes = _header_shapes(files)
    format_name = (
        f"official HunyuanVideo-1.5 {OFFICIAL_CLASS_NAME}"
        if layout == OFFICIAL
        else f"diffusers {DIFFUSERS_CLASS_NAME}"
    ) + (" (sharded safetensors)" if weights_path.name == INDEX_NAME else " (safetensors)")
    check_state_dict(
        {name: expected[model_name] for name, model_name in to_model.items()},
        shapes,
        format_name=format_name,
        path=weights_path,
        hint=_naming_hint(layout, shapes, config_path),
    )
    return model, VaeCheckpoint(layout, format_name, weights_path, shapes, files, to_model)


def random_vae(
    config: HunyuanVideo15VaeConfig,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> AutoencoderKLConv3D:
    """A VAE with seeded random weights (the tiny preset's stand-in for a checkpoint)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoencoderKLConv3D(config)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def _naming_hint(layout: str, shapes: dict[str, torch.Size], config_path: Path) -> str:
    """Say so when the tensors carry the other layout's names (a config from the wrong folder)."""
    official_names = any(".down." in k or ".up." in k or ".mid." in k for k in shapes)
    diffusers_style = any("_blocks." in k or ".mid_block." in k for k in shapes)
    if layout == DIFFUSERS and official_names and not diffusers_style:
        return f"  the tensors use the official names, but {config_path} is a diffusers config"
    if layout == OFFICIAL and diffusers_style and not official_names:
        return f"  the tensors use diffusers' names, but {config_path} is an official config"
    return f"  config: {config_path}; is this the HunyuanVideo-1.5 VAE with this config?"


def _resolve_folder(path: Path) -> Path:
    """The `vae/` folder for `path`: the folder itself, its `vae/` child, or a weights file's parent."""
    if not path.exists():
        raise ValueError(f"load_vae: {path} does not exist; pass the VAE folder (with {CONFIG_NAME})")
    if path.is_file():
        if path.name in (WEIGHTS_NAME, INDEX_NAME, CONFIG_NAME):
            return path.parent
        raise ValueError(
            f"load_vae: {path} is a file; pass the folder holding {CONFIG_NAME} and {WEIGHTS_NAME}"
        )
    if not (path / CONFIG_NAME).exists() and (path / "vae").is_dir():
        return path / "vae"
    return path


def _weight_files(folder: Path) -> tuple[tuple[Path, ...], Path]:
    """The safetensors files to read and the path to report; ValueError listing what was found."""
    names = {p.name for p in folder.iterdir()}
    if CONFIG_NAME in names and INDEX_NAME in names:
        index_path = folder / INDEX_NAME
        weight_map = _read_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"load_vae: {index_path} has no 'weight_map' object (key -> shard file name)")
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (folder / f).is_file()]
        if missing:
            raise ValueError(f"load_vae: {index_path} lists shard files that are not in {folder}: {missing}")
        return tuple(folder / f for f in files), index_path
    if CONFIG_NAME in names and WEIGHTS_NAME in names:
        return (folder / WEIGHTS_NAME,), folder / WEIGHTS_NAME
    found = sorted(names)
    shown = ", ".join(found[:_SHOWN_FILES]) + (
        f" (+{len(found) - _SHOWN_FILES} more)" if len(found) > _SHOWN_FILES else ""
    )
    raise ValueError(
        f"load_vae: unknown VAE layout in {folder}. Expected {CONFIG_NAME} plus {WEIGHTS_NAME} or "
        f"{INDEX_NAME} (the official HunyuanVideo-1.5 vae/ folder and the diffusers one both look so). "
        f"Found: {shown or 'no files'}"
    )


def _header_shapes(files: tuple[Path, ...]) -> dict[str, torch.Size]:
    shapes: dict[str, torch.Size] = {}
    for path in files:
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                for key in f.keys():  # noqa: SIM118
                    shapes[key] = torch.Size(f.get_slice(key).get_shape())
        except Exception as err:  # safetensors raises its own error types for corrupt headers
            raise ValueError(f"load_vae: cannot read safetensors file {path}: {err}") from None
    return shapes


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"load_vae: cannot read {path} as JSON: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"load_vae: {path} must hold a JSON object, got {type(data).__name__}")
    return data
