"""`load_transformer`: official and diffusers HunyuanVideo checkpoints, streamed into our model.

Supported layouts (detected from the path):
- diffusers `transformer/` folder: `config.json` + `diffusion_pytorch_model.safetensors`, or shards
  with `diffusion_pytorch_model.safetensors.index.json` (also a model root holding `transformer/`);
- official `mp_rank_00_model_states.pt` (state dict under `module`, or `ema`), read with
  `torch.load(weights_only=True, mmap=True)`; also a `ckpts/hunyuan-video-t2v-720p` folder;
- official FP8 `*_fp8.pt` + `*_fp8_map.pt`: block-linear weights stay float8 in memory;
- one `.safetensors` file with official (or diffusers) names.

The model is built on the meta device and each tensor is converted once, straight into its
parameter (`load_state_dict(assign=True)`): peak host memory is about one copy of the weights.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from hvbatch.models.fp8 import FP8_DTYPE, FP8Linear, enable_fp8_gemm, swap_in_fp8_linears
from hvbatch.models.hunyuan_video.config import RELEASED_PRESET, TransformerConfig
from hvbatch.models.hunyuan_video.convert import config_from_diffusers, source_rule
from hvbatch.models.hunyuan_video.transformer import HunyuanVideoTransformer
from hvbatch.models.json_files import read_json
from hvbatch.models.state_dict_check import report_mismatch

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
DIFFUSERS_INDEX = "diffusion_pytorch_model.safetensors.index.json"
OFFICIAL_PT = "mp_rank_00_model_states.pt"
SUPPORTED_LAYOUTS = (
    "a diffusers transformer/ folder (config.json + diffusion_pytorch_model*.safetensors), "
    "an official mp_rank_00_model_states.pt, an official *_fp8.pt with its *_fp8_map.pt, "
    "or a .safetensors file with official names"
)


@dataclass
class CheckpointSource:
    """A checkpoint seen through official names, read lazily one tensor at a time."""

    format_name: str
    path: Path
    config: TransformerConfig
    shapes: dict[str, torch.Size]
    dtypes: dict[str, torch.dtype]
    get_tensor: Callable[[str], torch.Tensor]
    missing_sources: list[str] = field(default_factory=list)
    """Source-format keys that an official key needs but the checkpoint lacks (diffusers layouts)."""
    unresolved: set[str] = field(default_factory=set)
    """Official keys that could not be built because of `missing_sources`."""
    unused_sources: list[str] = field(default_factory=list)
    fp8_scales: dict[str, torch.Tensor] | None = None


class _SafetensorsReader:
    """Tensors of one or several safetensors files, memory-mapped, by key."""

    def __init__(self, files: list[Path]) -> None:
        self._handles = {}
        self._owner: dict[str, object] = {}
        for file in files:
            handle = safe_open(str(file), framework="pt", device="cpu")
            self._handles[file] = handle
            for key in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
                self._owner[key] = handle

    def keys(self) -> list[str]:
        return list(self._owner)

    def shape(self, key: str) -> torch.Size:
        return torch.Size(self._owner[key].get_slice(key).get_shape())  # type: ignore[attr-defined]

    def dtype(self, key: str) -> torch.dtype:
        return _SAFETENSORS_DTYPES.get(self._owner[key].get_slice(key).get_dtype(), torch.float32)  # type: ignore[attr-defined]

    def get(self, key: str) -> torch.Tensor:
        return self._owner[key].get_tensor(key)  # type: ignore[attr-defined]


_SAFETENSORS_DTYPES = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F64": torch.float64,
}


def _expected_keys(config: TransformerConfig) -> list[str]:
    with torch.device("meta"):
        return list(HunyuanVideoTransformer(config).state_dict().keys())


def _diffusers_source(
    reader: _SafetensorsReader, config: TransformerConfig, format_name: str, path: Path
) -> CheckpointSource:
    """Present diffusers tensors under official names (fusing qkv / linear1, swapping final halves)."""
    available = set(reader.keys())
    used: set[str] = set()
    shapes: dict[str, torch.Size] = {}
    dtypes: dict[str, torch.dtype] = {}
    missing: list[str] = []
    unresolved: set[str] = set()
    for key in _expected_keys(config):
        rule = source_rule(key)
        used.update(rule.sources)
        absent = [s for s in rule.sources if s not in available]
        if absent:
            missing.extend(absent)
            unresolved.add(key)
            continue
        parts = [reader.shape(s) for s in rule.sources]
        shapes[key] = torch.Size([sum(p[0] for p in parts), *parts[0][1:]])
        dtypes[key] = reader.dtype(rule.sources[0])

    def get_tensor(key: str) -> torch.Tensor:
        rule = source_rule(key)
        return rule.combine([reader.get(s) for s in rule.sources])

    return CheckpointSource(
        format_name,
        path,
        config,
        shapes,
        dtypes,
        get_tensor,
        missing_sources=sorted(missing),
        unresolved=unresolved,
        unused_sources=sorted(available - used),
    )


def _looks_diffusers(keys: list[str]) -> bool:
    return any(k.startswith(("x_embedder.", "context_embedder.", "transformer_blocks.")) for k in keys)


def _diffusers_folder(folder: Path) -> CheckpointSource:
    config_path = folder / "config.json"
    try:
        raw = read_json(config_path)
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_path} is not valid JSON: {err}") from err
    config = config_from_diffusers(raw, str(config_path))
    index_path = folder / DIFFUSERS_INDEX
    if index_path.is_file():
        weight_map = read_json(index_path).get("weight_map", {})
        files = sorted({folder / name for name in weight_map.values()})
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise ValueError(f"{index_path} lists shards that do not exist: {', '.join(absent)}")
    elif (folder / DIFFUSERS_WEIGHTS).is_file():
        files = [folder / DIFFUSERS_WEIGHTS]
    else:
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise ValueError(
                f"{folder} has config.json but no {DIFFUSERS_WEIGHTS}, no {DIFFUSERS_INDEX} "
                f"and no .safetensors file; found: {_listing(folder)}"
            )
    return _diffusers_source(_SafetensorsReader(files), config, "diffusers folder", folder)


def _state_dict_source(
    state: dict[str, torch.Tensor], config: TransformerConfig, format_name: str, path: Path
) -> CheckpointSource:
    if state and all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return CheckpointSource(
        format_name,
        path,
        config,
        shapes={k: v.shape for k, v in state.items()},
        dtypes={k: v.dtype for k, v in state.items()},
        get_tensor=state.__getitem__,
    )


def _weights_only_load(path: Path, mmap: bool) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        if "global" not in str(err).lower():  # a bad opcode, not a refused class: not a checkpoint
            raise ValueError(
                f"{path} is not a readable checkpoint: it is not a file torch.save wrote, or it is "
                "damaged (re-download or re-convert it)"
            ) from err
        raise ValueError(
            f"refusing to load {path}: it contains pickled Python objects that are not tensors, "
            "and hvbatch never unpickles arbitrary code. Re-save it as a plain state dict "
            f"(torch.save({{'module': state_dict}}, ...)) or as .safetensors. Detail: {str(err)[:300]}"
        ) from err


def _torch_load(path: Path) -> object:
    """`torch.load` that never unpickles arbitrary objects, memory-mapped where the format allows."""
    try:
        return _weights_only_load(path, mmap=True)
    except RuntimeError as err:
        if "mmap" not in str(err):
            raise ValueError(f"cannot read {path} as a torch checkpoint: {err}") from err
    # Files from torch.save(_use_new_zipfile_serialization=False) cannot be memory-mapped.
    return _weights_only_load(path, mmap=False)


def _official_pt(path: Path, config: TransformerConfig, load_key: str) -> CheckpointSource:
    loaded = _torch_load(path)
    if not isinstance(loaded, dict):
        raise ValueError(f"{path} holds a {type(loaded).__name__}, expected a dict with a state dict")
    if load_key in loaded and isinstance(loaded[load_key], dict):
        state = loaded[load_key]
    elif loaded and all(isinstance(v, torch.Tensor) for v in loaded.values()):
        state = loaded
    else:
        raise ValueError(
            f"{path} has no state dict under {load_key!r}; "
            f"its top-level keys are {sorted(map(str, loaded))[:10]}. "
            "Pass load_key='module' or 'ema' (config: model.transformer_load_key)."
        )
    fp8 = any(v.dtype == FP8_DTYPE for v in state.values())
    source = _state_dict_source(state, config, "official fp8 .pt" if fp8 else "official .pt", path)
    if fp8:
        source.fp8_scales = _fp8_scale_map(path)
    return source


def _fp8_scale_map(path: Path) -> dict[str, torch.Tensor]:
    map_path = path.with_name(path.stem + "_map.pt")
    if not map_path.is_file():
        raise ValueError(
            f"{path} holds float8 weights but their scale map {map_path.name} is not beside it; "
            "the official release ships mp_rank_00_model_states_fp8.pt "
            "with mp_rank_00_model_states_fp8_map.pt"
        )
    scales = _torch_load(map_path)
    if not isinstance(scales, dict) or not all(isinstance(v, torch.Tensor) for v in scales.values()):
        raise ValueError(f"{map_path} must map layer names to scale tensors")
    return {k.removeprefix("module."): v for k, v in scales.items()}


def _single_safetensors(path: Path, config: TransformerConfig) -> CheckpointSource:
    reader = _SafetensorsReader([path])
    if _looks_diffusers(reader.keys()):
        return _diffusers_source(reader, config, "safetensors file with diffusers names", path)
    keys = reader.keys()
    return CheckpointSource(
        "safetensors file with official names",
        path,
        config,
        shapes={k: reader.shape(k) for k in keys},
        dtypes={k: reader.dtype(k) for k in keys},
        get_tensor=reader.get,
    )


def _listing(folder: Path) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    return ", ".join(names[:15]) + (f" (+{len(names) - 15} more)" if len(names) > 15 else "") or "nothing"


def open_checkpoint(
    path: str | Path, *, config: TransformerConfig, load_key: str = "module"
) -> CheckpointSource:
    """Detect the layout at `path`; `config` is the architecture for layouts that carry none."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ValueError(f"transformer checkpoint {path} does not exist; expected {SUPPORTED_LAYOUTS}")
    if path.is_dir():
        for candidate in (path, path / "transformer"):
            if (candidate / "config.json").is_file():
                return _diffusers_folder(candidate)
        for candidate in (path / OFFICIAL_PT, path / "transformers" / OFFICIAL_PT):
            if candidate.is_file():
                return _official_pt(candidate, config, load_key)
        raise ValueError(
            f"cannot tell the checkpoint layout of folder {path} (found: {_listing(path)}); "
            f"expected {SUPPORTED_LAYOUTS}"
        )
    if path.suffix in (".pt", ".pth"):
        return _official_pt(path, config, load_key)
    if path.suffix == ".safetensors":
        return _single_safetensors(path, config)
    raise ValueError(f"cannot tell the checkpoint layout of file {path}; expected {SUPPORTED_LAYOUTS}")


def _fp8_module_names(source: CheckpointSource) -> set[str]:
    """Block linears whose weights the checkpoint stores as float8."""
    fp8_keys = [k for k, d in source.dtypes.items() if d == FP8_DTYPE]
    misplaced = [
        k
        for k in fp8_keys
        if not (k.endswith(".weight") and k.startswith(("double_blocks.", "single_blocks.")))
    ]
    if misplaced:
        raise ValueError(
            f"{source.path}: float8 tensors are only supported for block linear weights; found "
            f"{len(misplaced)} others, e.g. {', '.join(misplaced[:5])}"
        )
    return {k.removesuffix(".weight") for k in fp8_keys}


def _check_against_model(source: CheckpointSource, model: HunyuanVideoTransformer, origin: str) -> None:
    expected = {k: v.shape for k, v in model.state_dict().items()}
    missing = list(source.missing_sources) + sorted(
        k for k in expected if k not in source.shapes and k not in source.unresolved
    )
    unexpected = list(source.unused_sources) + sorted(k for k in source.shapes if k not in expected)
    mismatched = sorted(
        f"{k} (checkpoint {tuple(source.shapes[k])}, model {tuple(expected[k])})"
        for k in expected
        if k in source.shapes and source.shapes[k] != expected[k]
    )
    report_mismatch(
        missing=missing,
        unexpected=unexpected,
        mismatched=mismatched,
        format_name=source.format_name,
        path=source.path,
        hint=f"The model architecture came from {origin}; pass preset=... or config=... if the checkpoint "
        "is another size.",
    )


def _set_fp8_scales(model: HunyuanVideoTransformer, source: CheckpointSource) -> None:
    scales = source.fp8_scales or {}
    fp8_modules = {n: m for n, m in model.named_modules() if isinstance(m, FP8Linear)}
    absent = sorted(n for n in fp8_modules if n not in scales)
    if absent:
        raise ValueError(
            f"{source.path}: the fp8 scale map lacks {len(absent)} layers with float8 weights, "
            f"e.g. {', '.join(absent[:5])}"
        )
    for name, module in fp8_modules.items():
        module.set_scale(scales[name], name)


def inspect_transformer(
    path: str | Path, *, config: TransformerConfig, load_key: str = "module", origin: str = "the config"
) -> tuple[CheckpointSource, HunyuanVideoTransformer]:
    """The checkpoint at `path` and a meta-device model it fits (names and shapes checked, no
    tensor read): ValueError naming what is missing, unexpected or mis-shaped.

    `config`/`origin` are the architecture for layouts that carry none, and where it came from.
    """
    source = open_checkpoint(path, config=config, load_key=load_key)
    if source.format_name == "diffusers folder":
        origin = "the checkpoint's config.json"
    with torch.device("meta"):
        model = HunyuanVideoTransformer(source.config)
    swap_in_fp8_linears(model, _fp8_module_names(source))
    _check_against_model(source, model, origin)
    return source, model


def load_transformer(
    path: str | Path,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    preset: str = RELEASED_PRESET,
    config: TransformerConfig | None = None,
    load_key: str = "module",
) -> HunyuanVideoTransformer:
    """Load a HunyuanVideo transformer checkpoint of any supported layout; `model.config` is its architecture.

    The architecture comes from `config.json` for diffusers folders, else from `config` or the
    named `preset`. Float8 block weights stay float8; everything else is cast to `dtype`.
    """
    if config is None:
        from hvbatch.config import transformer_preset  # the preset files are read by the config tree

        config = transformer_preset(preset)
        origin = f"preset {preset!r}"
    else:
        origin = "the config passed in"
    arch = config
    source, model = inspect_transformer(path, config=arch, load_key=load_key, origin=origin)
    state = {}
    for key, param in model.state_dict(keep_vars=True).items():
        target = FP8_DTYPE if param.dtype == FP8_DTYPE else dtype
        state[key] = source.get_tensor(key).to(device=device, dtype=target)
    model.load_state_dict(state, strict=True, assign=True)
    del state
    _set_fp8_scales(model, source)
    enable_fp8_gemm(model)
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    assert not leftover, f"tensors left unloaded: {leftover[:5]}"
    model.checkpoint_format = source.format_name
    return model.eval().requires_grad_(False)


def random_transformer(
    config: TransformerConfig,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> HunyuanVideoTransformer:
    """A transformer with seeded random weights (the tiny preset's stand-in for a checkpoint)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = HunyuanVideoTransformer(config)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)
