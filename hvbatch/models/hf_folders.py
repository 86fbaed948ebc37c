"""Checks of a transformers model folder without loading it: config.json, weight files, width, tokenizer.

Any family's text encoders that ship as transformers folders use these (the doctor's checks of
them; nothing here imports torch or transformers). Details may span lines: the doctor joins them.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

from hvbatch.models.family import WeightReport
from hvbatch.models.json_files import read_json

WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
ENCODERS_INSTALL = "pip install 'hvbatch[encoders]'"


def count_words(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.3g}M"


def bytes_words(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.3g} MiB"


def transformers_installed(check: str = "text encoders") -> WeightReport:
    if importlib.util.find_spec("transformers") is None:
        return WeightReport(check, "fail", "the transformers package is not installed", ENCODERS_INSTALL)
    return WeightReport(check, "ok", "the transformers package is installed")


def hidden_size(config: dict[str, Any]) -> int | None:
    """The encoder's output width: `hidden_size`, or its `text_config`'s (multimodal configs)."""
    value = config.get("hidden_size") or (config.get("text_config") or {}).get("hidden_size")
    return int(value) if isinstance(value, (int, float)) else None


def weight_files(folder: Path) -> tuple[list[Path], str]:
    """The weight files in `folder` and, if an index lists shards that are absent, which."""
    for index in sorted(folder.glob("*.index.json")):
        try:
            shards = sorted(set(read_json(index).get("weight_map", {}).values()))
        except (OSError, json.JSONDecodeError, AttributeError) as err:
            return [], f"{index} cannot be read: {err}"
        absent = [name for name in shards if not (folder / name).is_file()]
        if absent:
            return [], f"{index.name} lists shards that are not in {folder}: {', '.join(absent[:5])}"
        return [folder / name for name in shards], ""
    return sorted(p for pattern in WEIGHT_PATTERNS for p in folder.glob(pattern)), ""


def check_encoder_folder(
    name: str, what: str, folder: Path, tokenizer: Path | None, width: tuple[str, int], fix: str
) -> WeightReport:
    """A text encoder folder: config.json, weight files, output width (`width` = (config key,
    expected hidden size)) and tokenizer files, nothing loaded."""
    if importlib.util.find_spec("transformers") is None:
        return WeightReport(name, "fail", "the transformers package is not installed", ENCODERS_INSTALL)
    config_path = folder / "config.json"
    try:
        config = read_json(config_path)
    except (OSError, json.JSONDecodeError) as err:
        return WeightReport(name, "fail", f"{what}: cannot read {config_path}: {err}", fix)
    files, problem = weight_files(folder)
    if problem or not files:
        problem = problem or f"no weight files ({', '.join(WEIGHT_PATTERNS)}) in {folder}"
        return WeightReport(name, "fail", f"{what}: {problem}", fix)
    hidden = hidden_size(config)
    key, expected = width
    if hidden != expected:
        found = f"hidden_size {hidden}" if hidden else "no hidden_size"
        detail = f"{what} {config_path} has {found} but the transformer takes {key}={expected}"
        return WeightReport(name, "fail", detail, fix)
    tokenizer_folder = tokenizer if tokenizer is not None and tokenizer.is_dir() else folder
    if not any((tokenizer_folder / f).is_file() for f in TOKENIZER_FILES):
        detail = f"{what}: no tokenizer ({', '.join(TOKENIZER_FILES)}) in {tokenizer_folder}"
        return WeightReport(name, "fail", detail, "add the tokenizer files released with the encoder")
    model_type = config.get("model_type", "?")
    size = bytes_words(sum(f.stat().st_size for f in files))
    return WeightReport(
        name,
        "ok",
        f"{what} {folder}: {model_type}, hidden size {hidden}, {len(files)} weight file(s) "
        f"({size}), tokenizer in {tokenizer_folder}",
    )
