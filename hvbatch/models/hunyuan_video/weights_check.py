"""`hvbatch doctor`'s checks of HunyuanVideo 1.0's files: layout, tensor names and shapes, encoder folders.

Shapes come from safetensors headers or a memory-mapped `.pt` (no tensor values are read) and are
compared with a model built on the meta device, through the loaders' own comparison, so a file
that passes here passes `load_transformer` / `load_vae` too.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hvbatch.models.family import WeightReport
from hvbatch.models.hf_folders import check_encoder_folder, count_words, transformers_installed
from hvbatch.models.hunyuan_video.config import TransformerConfig
from hvbatch.models.hunyuan_video.layout import EXPECTED_LAYOUT, existing_paths, layout_words, resolve_paths

if TYPE_CHECKING:
    from hvbatch.config import ModelConfig

IMAGE_PROCESSOR_FILE = "preprocessor_config.json"


def check_weights(model: ModelConfig) -> list[WeightReport]:
    """The weights root's layout, then one report per component."""
    if model.random_weights:
        detail = "model.random_weights=true: every component gets seeded random weights, no files to check"
        return [WeightReport("weights", "ok", detail), transformers_installed()]
    try:
        resolved = resolve_paths(model)
    except ValueError as err:
        fix = "set model.path to the weights root, or the model.*_path of each missing component"
        reports = [WeightReport("weights", "fail", str(err).removesuffix(EXPECTED_LAYOUT), fix)]
        found = existing_paths(model)  # the components that are there are still checked
    else:
        reports = [WeightReport("weights", "ok", layout_words(model))]
        found = {k: v for k, v in dataclasses.asdict(resolved).items() if v is not None}
    return reports + _component_reports(model, found)


def _component_reports(model: ModelConfig, found: dict[str, Path]) -> list[WeightReport]:
    """One report per component whose files exist (a missing one is named by the `weights` line)."""
    reports = []
    if "transformer" in found:
        reports.append(check_transformer(found["transformer"], model))
    if "vae" in found:
        reports.append(check_vae(found["vae"]))
    arch = model.transformer
    fix = "point model.{}_path (or model.path) at {}'s folder as released with HunyuanVideo"
    encoders = (
        (
            "text_encoder",
            "LLaVA (with its vision tower)" if arch.token_replace else "the LLM",
            found.get("text_encoder"),
            found.get("tokenizer"),
            ("model.transformer.text_dim", arch.text_dim),
        ),
        (
            "text_encoder_2",
            "CLIP-L",
            found.get("text_encoder_2"),
            found.get("tokenizer_2"),
            ("model.transformer.pooled_text_dim", arch.pooled_text_dim),
        ),
    )
    reports += [
        check_encoder_folder(name, what, folder, tokenizer, width, fix.format(name, what))
        for name, what, folder, tokenizer, width in encoders
        if folder is not None
    ]
    processor = found.get("image_processor") or found.get("text_encoder")
    if arch.token_replace and processor is not None:
        reports.append(check_image_processor(processor))
    return reports


def check_image_processor(folder: Path) -> WeightReport:
    """Image-to-video: LLaVA's CLIP image processor config (official: inside the LLaVA folder)."""
    if (folder / IMAGE_PROCESSOR_FILE).is_file():
        return WeightReport(
            "image_processor", "ok", f"LLaVA's image processor: {folder / IMAGE_PROCESSOR_FILE}"
        )
    return WeightReport(
        "image_processor",
        "fail",
        f"no {IMAGE_PROCESSOR_FILE} in {folder}: LLaVA's image processor is missing",
        "use the text_encoder_i2v/ folder as released (official), or the diffusers folder's image_processor/",
    )


def check_transformer(path: Path, model: ModelConfig) -> WeightReport:
    """Every tensor the model expects is in the checkpoint at `path`, with the model's shape."""
    from hvbatch.models.hunyuan_video.loading import inspect_transformer

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
        return WeightReport("transformer", "fail", str(err), fix)
    count = len(meta_model.state_dict())
    params = sum(p.numel() for p in meta_model.parameters())
    detail = (
        f"{source.format_name} {source.path}: all {count} tensors present with the model's shapes "
        f"({count_words(params)} parameters, architecture from {origin})"
    )
    if diffusers and _differs(source.config, model.transformer):
        return WeightReport(
            "transformer",
            "warn",
            detail + f"; its config.json is not the architecture of model={model.name}, which the "
            "parallel plan and memory estimate use",
            "pass the matching preset (model=<name>) so that hvbatch plan sizes the run for this model",
        )
    return WeightReport("transformer", "ok", detail)


def _differs(a: TransformerConfig, b: TransformerConfig) -> bool:
    def normal(config: TransformerConfig) -> dict[str, Any]:
        return {
            k: list(v) if isinstance(v, (list, tuple)) else v for k, v in dataclasses.asdict(config).items()
        }

    return normal(a) != normal(b)


def check_vae(path: Path) -> WeightReport:
    """The VAE folder's config and every tensor's name and shape (as `load_vae` checks them)."""
    from hvbatch.models.hunyuan_video.vae_loading import inspect_vae

    try:
        vae, ckpt = inspect_vae(Path(path))
    except ValueError as err:
        fix = "point model.vae_path (or model.path) at the HunyuanVideo vae/ folder, re-downloaded if damaged"
        return WeightReport("vae", "fail", str(err), fix)
    return WeightReport(
        "vae",
        "ok",
        f"{ckpt.format_name} {ckpt.weights_path}: all {len(vae.state_dict())} tensors present with the "
        "model's shapes",
    )
