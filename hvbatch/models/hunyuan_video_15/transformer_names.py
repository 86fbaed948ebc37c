"""Official <-> diffusers parameter names of the HunyuanVideo-1.5 transformer: the one table.

The model uses the official names. Each official module maps to one diffusers module, except the
token refiner's fused `self_attn_qkv`, which diffusers splits into `attn.to_q/to_k/to_v`, and the
final layer's modulation, whose two halves diffusers stores swapped (it chunks `(scale, shift)`,
the official code `(shift, scale)`). A rule names the diffusers tensors an official tensor is
built from, so a conversion reports exactly which diffusers tensors are missing or unused.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

_TOP_LEVEL: dict[str, str] = {
    "img_in.proj": "x_embedder.proj",
    "time_in.mlp.0": "time_embed.timestep_embedder.linear_1",
    "time_in.mlp.2": "time_embed.timestep_embedder.linear_2",
    "time_r_in.mlp.0": "time_embed.timestep_embedder_r.linear_1",
    "time_r_in.mlp.2": "time_embed.timestep_embedder_r.linear_2",
    "txt_in.input_embedder": "context_embedder.proj_in",
    "txt_in.t_embedder.mlp.0": "context_embedder.time_text_embed.timestep_embedder.linear_1",
    "txt_in.t_embedder.mlp.2": "context_embedder.time_text_embed.timestep_embedder.linear_2",
    "txt_in.c_embedder.linear_1": "context_embedder.time_text_embed.text_embedder.linear_1",
    "txt_in.c_embedder.linear_2": "context_embedder.time_text_embed.text_embedder.linear_2",
    "byt5_in.layernorm": "context_embedder_2.norm",
    "byt5_in.fc1": "context_embedder_2.linear_1",
    "byt5_in.fc2": "context_embedder_2.linear_2",
    "byt5_in.fc3": "context_embedder_2.linear_3",
    "vision_in.proj.0": "image_embedder.norm_in",
    "vision_in.proj.1": "image_embedder.linear_1",
    "vision_in.proj.3": "image_embedder.linear_2",
    "vision_in.proj.4": "image_embedder.norm_out",
    "cond_type_embedding": "cond_type_embed",
    "final_layer.linear": "proj_out",
    "final_layer.adaLN_modulation.1": "norm_out.linear",  # halves swapped
}
_REFINER_BLOCK: dict[str, str] = {
    "norm1": "norm1",
    "norm2": "norm2",
    "self_attn_qkv": "attn.to_q|attn.to_k|attn.to_v",  # fused in the official layout
    "self_attn_proj": "attn.to_out.0",
    "mlp.fc1": "ff.net.0.proj",
    "mlp.fc2": "ff.net.2",
    "adaLN_modulation.1": "norm_out.linear",
}
_DOUBLE_BLOCK: dict[str, str] = {
    "img_mod.linear": "norm1.linear",
    "txt_mod.linear": "norm1_context.linear",
    "img_attn_q": "attn.to_q",
    "img_attn_k": "attn.to_k",
    "img_attn_v": "attn.to_v",
    "img_attn_q_norm": "attn.norm_q",
    "img_attn_k_norm": "attn.norm_k",
    "img_attn_proj": "attn.to_out.0",
    "txt_attn_q": "attn.add_q_proj",
    "txt_attn_k": "attn.add_k_proj",
    "txt_attn_v": "attn.add_v_proj",
    "txt_attn_q_norm": "attn.norm_added_q",
    "txt_attn_k_norm": "attn.norm_added_k",
    "txt_attn_proj": "attn.to_add_out",
    "img_mlp.fc1": "ff.net.0.proj",
    "img_mlp.fc2": "ff.net.2",
    "txt_mlp.fc1": "ff_context.net.0.proj",
    "txt_mlp.fc2": "ff_context.net.2",
}
_BLOCKS: list[tuple[re.Pattern[str], str, dict[str, str]]] = [
    (
        re.compile(r"txt_in\.individual_token_refiner\.blocks\.(\d+)\.(.+)"),
        "context_embedder.token_refiner.refiner_blocks.{}.",
        _REFINER_BLOCK,
    ),
    (re.compile(r"double_blocks\.(\d+)\.(.+)"), "transformer_blocks.{}.", _DOUBLE_BLOCK),
]
_SWAPPED_HALVES = "final_layer.adaLN_modulation.1."


def _swap_halves(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


@dataclass(frozen=True)
class NameRule:
    """How one official tensor is built from diffusers tensors, and back."""

    official: str
    diffusers: tuple[str, ...]
    swap_halves: bool = False

    def to_official(self, tensors: Iterable[torch.Tensor]) -> torch.Tensor:
        parts = list(tensors)
        value = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        return _swap_halves(value) if self.swap_halves else value

    def to_diffusers(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        value = _swap_halves(tensor) if self.swap_halves else tensor
        return list(value.chunk(len(self.diffusers), dim=0)) if len(self.diffusers) > 1 else [value]


def _module_and_leaf(key: str) -> tuple[str, str]:
    module, _, leaf = key.rpartition(".")
    return module, leaf


def name_rule(official_key: str) -> NameRule:
    """The rule for one official parameter name; ValueError for a name the table does not know."""
    module, leaf = _module_and_leaf(official_key)
    target: str | None = _TOP_LEVEL.get(module)
    if target is None:
        for pattern, prefix, leaves in _BLOCKS:
            match = pattern.fullmatch(module)
            if match and match.group(2) in leaves:
                target = "|".join(
                    prefix.format(match.group(1)) + t for t in leaves[match.group(2)].split("|")
                )
                break
    if target is None:
        raise ValueError(f"no diffusers name for official parameter {official_key!r}")
    sources = tuple(f"{t}.{leaf}" for t in target.split("|"))
    return NameRule(official_key, sources, swap_halves=official_key.startswith(_SWAPPED_HALVES))


def official_to_diffusers(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict with official names -> the same tensors under diffusers names."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        rule = name_rule(key)
        out.update(zip(rule.diffusers, rule.to_diffusers(tensor), strict=True))
    return out
