"""Load HunyuanVideo-1.5's super-resolution upsamplers from the official `upsampler/<version>/` folders.

The official code (`HunyuanVideo_1_5_Pipeline.load_sr_transformer_upsampler`) builds
`SRTo720pUpsampler` when `"720p" in version`, else `SRTo1080pUpsampler`, with diffusers'
`from_pretrained(ckpts/upsampler/<version>)`: a `config.json` and `diffusion_pytorch_model.safetensors`
(or shards listed in `diffusion_pytorch_model.safetensors.index.json`, or a pickled `.bin`).
diffusers has no super-resolution pipeline and no upsampler class, so there is no diffusers layout:
the official one is read by its own names.

The class comes from config.json (`_class_name`, else its fields, else the folder name as the
official code decides); a released version folder must hold its own class. Loading is strict
(every tensor of the model with its shape, nothing else; errors name the keys), safetensors are
memory-mapped and never unpickled, and a `.bin` / `.pt` goes through `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import math
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from hvbatch.models.hunyuan_video_15.upsampler import (
    UPSAMPLER_720P,
    UPSAMPLER_1080P,
    SRTo720pUpsamplerConfig,
    SRTo1080pUpsamplerConfig,
    Upsampler,
    UpsamplerConfig,
    build_upsampler,
)
from hvbatch.models.hunyuan_video_15.variants import SR_VARIANTS
from hvbatch.models.state_dict_check import check_state_dict

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
PICKLED_NAMES = ("diffusion_pytorch_model.bin",)
FORMAT_NAME = "HunyuanVideo-1.5 official upsampler folder"
_CONFIG_TYPES: dict[str, type[SRTo720pUpsamplerConfig] | type[SRTo1080pUpsamplerConfig]] = {
    UPSAMPLER_720P: SRTo720pUpsamplerConfig,
    UPSAMPLER_1080P: SRTo1080pUpsamplerConfig,
}


@dataclass(frozen=True)
class UpsamplerCheckpoint:
    """A folder's config and tensor listing, and a way to read its tensors (not read yet)."""

    folder: Path
    config: UpsamplerConfig
    files: tuple[Path, ...]
    shapes: dict[str, torch.Size]
    read: Callable[[], dict[str, torch.Tensor]]

    @property
    def class_name(self) -> str:
        return self.config.class_name


def _read_json(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(raw, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return raw


def _listing(folder: Path) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    return ", ".join(names[:15]) + (f" (+{len(names) - 15} more)" if len(names) > 15 else "") or "nothing"


def locate_upsampler(path: str | Path, version: str | None = None) -> Path:
    """The folder holding the upsampler's config.json: `path` itself, or a version folder under
    `path/upsampler/` or `path/` (`version` names it when there are several)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ValueError(f"upsampler checkpoint {path} does not exist")
    folder = path.parent if path.is_file() else path
    if (folder / CONFIG_NAME).is_file():
        return folder
    parent = folder / "upsampler" if (folder / "upsampler").is_dir() else folder
    versions = sorted(p.name for p in parent.iterdir() if (p / CONFIG_NAME).is_file())
    if version is not None:
        if version not in versions:
            raise ValueError(f"{parent} has no upsampler version {version!r}; it has {versions or 'none'}")
        return parent / version
    if len(versions) == 1:
        return parent / versions[0]
    if versions:
        raise ValueError(
            f"{parent} holds upsampler versions {versions}: name one (version=..., e.g. "
            "720p_sr_distilled) or pass its folder"
        )
    raise ValueError(
        f"{folder} is not a HunyuanVideo-1.5 upsampler folder: no config.json and no upsampler/<version>/ "
        f"(found: {_listing(folder)}); expected the official ckpts/upsampler/720p_sr_distilled/ or "
        "1080p_sr_distilled/"
    )


def _class_of(raw: dict[str, Any], folder: Path) -> str:
    origin = folder / CONFIG_NAME
    class_name = raw.get("_class_name")
    if class_name is not None and class_name not in _CONFIG_TYPES:
        raise ValueError(
            f"{origin}: _class_name {class_name!r} is not a HunyuanVideo-1.5 upsampler; expected "
            f"{UPSAMPLER_720P!r} or {UPSAMPLER_1080P!r}"
        )
    if class_name is None:
        if "z_channels" in raw or "block_out_channels" in raw:
            class_name = UPSAMPLER_1080P
        elif "hidden_channels" in raw or "num_blocks" in raw:
            class_name = UPSAMPLER_720P
        else:  # the official rule
            class_name = UPSAMPLER_720P if "720p" in folder.name else UPSAMPLER_1080P
    released = SR_VARIANTS.get(folder.name)
    if released is not None and released.upsampler_class != class_name:
        raise ValueError(
            f"{origin} describes a {class_name}, but the official {folder.name} upsampler is a "
            f"{released.upsampler_class}: the folder holds the other resolution's upsampler"
        )
    return class_name


def upsampler_config_from_official(raw: dict[str, Any], folder: Path) -> UpsamplerConfig:
    """The architecture an official `upsampler/<version>/config.json` describes."""
    config_type = _CONFIG_TYPES[_class_of(raw, folder)]
    try:
        return config_type.from_official_config(raw)
    except (KeyError, TypeError, ValueError) as err:
        missing = f"missing field {err}" if isinstance(err, KeyError) else str(err)
        raise ValueError(f"{folder / CONFIG_NAME}: {missing}") from err


def _weight_files(folder: Path) -> tuple[Path, ...]:
    index = folder / INDEX_NAME
    if index.is_file():
        names = sorted(set(_read_json(index).get("weight_map", {}).values()))
        absent = [name for name in names if not (folder / name).is_file()]
        if absent or not names:
            raise ValueError(f"{index} lists shards that do not exist: {', '.join(absent) or 'none listed'}")
        return tuple(folder / name for name in names)
    for name in (WEIGHTS_NAME, *PICKLED_NAMES):
        if (folder / name).is_file():
            return (folder / name,)
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.pt")) + sorted(folder.glob("*.bin"))
    if not files:
        raise ValueError(f"{folder} has config.json but no upsampler weights; found: {_listing(folder)}")
    return tuple(files)


def _load_pickled(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        why = next((line for line in lines if "Unsupported global" in line), lines[0] if lines else "")
        raise ValueError(
            f"{path} cannot be read as plain tensors (torch.load with weights_only=True: {why}); "
            "only state dicts of tensors are loaded, never arbitrary pickled objects"
        ) from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    return state


def _listing_and_reader(
    files: tuple[Path, ...],
) -> tuple[dict[str, torch.Size], Callable[[], dict[str, torch.Tensor]]]:
    if all(f.suffix == ".safetensors" for f in files):
        shapes: dict[str, torch.Size] = {}
        for file in files:
            with safe_open(str(file), framework="pt", device="cpu") as handle:
                for key in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
                    shapes[key] = torch.Size(handle.get_slice(key).get_shape())

        def read() -> dict[str, torch.Tensor]:
            state = {}
            for file in files:
                with safe_open(str(file), framework="pt", device="cpu") as handle:
                    state.update({key: handle.get_tensor(key) for key in handle.keys()})  # noqa: SIM118
            return state

        return shapes, read
    state = {}
    for file in files:
        state.update(_load_pickled(file))
    return {k: v.shape for k, v in state.items()}, lambda: state


def open_upsampler_checkpoint(path: str | Path, *, version: str | None = None) -> UpsamplerCheckpoint:
    """The upsampler folder at `path`: its config and tensor listing (safetensors: headers only)."""
    folder = locate_upsampler(path, version)
    config = upsampler_config_from_official(_read_json(folder / CONFIG_NAME), folder)
    files = _weight_files(folder)
    shapes, read = _listing_and_reader(files)
    return UpsamplerCheckpoint(folder, config, files, shapes, read)


def inspect_upsampler(
    path: str | Path, *, version: str | None = None
) -> tuple[Upsampler, UpsamplerCheckpoint]:
    """A meta-device upsampler and the checkpoint it fits, names and shapes checked (for doctor)."""
    checkpoint = open_upsampler_checkpoint(path, version=version)
    with torch.device("meta"):
        model = build_upsampler(checkpoint.config)
    check_state_dict(
        {k: v.shape for k, v in model.state_dict().items()},
        checkpoint.shapes,
        format_name=f"{FORMAT_NAME} ({checkpoint.class_name})",
        path=checkpoint.folder,
        hint=f"The architecture came from {checkpoint.folder / CONFIG_NAME}: the weights must match it.",
    )
    return model, checkpoint


def load_upsampler(
    path: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    version: str | None = None,
) -> Upsampler:
    """An official upsampler folder, strictly, in `dtype` (float32: the official pipeline runs it so)."""
    model, checkpoint = inspect_upsampler(path, version=version)
    state = {k: v.to(device=device, dtype=dtype) for k, v in checkpoint.read().items()}
    model.load_state_dict(state, strict=True, assign=True)
    model.checkpoint_format = f"{FORMAT_NAME} ({checkpoint.class_name})"
    return model.eval().requires_grad_(False)


def random_upsampler(
    config: UpsamplerConfig,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> Upsampler:
    """Seeded random weights for tiny presets and tests: convolutions ~ N(0, 1/fan_in), biases
    ~ N(0, 0.02^2), norm gains 1 + N(0, 0.02^2)."""
    with torch.device("meta"):
        model = build_upsampler(config)
    model.to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator, device=device, dtype=torch.float32)
            if name.endswith("gamma"):
                param.copy_(1.0 + 0.02 * noise)
            elif param.ndim >= 2:
                param.copy_(noise / math.sqrt(param[0].numel()))
            else:
                param.copy_(0.02 * noise)
    return model.to(dtype=dtype).eval().requires_grad_(False)
