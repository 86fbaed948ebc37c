"""Parameter names of the HunyuanVideo-1.5 VAE: official <-> diffusers.

The model uses the official names; a diffusers checkpoint is renamed on read. The mapping is the
inverse of the one diffusers' `scripts/convert_hunyuan_video1_5_to_diffusers.py` applies (plus the
resnet shortcut, which the released widths never have). Every official name maps to exactly one
diffusers name and back.
"""

from __future__ import annotations

import re

# (official pattern, diffusers replacement) applied to the key's dotted path, in order.
_TO_DIFFUSERS = (
    (r"^(encoder|decoder)\.mid\.block_1\.", r"\1.mid_block.resnets.0."),
    (r"^(encoder|decoder)\.mid\.block_2\.", r"\1.mid_block.resnets.1."),
    (r"^(encoder|decoder)\.mid\.attn_1\.(q|k|v)\.", r"\1.mid_block.attentions.0.to_\2."),
    (r"^(encoder|decoder)\.mid\.attn_1\.", r"\1.mid_block.attentions.0."),
    (r"^encoder\.down\.(\d+)\.block\.(\d+)\.", r"encoder.down_blocks.\1.resnets.\2."),
    (r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0."),
    (r"^decoder\.up\.(\d+)\.block\.(\d+)\.", r"decoder.up_blocks.\1.resnets.\2."),
    (r"^decoder\.up\.(\d+)\.upsample\.", r"decoder.up_blocks.\1.upsamplers.0."),
    (r"\.nin_shortcut\.", r".conv_shortcut."),
)


def to_diffusers(name: str) -> str:
    """The diffusers `AutoencoderKLHunyuanVideo15` name of an official parameter name."""
    for pattern, replacement in _TO_DIFFUSERS:
        name = re.sub(pattern, replacement, name)
    return name


def diffusers_names(official: list[str]) -> dict[str, str]:
    """{diffusers name: official name} for the model's `official` names (a bijection)."""
    mapping = {to_diffusers(name): name for name in official}
    assert len(mapping) == len(official), "two official names map to one diffusers name"
    return mapping
