"""HunyuanVideo-1.5's image encoder for image-to-video: SigLIP, the FLUX.1-Redux-dev vision tower.

As the official code runs it (`hyvideo/models/vision_encoder/__init__.py`, the pipeline's
`_prepare_vision_states`, `_load_vision_encoder`):
- `ckpts/vision_encoder/siglip/` is the FLUX.1-Redux-dev download; its `image_encoder/` is a
  `SiglipVisionModel` (so400m-patch14-384: 27 layers, width 1152, 384 px in patches of 14, so
  27 x 27 = 729 tokens), loaded in float16; its `feature_extractor/` a `SiglipImageProcessor`
  (384 x 384, bicubic, x / 255, mean = std = 0.5), read from its preprocessor_config.json;
- the input is the image after the same resize and centre crop to the video's (height, width) as
  the VAE's first frame (`resize_and_center_crop`), as uint8 RGB; the processor squashes it to
  384 x 384 (no crop, no aspect kept);
- the output is `last_hidden_state` (after SigLIP's post-layernorm), `[B, 729, 1152]`, cast to the
  transformer's dtype; the negative (CFG) branch gets the same tokens.
diffusers' `HunyuanVideo15ImageToVideoPipeline` keeps the model in `image_encoder/` and the
processor in `feature_extractor/` and calls them the same way (`_get_image_embeds`).

The processor is always Pillow-based: transformers 5 makes `SiglipImageProcessor` its torchvision
backend where torchvision is installed, whose bicubic resize differs from Pillow's; the official code
ran transformers 4.57, whose `SiglipImageProcessor` is the Pillow one (5.x: `SiglipImageProcessorPil`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from hvbatch.models.hf_text import dtype_keyword, transformers_module
from hvbatch.models.state_dict_check import check_state_dict, report_mismatch

IMAGE_TOKENS = 729
IMAGE_EMBED_DIM = 1152
OFFICIAL_FOLDER = "vision_encoder/siglip"
MODEL_FOLDER = "image_encoder"
PROCESSOR_FOLDER = "feature_extractor"
VISION_PREFIX = "vision_model."
REDUX_PROCESSOR = {
    "do_resize": True,
    "do_rescale": True,
    "do_normalize": True,
    "resample": 3,
    "rescale_factor": 1 / 255,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
}
"""FLUX.1-Redux-dev's `feature_extractor/preprocessor_config.json`, but for the size (384 x 384)."""


def processor_class() -> Any:
    """The Pillow-based SigLIP image processor class of the installed transformers."""
    transformers = transformers_module()
    return getattr(transformers, "SiglipImageProcessorPil", None) or transformers.SiglipImageProcessor


def siglip_processor(image_size: int) -> Any:
    """The Redux processor settings at `image_size` (the tiny encoder's processor, built in code)."""
    return processor_class()(size={"height": image_size, "width": image_size}, **REDUX_PROCESSOR)


def _processor_size(processor: Any) -> tuple[int, int]:
    size = processor.size
    if isinstance(size, dict):
        return int(size["height"]), int(size["width"])
    return int(size.height), int(size.width)


class SiglipImageEncoder15:
    """The SigLIP vision model and its image processor: fitted RGB images in, image tokens out."""

    def __init__(self, model: Any, processor: Any) -> None:
        self.model = model.eval().requires_grad_(False)
        self.processor = processor
        side = int(model.config.image_size)
        if processor.do_resize and _processor_size(processor) != (side, side):
            raise ValueError(
                f"SigLIP image processor resizes to {_processor_size(processor)} but the vision model "
                f"takes {side}x{side} images: the feature_extractor/ and image_encoder/ folders do not match"
            )

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def num_tokens(self) -> int:
        return (int(self.model.config.image_size) // int(self.model.config.patch_size)) ** 2

    @property
    def width(self) -> int:
        return int(self.model.config.hidden_size)

    def to(self, device: torch.device | str) -> None:
        self.model.to(device)

    @torch.no_grad()
    def encode(self, images: Sequence[Image.Image | np.ndarray]) -> torch.Tensor:
        """`[B, num_tokens, width]` `last_hidden_state` of each image (RGB, already fitted to the
        video's size), in the model's dtype."""
        if not images:
            raise ValueError("SigLIP encode needs at least one image")
        pixels = self.processor.preprocess(images=list(images), return_tensors="pt")["pixel_values"]
        return self.model(pixel_values=pixels.to(device=self.device, dtype=self.dtype)).last_hidden_state


@dataclass(frozen=True)
class ImageEncoderPaths15:
    """Where a 1.5 checkpoint folder keeps the SigLIP model and its processor, by layout."""

    layout: str
    """`official` (`ckpts/vision_encoder/siglip/`) or `diffusers` (`HunyuanVideo-1.5-Diffusers-*`)."""
    model: Path
    processor: Path

    @classmethod
    def find(cls, root: str | Path) -> ImageEncoderPaths15:
        """The folders under a checkpoint root: `ckpts/` (official) or a diffusers folder (which the
        Redux download itself also looks like: `image_encoder/` and `feature_extractor/`)."""
        root = Path(root)
        for layout, base in (("official", root / OFFICIAL_FOLDER), ("diffusers", root)):
            if (base / MODEL_FOLDER / "config.json").is_file():
                return cls(layout, base / MODEL_FOLDER, base / PROCESSOR_FOLDER)
        raise ValueError(
            f"no SigLIP image encoder under {root}: expected {OFFICIAL_FOLDER}/{MODEL_FOLDER}/config.json "
            f"(official ckpts/: hf download black-forest-labs/FLUX.1-Redux-dev --local-dir "
            f"ckpts/{OFFICIAL_FOLDER}) or {MODEL_FOLDER}/config.json (a diffusers image-to-video folder)"
        )


def _load_processor(folder: Path) -> Any:
    if not (folder / "preprocessor_config.json").is_file():
        raise ValueError(
            f"SigLIP image processor: {folder} has no preprocessor_config.json (the FLUX.1-Redux-dev "
            f"{PROCESSOR_FOLDER}/ folder)"
        )
    return processor_class().from_pretrained(folder, local_files_only=True)


def _checkpoint_shapes(folder: Path) -> dict[str, torch.Size]:
    """Tensor name -> shape from the weight files' headers (safetensors, or a memory-mapped .bin)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
    else:
        files = [folder / "model.safetensors"]
    if all(f.is_file() for f in files):
        from safetensors import safe_open

        shapes: dict[str, torch.Size] = {}
        for file in files:
            with safe_open(str(file), framework="pt", device="cpu") as handle:
                for key in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
                    shapes[key] = torch.Size(handle.get_slice(key).get_shape())
        return shapes
    legacy = folder / "pytorch_model.bin"
    if legacy.is_file():
        state = torch.load(legacy, map_location="cpu", weights_only=True, mmap=True)
        return {k: v.shape for k, v in state.items()}
    raise ValueError(
        f"SigLIP image encoder: no model.safetensors (or index, or pytorch_model.bin) in {folder}"
    )


def _canonical(name: str) -> str:
    """A tensor name without the `vision_model.` prefix: transformers 4.x (the Redux file, saved by
    4.46) writes it, 5.x neither writes nor expects it; both load."""
    return name.removeprefix(VISION_PREFIX)


def _checked(paths: ImageEncoderPaths15) -> tuple[Any, dict[str, torch.Size]]:
    """The model on the meta device and the checkpoint's shapes, compared name by name (headers only)."""
    transformers = transformers_module()
    config = transformers.SiglipVisionConfig.from_pretrained(paths.model, local_files_only=True)
    with torch.device("meta"):
        model = transformers.SiglipVisionModel(config)
    shapes = _checkpoint_shapes(paths.model)
    check_state_dict(
        {_canonical(k): v.shape for k, v in model.state_dict().items()},
        {_canonical(k): v for k, v in shapes.items()},
        format_name=f"SigLIP vision model ({paths.layout} layout)",
        path=paths.model,
        hint=f"  (tensor names shown without the {VISION_PREFIX!r} prefix transformers 4.x writes)",
    )
    return model, shapes


def inspect_image_encoder_15(root: str | Path) -> tuple[Any, dict[str, torch.Size]]:
    """For doctor: the model on the meta device and the checkpoint's shapes (headers only), checked
    strictly; the processor's config is read and matched against the model. ValueError otherwise."""
    paths = ImageEncoderPaths15.find(root)
    model, shapes = _checked(paths)
    SiglipImageEncoder15(model, _load_processor(paths.processor))
    return model, shapes


def load_image_encoder_15(
    root: str | Path, *, dtype: torch.dtype = torch.float16, device: torch.device | str = "cpu"
) -> SiglipImageEncoder15:
    """The SigLIP model and processor from a checkpoint root of either layout (local files only),
    strict: a missing, unexpected or mis-shaped tensor is an error naming it (checked from the
    headers before transformers reads a value). float16 as the official code loads it."""
    transformers = transformers_module()
    paths = ImageEncoderPaths15.find(root)
    _checked(paths)
    processor = _load_processor(paths.processor)
    model, info = transformers.SiglipVisionModel.from_pretrained(
        paths.model,
        local_files_only=True,
        output_loading_info=True,
        **{dtype_keyword(transformers.__version__): dtype},
    )
    report_mismatch(
        missing=sorted(info["missing_keys"]),
        unexpected=sorted(info["unexpected_keys"]),
        mismatched=sorted(str(k) for k in info.get("mismatched_keys", ())),
        format_name=f"transformers SiglipVisionModel ({paths.layout} layout)",
        path=paths.model,
    )
    return SiglipImageEncoder15(model.to(device), processor)


def tiny_image_encoder_15(
    width: int = 32, *, seed: int = 0, image_size: int = 56, patch_size: int = 14, num_layers: int = 2
) -> SiglipImageEncoder15:
    """A small seeded `SiglipVisionModel` (the Redux structure: head, post-layernorm, tanh GELU) and
    its processor at `image_size`, built in code: no file, no download."""
    transformers = transformers_module()
    config = transformers.SiglipVisionConfig(
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size,
        hidden_act="gelu_pytorch_tanh",
        layer_norm_eps=1e-6,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.SiglipVisionModel(config)
    return SiglipImageEncoder15(model, siglip_processor(image_size))
