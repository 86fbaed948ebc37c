"""`hvbatch doctor`'s checks of HunyuanVideo-1.5's files: layout, tensor names and shapes, encoder folders.

Shapes come from safetensors headers (or a memory-mapped `.pt` for the official glyph weights; no
tensor values are read) and are compared with a model built on the meta device, through the
loaders' own comparison, so a folder that passes here passes the loaders too. The architecture is
the checkpoint's config.json; the encoders' widths are checked against it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hvbatch.models.family import WeightReport
from hvbatch.models.hf_folders import check_encoder_folder, count_words, transformers_installed, weight_files
from hvbatch.models.hunyuan_video_15.layout import EXPECTED_LAYOUT, layout_words, resolve_paths

if TYPE_CHECKING:
    from hvbatch.config import ModelConfig

TRANSFORMER_FIX = (
    "point model.path (or model.transformer_path) at a HunyuanVideo-1.5 transformer folder of either "
    "layout, re-downloaded if damaged"
)


def check_weights(model: ModelConfig) -> list[WeightReport]:
    """The weights root's layout, then one report per component."""
    if model.random_weights:
        detail = "model.random_weights=true: every component gets seeded random weights, no files to check"
        return [WeightReport("weights", "ok", detail), transformers_installed()]
    try:
        paths = resolve_paths(model)
    except ValueError as err:
        fix = "set model.path to the weights root, or the model.*_path of each missing component"
        return [WeightReport("weights", "fail", str(err).removesuffix(EXPECTED_LAYOUT), fix)]
    reports = [WeightReport("weights", "ok", layout_words(model))]
    transformer, config = check_transformer(paths.transformer, paths.version)
    reports += [transformer, check_vae(paths.vae)]
    reports += check_encoders(paths.text_encoders, config)
    return reports


def check_transformer(path: Path, version: str | None) -> tuple[WeightReport, Any]:
    """The transformer's config and every tensor's name and shape; and its architecture (or None)."""
    from hvbatch.models.hunyuan_video_15.transformer_loading import inspect_transformer

    try:
        meta_model, checkpoint = inspect_transformer(path, version=version)
    except ValueError as err:
        return WeightReport("transformer", "fail", str(err), TRANSFORMER_FIX), None
    facts = checkpoint.facts
    count = len(meta_model.state_dict())
    params = sum(p.numel() for p in meta_model.parameters())
    variant = (
        facts.version or " ".join(str(x) for x in (facts.resolution, facts.task) if x) or "variant unknown"
    )
    meanflow = ", MeanFlow" if facts.use_meanflow else ""
    detail = (
        f"{checkpoint.format_name} {checkpoint.folder} ({variant}{meanflow}): all {count} tensors present "
        f"with the model's shapes ({count_words(params)} parameters, architecture from its config.json)"
    )
    return WeightReport("transformer", "ok", detail), checkpoint.config


def check_vae(path: Path) -> WeightReport:
    """The VAE folder's config and every tensor's name and shape (as `load_vae` checks them)."""
    from hvbatch.models.hunyuan_video_15.vae_loading import inspect_vae

    try:
        vae, ckpt = inspect_vae(Path(path))
    except ValueError as err:
        fix = "point model.vae_path (or model.path) at the 1.5 vae/ folder (download it again if damaged)"
        return WeightReport("vae", "fail", str(err), fix)
    return WeightReport(
        "vae",
        "ok",
        f"{ckpt.format_name} {ckpt.weights_path}: all {len(vae.state_dict())} tensors present with the "
        "model's shapes",
    )


def check_encoders(root: Path, config: Any) -> list[WeightReport]:
    """The Qwen2.5-VL folder (width = the transformer's text_dim) and the glyph encoder's files."""
    from hvbatch.models.hunyuan_video_15.text_encoders import TextEncoderPaths15

    fix = "point model.text_encoder_path (or model.path) at the folder holding both 1.5 text encoders"
    try:
        paths = TextEncoderPaths15.find(root)
    except ValueError as err:
        return [WeightReport("text_encoder", "fail", str(err), fix)]
    text_dim = 3584 if config is None else config.text_dim
    llm = check_encoder_folder(
        "text_encoder",
        "Qwen2.5-VL",
        paths.llm,
        paths.llm_tokenizer,
        ("the transformer's text_dim", text_dim),
        fix,
    )
    return [llm, check_glyph(paths, None if config is None else config.glyph_dim, fix)]


def check_glyph(paths: Any, glyph_dim: int | None, fix: str) -> WeightReport:
    """The byT5 glyph encoder: official (config + Glyph-SDXL-v2 checkpoint, shapes checked) or
    diffusers (`text_encoder_2/`), its width against the transformer's glyph_dim."""
    missing = paths.missing()
    if missing:
        return WeightReport("glyph_encoder", "fail", f"missing: {', '.join(str(m) for m in missing)}", fix)
    if paths.glyph_assets is not None:
        from hvbatch.models.hunyuan_video_15.glyph import inspect_glyph_official

        try:
            glyph_model, _ = inspect_glyph_official(paths.glyph_model, paths.glyph_assets)
        except ValueError as err:
            return WeightReport("glyph_encoder", "fail", str(err), fix)
        width, where = int(glyph_model.config.d_model), paths.glyph_assets
    else:
        files, problem = weight_files(paths.glyph_model)
        if problem or not files:
            detail = f"byT5: {problem or f'no weight files in {paths.glyph_model}'}"
            return WeightReport("glyph_encoder", "fail", detail, fix)
        try:
            width = int(json.loads((paths.glyph_model / "config.json").read_text()).get("d_model", 0))
        except (OSError, ValueError) as err:
            return WeightReport("glyph_encoder", "fail", f"byT5: {paths.glyph_model}/config.json: {err}", fix)
        if not paths.glyph_tokenizer.is_dir():
            return WeightReport(
                "glyph_encoder", "fail", f"byT5: no tokenizer folder {paths.glyph_tokenizer}", fix
            )
        where = paths.glyph_model
    if glyph_dim is not None and width != glyph_dim:
        detail = (
            f"byT5 glyph encoder {where} has d_model {width} but the transformer takes glyph_dim={glyph_dim}"
        )
        return WeightReport("glyph_encoder", "fail", detail, fix)
    return WeightReport("glyph_encoder", "ok", f"byT5 glyph encoder {where}: d_model {width}")
