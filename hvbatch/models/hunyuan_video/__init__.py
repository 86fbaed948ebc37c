"""HunyuanVideo 1.0 text-to-video: the model family behind the `hunyuan-video-t2v-720p` and `tiny` presets.

`family.py` registers it; `transformer.py` (HYVideo-T/2-cfgdistill), `vae*.py` (the causal 3D VAE),
`text_encoders.py` (LLaVA-Llama-3 + CLIP-L), `conditioning.py` (what they hand the transformer),
`loading.py` / `convert.py` / `vae_loading.py` / `layout.py` (both checkpoint layouts),
`components.py` (building everything), `weights_check.py` (doctor), `figures.py` (geometry, memory,
cost and step-cache numbers) and `config.py` (its sections of the config tree).

Importing this package imports no torch: the control plane reads `family.py`, `config.py`,
`figures.py` and `layout.py` only; the names below are imported on first use (PEP 562).
"""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "AutoencoderKLCausal3D": "vae",
    "HunyuanTextEncoder": "text_encoders",
    "HunyuanVideoTransformer": "transformer",
    "TINY_VAE": "components",
    "TextConditioning": "conditioning",
    "TextEncoderConfig": "config",
    "TransformerConfig": "config",
    "VaeConfig": "vae",
    "embedded_guidance": "conditioning",
    "load_components": "components",
    "load_text_encoder": "text_encoders",
    "load_transformer": "loading",
    "load_vae": "vae_loading",
    "random_transformer": "loading",
    "tiny_text_encoder": "text_encoders",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    """The family's main names, imported on first use (so importing the package needs no torch)."""
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
