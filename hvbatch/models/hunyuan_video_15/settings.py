"""HunyuanVideo-1.5's `model.text_encoder` config section, and the presets it ships (no torch).

The family registers `TextEncoderConfig15` as the type of `model.text_encoder` and
`HunyuanVideo15TransformerConfig` as the type of `model.transformer`.
"""

from __future__ import annotations

from dataclasses import dataclass

from hvbatch.models.hunyuan_video_15.variants import VARIANTS, Variant15

TINY_PRESET = "tiny-1.5"
"""The 1.5 structure at a size that runs on a CPU in seconds, with seeded random weights."""
PRESET_VARIANTS = ("480p_t2v", "720p_t2v", "480p_t2v_distilled", "480p_i2v_step_distilled")
"""The released variants that have a preset: text-to-video (base and CFG-distilled) and the
step-distilled (MeanFlow) one, which is image-to-video (refused until image inputs are wired)."""
RELEASED_PRESETS = tuple(VARIANTS[name].preset for name in PRESET_VARIANTS)


@dataclass
class TextEncoderConfig15:
    """How prompts become 1.5 conditioning (the official values by default)."""

    max_text_tokens: int = 1000
    """LLM tokens kept after the template crop (longer prompts are truncated)."""
    hidden_state_skip_layer: int = 2
    """Use the LLM hidden state this many layers before the last (`hidden_states[-3]`, no final norm)."""
    crop_start: int | None = None
    """Template tokens before the prompt; null computes it from the tokenizer (108 for Qwen2.5-VL)."""
    glyph_max_tokens: int = 256
    """byT5 tokens of the prompt's quoted text (EOS included)."""
    glyph_dtype: str = "float32"
    """Dtype of the byT5 glyph encoder (the official code runs it in float32)."""


def preset_variant(preset: str) -> Variant15 | None:
    """The released variant a preset runs, None for the tiny preset (any setting goes)."""
    for name in PRESET_VARIANTS:
        if VARIANTS[name].preset == preset:
            return VARIANTS[name]
    return None
