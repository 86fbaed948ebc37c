"""Load HunyuanVideo's VAE from the official or the diffusers `vae/` folder.

Layouts (detected from the file names):
  * official:  `config.json` + `pytorch_model.pt` (a state dict, optionally wrapped as
    `{"state_dict": {"vae.<key>": tensor}}`; read with `weights_only=True` and `mmap=True`);
  * diffusers: `config.json` + `diffusion_pytorch_model.safetensors`, or shards listed in
    `diffusion_pytorch_model.safetensors.index.json`.
Both use the same parameter names. The model is built on the meta device and every tensor is
converted to the target dtype/device as it is read, so host memory peaks near one copy.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from hvbatch.models.hunyuan_video.vae import AutoencoderKLCausal3D, VaeConfig
from hvbatch.models.json_files import read_json
from hvbatch.models.state_dict_check import check_state_dict

CONFIG_NAME = "config.json"
OFFICIAL_WEIGHTS = "pytorch_model.pt"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
DIFFUSERS_INDEX = "diffusion_pytorch_model.safetensors.index.json"
_WEIGHT_NAMES = (DIFFUSERS_INDEX, DIFFUSERS_WEIGHTS, OFFICIAL_WEIGHTS)
_SHOWN_FILES = 20


@dataclass(frozen=True)
class _Checkpoint:
    """Tensor shapes of a checkpoint plus a way to read every tensor, without reading them yet."""

    format_name: str
    weights_path: Path
    shapes: dict[str, torch.Size]
    read_all: Callable[[Callable[[str, torch.Tensor], None]], None]
    """Calls `sink(key, tensor)` for every tensor, one file at a time."""


def load_vae(
    path: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> AutoencoderKLCausal3D:
    """Load the VAE from an official or diffusers `vae/` folder (or a model root holding `vae/`).

    Returns the model in eval mode with gradients off. Raises ValueError naming the folder, the
    detected format and what is wrong when the layout is unknown or the weights do not match.
    """
    if not dtype.is_floating_point:
        raise ValueError(f"load_vae: dtype must be a floating dtype such as torch.float16, got {dtype}")
    model, ckpt = inspect_vae(path)
    state: dict[str, torch.Tensor] = {}

    def sink(key: str, tensor: torch.Tensor) -> None:
        state[key] = tensor.to(device=device, dtype=dtype, copy=True)

    ckpt.read_all(sink)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def inspect_vae(path: str | Path) -> tuple[AutoencoderKLCausal3D, _Checkpoint]:
    """A meta-device VAE built from the folder's config and the checkpoint it fits (names and shapes
    checked from the headers, no tensor read); ValueError naming the folder and what is wrong."""
    folder = _resolve_folder(Path(path))
    weights_name = _detect_weights(folder)
    config_path = folder / CONFIG_NAME
    cfg = VaeConfig.from_diffusers_config(_read_json(config_path), source=str(config_path))
    with torch.device("meta"):
        model = AutoencoderKLCausal3D(cfg)
    if weights_name == OFFICIAL_WEIGHTS:
        ckpt = _open_official(folder / OFFICIAL_WEIGHTS)
    else:
        ckpt = _open_diffusers(folder, sharded=weights_name == DIFFUSERS_INDEX)
    check_state_dict(
        {k: v.shape for k, v in model.state_dict().items()},
        ckpt.shapes,
        format_name=ckpt.format_name,
        path=ckpt.weights_path,
        hint=f"  config: {config_path}; is this the HunyuanVideo VAE with this config?",
    )
    return model, ckpt


def _resolve_folder(path: Path) -> Path:
    """The `vae/` folder for `path`: the folder itself, its `vae/` child, or a weights file's parent."""
    if not path.exists():
        raise ValueError(f"load_vae: {path} does not exist; pass the VAE folder (with {CONFIG_NAME})")
    if path.is_file():
        if path.name in _WEIGHT_NAMES:
            return path.parent
        raise ValueError(
            f"load_vae: {path} is a file; pass the folder holding {CONFIG_NAME} "
            f"and one of {list(_WEIGHT_NAMES)}"
        )
    if not (path / CONFIG_NAME).exists() and (path / "vae").is_dir():
        return path / "vae"
    return path


def _detect_weights(folder: Path) -> str:
    """Name of the weights file to use; ValueError listing expected and found files otherwise."""
    names = {p.name for p in folder.iterdir()}
    weights = next((n for n in _WEIGHT_NAMES if n in names), None)
    if weights is not None and CONFIG_NAME in names:
        return weights
    found = sorted(names)
    shown = ", ".join(found[:_SHOWN_FILES]) + (
        f" (+{len(found) - _SHOWN_FILES} more)" if len(found) > _SHOWN_FILES else ""
    )
    raise ValueError(
        f"load_vae: unknown VAE layout in {folder}. Expected {CONFIG_NAME} plus either {OFFICIAL_WEIGHTS} "
        f"(official HunyuanVideo vae/ folder) or {DIFFUSERS_WEIGHTS} / {DIFFUSERS_INDEX} (diffusers "
        f"vae/ folder). Found: {shown or 'no files'}"
    )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = read_json(path)
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"load_vae: cannot read {path} as JSON: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"load_vae: {path} must hold a JSON object, got {type(data).__name__}")
    return data


def _torch_load_tensors_only(path: Path) -> Any:
    """`torch.load` with `weights_only=True` (mmap when the file format allows it)."""
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # legacy, non-zip file
    except pickle.UnpicklingError as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"load_vae: refusing to load {path}: it needs unsafe unpickling (torch.load with "
            f"weights_only=True failed: {reason}). hvbatch only reads plain tensors. Re-save just the "
            f"state dict of tensors (torch.save(state_dict, ...)) in an environment you trust, or use "
            f"the diffusers safetensors VAE."
        ) from None
    except (RuntimeError, OSError, EOFError) as err:
        raise ValueError(f"load_vae: cannot read {path} with torch.load: {err}") from None


def _open_official(path: Path) -> _Checkpoint:
    """Read `pytorch_model.pt`, unwrapping `state_dict` and the `vae.` key prefix like the official loader."""
    obj = _torch_load_tensors_only(path)
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise ValueError(
            f"load_vae: {path} holds a {type(obj).__name__}, expected a state dict (key -> tensor)"
        )
    if any(str(k).startswith("vae.") for k in obj):
        # The official loader keeps only the `vae.`-prefixed entries of a wrapped checkpoint.
        obj = {k[len("vae.") :]: v for k, v in obj.items() if k.startswith("vae.")}
    not_tensors = sorted(
        f"{k} ({type(v).__name__})" for k, v in obj.items() if not isinstance(v, torch.Tensor)
    )
    if not_tensors:
        raise ValueError(
            f"load_vae: {path} (detected format: official HunyuanVideo {OFFICIAL_WEIGHTS}) has non-tensor "
            f"entries: {', '.join(not_tensors[:5])}; expected a flat state dict of tensors"
        )
    tensors: dict[str, torch.Tensor] = dict(obj)

    def read_all(sink: Callable[[str, torch.Tensor], None]) -> None:
        for key in list(tensors):
            sink(key, tensors.pop(key))  # drop our reference as we go

    shapes = {k: v.shape for k, v in tensors.items()}
    return _Checkpoint(f"official HunyuanVideo VAE ({OFFICIAL_WEIGHTS})", path, shapes, read_all)


def _open_diffusers(folder: Path, *, sharded: bool) -> _Checkpoint:
    """Index the diffusers safetensors file(s): shapes from the headers, tensors read lazily."""
    if sharded:
        index_path = folder / DIFFUSERS_INDEX
        weight_map = _read_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"load_vae: {index_path} has no 'weight_map' object (key -> shard file name)")
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (folder / f).is_file()]
        if missing:
            raise ValueError(f"load_vae: {index_path} lists shard files that are not in {folder}: {missing}")
        weights_path, format_name = index_path, "diffusers AutoencoderKLHunyuanVideo (sharded safetensors)"
    else:
        files = [DIFFUSERS_WEIGHTS]
        weights_path, format_name = (
            folder / DIFFUSERS_WEIGHTS,
            "diffusers AutoencoderKLHunyuanVideo (safetensors)",
        )

    shapes: dict[str, torch.Size] = {}
    for name in files:
        try:
            with safe_open(folder / name, framework="pt", device="cpu") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                    shapes[key] = torch.Size(f.get_slice(key).get_shape())
        except Exception as err:  # safetensors raises its own error types for corrupt headers
            raise ValueError(f"load_vae: cannot read safetensors file {folder / name}: {err}") from None

    def read_all(sink: Callable[[str, torch.Tensor], None]) -> None:
        for name in files:
            with safe_open(folder / name, framework="pt", device="cpu") as f:
                for key in f.keys():  # noqa: SIM118
                    sink(key, f.get_tensor(key))

    return _Checkpoint(format_name, weights_path, shapes, read_all)
