"""Where HunyuanVideo-1.5's weights are: the official `ckpts/` folder or a diffusers folder.

Plain Python (no torch): detection and the doctor's layout line read folder names and
`config.json` files only.

- official (`tencent/HunyuanVideo-1.5` downloaded as `ckpts/`): `transformer/<version>/` (one
  folder per released variant, e.g. `480p_t2v`, each with a `HunyuanVideo_1_5_DiffusionTransformer`
  config.json), `vae/`, `text_encoder/llm/`, `text_encoder/byt5-small/`, `text_encoder/Glyph-SDXL-v2/`;
- diffusers (`HunyuanVideo-1.5-Diffusers-<variant>`): `transformer/` (`HunyuanVideo15Transformer3DModel`),
  `vae/`, `text_encoder/`, `tokenizer/`, `text_encoder_2/`, `tokenizer_2/`, `guider/`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hvbatch.models.hunyuan_video_15.config import DIFFUSERS_CLASS_NAME, OFFICIAL_CLASS_NAME
from hvbatch.models.hunyuan_video_15.settings import preset_variant
from hvbatch.models.hunyuan_video_15.variants import VARIANTS, variant_from_diffusers_config

if TYPE_CHECKING:
    from hvbatch.config import ModelConfig

OFFICIAL, DIFFUSERS = "official", "diffusers"
EXPECTED_LAYOUT = (
    "model.path must be a HunyuanVideo-1.5 folder: the official ckpts/ folder (transformer/<version>/, "
    "vae/, text_encoder/llm/, text_encoder/byt5-small/, text_encoder/Glyph-SDXL-v2/) or a diffusers "
    "HunyuanVideo-1.5-Diffusers-* folder (transformer/, vae/, text_encoder/, tokenizer/, "
    "text_encoder_2/, tokenizer_2/); model.transformer_path, model.vae_path and model.text_encoder_path "
    "(a folder holding both encoders in either layout) override single components"
)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return raw if isinstance(raw, dict) else None


def official_versions(root: Path) -> list[str]:
    """The official `transformer/<version>/` folders whose config.json is a 1.5 transformer's."""
    folder = root / "transformer"
    if not folder.is_dir() or (folder / "config.json").exists():
        return []
    found = []
    for child in sorted(folder.iterdir()):
        raw = _read_json(child / "config.json")
        if raw is not None and raw.get("_class_name", OFFICIAL_CLASS_NAME) == OFFICIAL_CLASS_NAME:
            found.append(child.name)
    return found


def diffusers_variant_words(root: Path) -> str:
    """The variant a diffusers folder's configs say, in words ("variant unknown" when they do not)."""
    raw = _read_json(root / "transformer" / "config.json") or {}
    try:
        found = variant_from_diffusers_config(raw, _read_json(root / "guider" / "config.json"))
    except ValueError:
        return "variant unknown"
    return f"variant {found.name}"


def detect(root: Path) -> str | None:
    """What a weights root of this family holds, in words; None when it is not one of its layouts."""
    raw = _read_json(root / "transformer" / "config.json")
    if raw is not None:
        if raw.get("_class_name") != DIFFUSERS_CLASS_NAME:
            return None
        return f"diffusers folder ({DIFFUSERS_CLASS_NAME}, {diffusers_variant_words(root)})"
    versions = official_versions(root)
    if versions:
        return f"official ckpts/ folder (transformer versions {', '.join(versions)})"
    return None


@dataclass(frozen=True)
class ComponentPaths15:
    layout: str
    transformer: Path
    version: str | None
    """The official transformer version folder to load; None for a diffusers folder or an override."""
    vae: Path
    text_encoders: Path
    """A folder holding both encoders in either layout (`TextEncoderPaths15.find`)."""


def _layout_of(root: Path) -> str | None:
    if (root / "transformer" / "config.json").is_file():
        return DIFFUSERS
    return OFFICIAL if official_versions(root) else None


def _official_version(root: Path, model: ModelConfig) -> str:
    versions = official_versions(root)
    wanted = preset_variant(model.name)
    if wanted is not None:
        if wanted.name not in versions:
            raise ValueError(
                f"model={model.name} runs the {wanted.name} transformer, but {root / 'transformer'} holds "
                f"{', '.join(versions)}: download transformer/{wanted.name}/ or use one of those presets"
            )
        return wanted.name
    t2v = [v for v in versions if v in VARIANTS and "_t2v" in v]
    if len(versions) == 1 or not t2v:
        return versions[0]
    return t2v[0]


def resolve_paths(model: ModelConfig) -> ComponentPaths15:
    """Where each component's weights are; every missing one is named in one error."""
    root = Path(model.path).expanduser() if model.path else None
    layout = _layout_of(root) if root is not None else None
    if root is not None and layout is None:
        raise ValueError(f"model.path={model.path} is not a recognised weights folder: {EXPECTED_LAYOUT}")
    found: dict[str, Path] = {}
    version = None
    if root is not None:
        found = {"transformer": root / "transformer", "vae": root / "vae", "text_encoders": root}
        if layout == OFFICIAL:
            version = _official_version(root, model)
            found["transformer"] = root / "transformer" / version
    for name, key in (
        ("transformer", "transformer_path"),
        ("vae", "vae_path"),
        ("text_encoders", "text_encoder_path"),
    ):
        value = getattr(model, key)
        if value:
            found[name] = Path(value).expanduser()
            version = None if name == "transformer" else version
    missing = [
        f"{name} (looked in {found[name]})" if name in found else name
        for name in ("transformer", "vae", "text_encoders")
        if name not in found or not found[name].exists()
    ]
    if missing:
        raise ValueError(f"model weights not found: {', '.join(missing)}. {EXPECTED_LAYOUT}")
    return ComponentPaths15(
        layout or "override", found["transformer"], version, found["vae"], found["text_encoders"]
    )


def layout_words(model: ModelConfig) -> str:
    """The weights root and the overridden components, in words (doctor's `weights` line)."""
    words = []
    if model.path:
        root = Path(model.path).expanduser()
        words.append(f"{detect(root) or 'folder'} {root}")
    keys = ("transformer_path", "vae_path", "text_encoder_path")
    overrides = [f"model.{k}={getattr(model, k)}" for k in keys if getattr(model, k)]
    if overrides:
        words.append("overridden by " + ", ".join(overrides))
    return "; ".join(words)
