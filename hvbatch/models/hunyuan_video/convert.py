"""Diffusers `HunyuanVideoTransformer3DModel` checkpoints -> official HunyuanVideo parameter names.

This is the reverse of the official->diffusers conversion: diffusers splits the fused qkv and
`linear1` projections and swaps the halves of the final layer's modulation (it chunks
`(scale, shift)` where the official code chunks `(shift, scale)`). Each official key is built
from a list of diffusers keys and a combining rule, so a conversion can report exactly which
diffusers tensors are missing and which were left unused.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from hvbatch.models.hunyuan_video.config import IMAGE_CONDITION_TYPES, TransformerConfig

# Leaf renames inside one block: official module path -> diffusers module path(s).
_REFINER_LEAVES: dict[str, tuple[str, ...]] = {
    "norm1": ("norm1",),
    "norm2": ("norm2",),
    "self_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "self_attn_proj": ("attn.to_out.0",),
    "mlp.fc1": ("ff.net.0.proj",),
    "mlp.fc2": ("ff.net.2",),
    "adaLN_modulation.1": ("norm_out.linear",),
}
_DOUBLE_LEAVES: dict[str, tuple[str, ...]] = {
    "img_mod.linear": ("norm1.linear",),
    "txt_mod.linear": ("norm1_context.linear",),
    "img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "img_attn_q_norm": ("attn.norm_q",),
    "img_attn_k_norm": ("attn.norm_k",),
    "txt_attn_q_norm": ("attn.norm_added_q",),
    "txt_attn_k_norm": ("attn.norm_added_k",),
    "img_attn_proj": ("attn.to_out.0",),
    "txt_attn_proj": ("attn.to_add_out",),
    "img_mlp.fc1": ("ff.net.0.proj",),
    "img_mlp.fc2": ("ff.net.2",),
    "txt_mlp.fc1": ("ff_context.net.0.proj",),
    "txt_mlp.fc2": ("ff_context.net.2",),
}
_SINGLE_LEAVES: dict[str, tuple[str, ...]] = {
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": ("proj_out",),
    "q_norm": ("attn.norm_q",),
    "k_norm": ("attn.norm_k",),
    "modulation.linear": ("norm.linear",),
}
_TOP_LEVEL: dict[str, tuple[str, ...]] = {
    "img_in.proj": ("x_embedder.proj",),
    "time_in.mlp.0": ("time_text_embed.timestep_embedder.linear_1",),
    "time_in.mlp.2": ("time_text_embed.timestep_embedder.linear_2",),
    "guidance_in.mlp.0": ("time_text_embed.guidance_embedder.linear_1",),
    "guidance_in.mlp.2": ("time_text_embed.guidance_embedder.linear_2",),
    "vector_in.in_layer": ("time_text_embed.text_embedder.linear_1",),
    "vector_in.out_layer": ("time_text_embed.text_embedder.linear_2",),
    "txt_in.input_embedder": ("context_embedder.proj_in",),
    "txt_in.t_embedder.mlp.0": ("context_embedder.time_text_embed.timestep_embedder.linear_1",),
    "txt_in.t_embedder.mlp.2": ("context_embedder.time_text_embed.timestep_embedder.linear_2",),
    "txt_in.c_embedder.linear_1": ("context_embedder.time_text_embed.text_embedder.linear_1",),
    "txt_in.c_embedder.linear_2": ("context_embedder.time_text_embed.text_embedder.linear_2",),
    "final_layer.linear": ("proj_out",),
    "final_layer.adaLN_modulation.1": ("norm_out.linear",),
}
_BLOCK_PATTERNS: list[tuple[re.Pattern[str], str, dict[str, tuple[str, ...]]]] = [
    (
        re.compile(r"txt_in\.individual_token_refiner\.blocks\.(\d+)\.(.+)"),
        "context_embedder.token_refiner.refiner_blocks.{}.",
        _REFINER_LEAVES,
    ),
    (re.compile(r"double_blocks\.(\d+)\.(.+)"), "transformer_blocks.{}.", _DOUBLE_LEAVES),
    (re.compile(r"single_blocks\.(\d+)\.(.+)"), "single_transformer_blocks.{}.", _SINGLE_LEAVES),
]


def _concat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=0)


def _swap_halves(tensors: list[torch.Tensor]) -> torch.Tensor:
    scale, shift = tensors[0].chunk(2, dim=0)
    return torch.cat([shift, scale], dim=0)


@dataclass(frozen=True)
class SourceRule:
    """How one official tensor is built: from these diffusers keys, combined by `combine`."""

    sources: tuple[str, ...]
    combine: Callable[[list[torch.Tensor]], torch.Tensor]


def source_rule(official_key: str) -> SourceRule:
    """The diffusers keys (and combining rule) an official parameter name comes from."""
    module, param = official_key.rsplit(".", 1)
    if module in _TOP_LEVEL:
        combine = _swap_halves if module == "final_layer.adaLN_modulation.1" else _concat
        return SourceRule(tuple(f"{m}.{param}" for m in _TOP_LEVEL[module]), combine)
    for pattern, prefix, leaves in _BLOCK_PATTERNS:
        match = pattern.fullmatch(module)
        if match and match.group(2) in leaves:
            head = prefix.format(match.group(1))
            return SourceRule(tuple(f"{head}{m}.{param}" for m in leaves[match.group(2)]), _concat)
    raise KeyError(f"no diffusers source known for official key {official_key!r}")


def diffusers_to_official(
    official_keys: Iterable[str], get_tensor: Callable[[str], torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Build the official state dict for `official_keys`, reading diffusers tensors with `get_tensor`."""
    return {
        key: (rule := source_rule(key)).combine([get_tensor(s) for s in rule.sources])
        for key in official_keys
    }


def official_to_diffusers(state: dict[str, torch.Tensor], hidden_size: int) -> dict[str, torch.Tensor]:
    """The inverse conversion (splitting fused projections), e.g. to export for diffusers."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        rule = source_rule(key)
        if rule.combine is _swap_halves:
            out[rule.sources[0]] = _swap_halves([value])  # swapping halves is its own inverse
            continue
        # qkv splits in three equal parts; linear1 in q | k | v | mlp.
        sizes = [hidden_size] * (len(rule.sources) - 1)
        parts = value.split([*sizes, value.shape[0] - sum(sizes)])
        out.update({name: part.contiguous() for name, part in zip(rule.sources, parts, strict=True)})
    return out


def config_to_diffusers(config: TransformerConfig) -> dict[str, Any]:
    """Our architecture as a diffusers `config.json` dict."""
    raw: dict[str, Any] = {"_class_name": "HunyuanVideoTransformer3DModel", "qk_norm": "rms_norm"}
    for json_key, field_name in _CONFIG_FIELDS.items():
        raw[json_key] = getattr(config, field_name)
    raw["rope_axes_dim"] = list(config.rope_axes_dim)
    raw["image_condition_type"] = config.image_condition_type
    return raw


# diffusers config.json field -> TransformerConfig field.
_CONFIG_FIELDS = {
    "in_channels": "in_channels",
    "out_channels": "out_channels",
    "num_attention_heads": "num_heads",
    "attention_head_dim": "head_dim",
    "mlp_ratio": "mlp_ratio",
    "num_layers": "num_double_blocks",
    "num_single_layers": "num_single_blocks",
    "num_refiner_layers": "num_refiner_blocks",
    "patch_size": "patch_size",
    "patch_size_t": "patch_size_t",
    "rope_axes_dim": "rope_axes_dim",
    "rope_theta": "rope_theta",
    "text_embed_dim": "text_dim",
    "pooled_projection_dim": "pooled_text_dim",
    "guidance_embeds": "guidance_embed",
}


def config_from_diffusers(raw: dict[str, Any], source: str) -> TransformerConfig:
    """Map a diffusers transformer `config.json` onto our architecture fields."""
    unsupported = []
    if raw.get("qk_norm", "rms_norm") != "rms_norm":
        unsupported.append(f"qk_norm={raw['qk_norm']!r} (only 'rms_norm')")
    image_condition = raw.get("image_condition_type")
    if image_condition not in (None, *IMAGE_CONDITION_TYPES):
        unsupported.append(
            f"image_condition_type={image_condition!r} (image-to-video is built for "
            f"{', '.join(IMAGE_CONDITION_TYPES)} only)"
        )
    class_name = raw.get("_class_name", "HunyuanVideoTransformer3DModel")
    if class_name != "HunyuanVideoTransformer3DModel":
        unsupported.append(f"_class_name={class_name!r} (expected HunyuanVideoTransformer3DModel)")
    if unsupported:
        raise ValueError(f"{source}: unsupported transformer config: {'; '.join(unsupported)}")
    config = TransformerConfig()
    for json_key, field_name in _CONFIG_FIELDS.items():
        if json_key in raw and raw[json_key] is not None:
            value = raw[json_key]
            setattr(config, field_name, list(value) if field_name == "rope_axes_dim" else value)
    if raw.get("out_channels") is None:
        config.out_channels = config.in_channels
    config.image_condition_type = image_condition
    try:
        config.validate()
    except ValueError as err:
        raise ValueError(f"{source}: {err}") from err
    return config
