"""Where HunyuanVideo 1.0's weights are: the official `ckpts/` folder or a diffusers folder.

Both variants: text-to-video (`ckpts/hunyuan-video-t2v-720p/`, `text_encoder/`) and image-to-video
(HunyuanVideo-I2V: `ckpts/hunyuan-video-i2v-720p/`, the full LLaVA in `text_encoder_i2v/`; diffusers:
the same folder names plus `image_processor/`, the transformer's config with `image_condition_type`).

Plain Python (no torch): the doctor and the checkpoint detection read folders and `config.json`
files only. `resolve_paths` is what the loaders use; `detect` is the family's answer to
`hvbatch.models.family.detect_family`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from hvbatch.models.json_files import read_json

if TYPE_CHECKING:
    from hvbatch.config import ModelConfig

OFFICIAL_MODEL_DIR = "hunyuan-video-t2v-720p"
OFFICIAL_I2V_MODEL_DIR = "hunyuan-video-i2v-720p"
OFFICIAL_I2V_TEXT_ENCODER = "text_encoder_i2v"
OFFICIAL_TRANSFORMER = Path("transformers") / "mp_rank_00_model_states.pt"
DIFFUSERS_CLASS_NAME = "HunyuanVideoTransformer3DModel"
DIFFUSERS_COMPONENTS = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
DIFFUSERS_I2V_COMPONENTS = (*DIFFUSERS_COMPONENTS, "image_processor")
COMPONENTS = ("transformer", "vae", "text_encoder", "text_encoder_2")
"""The components every load needs (each overridable by `model.<name>_path`)."""
TOKENIZER_OF = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}

EXPECTED_LAYOUT = (
    "model.path must be either the official ckpts/ folder "
    f"({OFFICIAL_MODEL_DIR}/{OFFICIAL_TRANSFORMER.as_posix()}, {OFFICIAL_MODEL_DIR}/vae/, "
    "text_encoder/, text_encoder_2/; image-to-video: "
    f"{OFFICIAL_I2V_MODEL_DIR}/ and {OFFICIAL_I2V_TEXT_ENCODER}/) or a diffusers HunyuanVideo folder "
    "(transformer/, vae/, text_encoder/, tokenizer/, text_encoder_2/, tokenizer_2/; image-to-video: "
    "image_processor/ too); model.transformer_path, model.vae_path, model.text_encoder_path and "
    "model.text_encoder_2_path override single components"
)


@dataclass
class ComponentPaths:
    transformer: Path
    vae: Path
    text_encoder: Path
    text_encoder_2: Path
    tokenizer: Path | None = None
    tokenizer_2: Path | None = None
    image_processor: Path | None = None
    """Image-to-video: the LLaVA image processor's folder (official: inside the LLaVA folder)."""


def layout_under(root: Path, image_to_video: bool = False) -> dict[str, Path]:
    """Component folders implied by a weights root of either layout (empty if neither)."""
    if (root / "transformer").is_dir():
        names = DIFFUSERS_I2V_COMPONENTS if image_to_video else DIFFUSERS_COMPONENTS
        return {name: root / name for name in names}
    official = root / (OFFICIAL_I2V_MODEL_DIR if image_to_video else OFFICIAL_MODEL_DIR)
    if official.is_dir():
        return {
            "transformer": official / OFFICIAL_TRANSFORMER,
            "vae": official / "vae",
            "text_encoder": root / (OFFICIAL_I2V_TEXT_ENCODER if image_to_video else "text_encoder"),
            "text_encoder_2": root / "text_encoder_2",
        }
    return {}


def _diffusers_config(folder: Path) -> dict[str, object]:
    try:
        raw = read_json(folder / "config.json")
    except (OSError, ValueError):  # unreadable, too large or not JSON: the transformer check says which
        return {}
    return raw if isinstance(raw, dict) else {}


def detect(root: Path) -> str | None:
    """What a weights root of this family holds, in words; None when it is not one of its layouts."""
    if (root / "transformer").is_dir():
        raw = _diffusers_config(root / "transformer")
        if raw.get("_class_name") != DIFFUSERS_CLASS_NAME:
            return None
        condition = raw.get("image_condition_type")
        variant = f", image_condition_type={condition}" if condition else ""
        return f"diffusers folder ({DIFFUSERS_CLASS_NAME}{variant})"
    for folder in (OFFICIAL_MODEL_DIR, OFFICIAL_I2V_MODEL_DIR):
        if (root / folder).is_dir():
            return f"official ckpts/ folder ({folder}/)"
    return None


def variant_problem(model: ModelConfig) -> str | None:
    """Why `model.path` holds the other variant (text-to-video vs image-to-video) than the preset's."""
    if not model.path or model.random_weights:
        return None
    root = Path(model.path).expanduser()
    wanted = model.transformer.image_condition_type
    if (root / "transformer").is_dir():
        found = _diffusers_config(root / "transformer").get("image_condition_type")
    elif (root / OFFICIAL_MODEL_DIR).is_dir() != (root / OFFICIAL_I2V_MODEL_DIR).is_dir():
        found = "token_replace" if (root / OFFICIAL_I2V_MODEL_DIR).is_dir() else None
    else:
        return None
    if found == wanted:
        return None
    kinds = {None: "a text-to-video", "token_replace": "an image-to-video (token_replace)"}
    return (
        f"model.path={model.path} holds {kinds.get(found, str(found))} checkpoint but model={model.name} "
        f"is {kinds.get(wanted, str(wanted))} preset: use the weights of that preset, or the preset of "
        "these weights (model=<preset>)"
    )


def existing_paths(model: ModelConfig) -> dict[str, Path]:
    """The components (and tokenizers) whose files exist, even when others are missing (the
    doctor checks each of them)."""
    try:
        image_to_video = model.transformer.image_condition_type is not None
        found = layout_under(Path(model.path).expanduser(), image_to_video) if model.path else {}
    except OSError:
        found = {}
    for name in COMPONENTS:
        value = getattr(model, f"{name}_path")
        if value:
            found[name] = Path(value).expanduser()
            if name in TOKENIZER_OF:
                found.pop(TOKENIZER_OF[name], None)
    return {name: path for name, path in found.items() if path.exists()}


def resolve_paths(model: ModelConfig) -> ComponentPaths:
    """Where each component's weights are; every missing one is named in one error."""
    problem = variant_problem(model)
    if problem is not None:
        raise ValueError(problem)
    image_to_video = model.transformer.image_condition_type is not None
    found = layout_under(Path(model.path).expanduser(), image_to_video) if model.path else {}
    if model.path and not found:
        raise ValueError(f"model.path={model.path} is not a recognised weights folder: {EXPECTED_LAYOUT}")
    overrides = {name: getattr(model, f"{name}_path") for name in COMPONENTS}
    for name, value in overrides.items():
        if value:
            found[name] = Path(value).expanduser()
            if name in TOKENIZER_OF:  # an overridden encoder folder carries its own tokenizer
                found.pop(TOKENIZER_OF[name], None)
            if name == "text_encoder":  # and LLaVA's its image processor
                found.pop("image_processor", None)
    missing = [
        f"{name} (looked in {found[name]})" if name in found else name
        for name in overrides
        if name not in found or not found[name].exists()
    ]
    if missing:
        raise ValueError(f"model weights not found: {', '.join(missing)}. {EXPECTED_LAYOUT}")
    return ComponentPaths(**{k: v for k, v in found.items() if v.exists()})


def layout_words(model: ModelConfig) -> str:
    """The weights root and the overridden components, in words (doctor's `weights` line)."""
    words = []
    if model.path:
        root = Path(model.path).expanduser()
        kind = "diffusers folder" if (root / "transformer").is_dir() else "official ckpts/ folder"
        words.append(f"{kind} {root}")
    overrides = [
        f"model.{n}_path={getattr(model, f'{n}_path')}" for n in COMPONENTS if getattr(model, f"{n}_path")
    ]
    if overrides:
        words.append("overridden by " + ", ".join(overrides))
    return "; ".join(words)
