"""Doctor checks of the model files: layout, tensor names and shapes, encoder and tokenizer folders.

Shapes come from safetensors headers or a memory-mapped `.pt` (no tensor values are read) and are
compared with a model built on the meta device, through the loaders' own comparison, so a file
that passes here passes `load_transformer` / `load_vae` too.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path
from typing import Any

from hvbatch.config import ModelConfig, TransformerConfig
from hvbatch.doctor.checks import Check, one_line

WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def check_weights(model: ModelConfig) -> list[Check]:
    """The weights root's layout, then one check per component."""
    from hvbatch.pipeline import EXPECTED_LAYOUT, resolve_paths

    if model.random_weights:
        detail = "model.random_weights=true: every component gets seeded random weights, no files to check"
        return [Check("weights", "ok", detail), _transformers_installed()]
    try:
        paths = resolve_paths(model)
    except ValueError as err:
        fix = "set model.path to the weights root, or the model.*_path of each missing component"
        return [Check("weights", "fail", one_line(str(err).removesuffix(EXPECTED_LAYOUT)), fix)]
    checks = [Check("weights", "ok", _layout_words(model))]
    checks.append(check_transformer(paths.transformer, model))
    checks.append(check_vae(paths.vae))
    encoders = (
        ("text_encoder", paths.text_encoder, paths.tokenizer, model.transformer.text_dim),
        ("text_encoder_2", paths.text_encoder_2, paths.tokenizer_2, model.transformer.pooled_text_dim),
    )
    checks += [check_text_encoder(*encoder) for encoder in encoders]
    return checks


def _layout_words(model: ModelConfig) -> str:
    from hvbatch.pipeline import layout_under

    words = []
    if model.path:
        root = Path(model.path).expanduser()
        kind = "diffusers folder" if "tokenizer" in layout_under(root) else "official ckpts/ folder"
        words.append(f"{kind} {root}")
    fields = ("transformer_path", "vae_path", "text_encoder_path", "text_encoder_2_path")
    overrides = [f"model.{name}={getattr(model, name)}" for name in fields if getattr(model, name)]
    if overrides:
        words.append("overridden by " + ", ".join(overrides))
    return "; ".join(words)


def check_transformer(path: Path, model: ModelConfig) -> Check:
    """Every tensor the model expects is in the checkpoint at `path`, with the model's shape."""

    from hvbatch.models.loading import inspect_transformer

    fix = (
        "use the checkpoint of the configured architecture (model=<preset>), re-download or re-convert "
        "the file, or point model.transformer_path at the right one"
    )
    try:
        source, meta_model = inspect_transformer(
            path, config=model.transformer, load_key=model.transformer_load_key, origin=f"model={model.name}"
        )
        diffusers = source.format_name == "diffusers folder"
        origin = "the checkpoint's config.json" if diffusers else f"model={model.name}"
    except ValueError as err:
        return Check("transformer", "fail", one_line(str(err)), fix)
    count = len(meta_model.state_dict())
    params = sum(p.numel() for p in meta_model.parameters())
    detail = (
        f"{source.format_name} {source.path}: all {count} tensors present with the model's shapes "
        f"({_count(params)} parameters, architecture from {origin})"
    )
    if diffusers and _differs(source.config, model.transformer):
        return Check(
            "transformer",
            "warn",
            detail + f"; its config.json is not the architecture of model={model.name}, which the "
            "parallel plan and memory estimate use",
            "pass the matching preset (model=<name>) so that hvbatch plan sizes the run for this model",
        )
    return Check("transformer", "ok", detail)


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.3g}M"


def _bytes(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.3g} MiB"


def _differs(a: TransformerConfig, b: TransformerConfig) -> bool:
    def normal(config: TransformerConfig) -> dict[str, Any]:
        return {
            k: list(v) if isinstance(v, (list, tuple)) else v for k, v in dataclasses.asdict(config).items()
        }

    return normal(a) != normal(b)


def check_vae(path: Path) -> Check:
    """The VAE folder's config and every tensor's name and shape (as `load_vae` checks them)."""

    from hvbatch.models.vae_loading import inspect_vae

    try:
        vae, ckpt = inspect_vae(Path(path))
    except ValueError as err:
        fix = "point model.vae_path (or model.path) at the HunyuanVideo vae/ folder, re-downloaded if damaged"
        return Check("vae", "fail", one_line(str(err)), fix)
    return Check(
        "vae",
        "ok",
        f"{ckpt.format_name} {ckpt.weights_path}: all {len(vae.state_dict())} tensors present with the "
        "model's shapes",
    )


def _transformers_installed() -> Check:
    if importlib.util.find_spec("transformers") is None:
        return Check(
            "text encoders",
            "fail",
            "the transformers package is not installed",
            "pip install 'hvbatch[encoders]'",
        )
    return Check("text encoders", "ok", "the transformers package is installed")


def _hidden_size(config: dict[str, Any]) -> int | None:
    """The encoder's output width: `hidden_size`, or its `text_config`'s (LLaVA, full CLIP configs)."""
    value = config.get("hidden_size") or (config.get("text_config") or {}).get("hidden_size")
    return int(value) if isinstance(value, (int, float)) else None


def _weight_files(folder: Path) -> tuple[list[Path], str]:
    """The weight files in `folder` and, if an index lists shards that are absent, which."""
    for index in sorted(folder.glob("*.index.json")):
        try:
            shards = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
        except (OSError, json.JSONDecodeError, AttributeError) as err:
            return [], f"{index} cannot be read: {err}"
        absent = [name for name in shards if not (folder / name).is_file()]
        if absent:
            return [], f"{index.name} lists shards that are not in {folder}: {', '.join(absent[:5])}"
        return [folder / name for name in shards], ""
    return sorted(p for pattern in WEIGHT_PATTERNS for p in folder.glob(pattern)), ""


def check_text_encoder(name: str, folder: Path, tokenizer: Path | None, width: int) -> Check:
    """A text encoder folder: config.json, weight files, output width and tokenizer files (nothing loaded)."""
    what = "the LLM" if name == "text_encoder" else "CLIP-L"
    key = "model.transformer.text_dim" if name == "text_encoder" else "model.transformer.pooled_text_dim"
    fix = f"point model.{name}_path (or model.path) at {what}'s folder as released with HunyuanVideo"
    if importlib.util.find_spec("transformers") is None:
        return Check(
            name, "fail", "the transformers package is not installed", "pip install 'hvbatch[encoders]'"
        )
    config_path = folder / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        return Check(name, "fail", f"{what}: cannot read {config_path}: {one_line(str(err))}", fix)
    files, problem = _weight_files(folder)
    if problem or not files:
        problem = problem or f"no weight files ({', '.join(WEIGHT_PATTERNS)}) in {folder}"
        return Check(name, "fail", f"{what}: {problem}", fix)
    hidden = _hidden_size(config)
    if hidden != width:
        found = f"hidden_size {hidden}" if hidden else "no hidden_size"
        return Check(
            name, "fail", f"{what} {config_path} has {found} but the transformer takes {key}={width}", fix
        )
    tokenizer_folder = tokenizer if tokenizer is not None and tokenizer.is_dir() else folder
    if not any((tokenizer_folder / f).is_file() for f in TOKENIZER_FILES):
        detail = f"{what}: no tokenizer ({', '.join(TOKENIZER_FILES)}) in {tokenizer_folder}"
        return Check(name, "fail", detail, "add the tokenizer files released with the encoder")
    model_type = config.get("model_type", "?")
    size = _bytes(sum(f.stat().st_size for f in files))
    return Check(
        name,
        "ok",
        f"{what} {folder}: {model_type}, hidden size {hidden}, {len(files)} weight file(s) "
        f"({size}), tokenizer in {tokenizer_folder}",
    )
