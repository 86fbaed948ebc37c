"""Architecture of the HunyuanVideo-1.5 VAE, as a plain dataclass.

`full()` is the released VAE (32 latent channels, 16x spatial, 4x temporal, ~1.26B parameters),
`tiny()` the same structure at a width that decodes a small video on a CPU in about a second.
`from_diffusers_config` / `from_official_config` read a `vae/config.json` of either layout and
refuse, naming the field, anything this implementation does not build.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

DIFFUSERS_CLASS_NAME = "AutoencoderKLHunyuanVideo15"
OFFICIAL_CLASS_NAME = "AutoencoderKLConv3D"
_IGNORED_OFFICIAL = ("sample_size", "sample_tsize")
"""Official tiling hints: hvbatch's tiling is set by VaeTilingConfig instead."""


@dataclass
class HunyuanVideo15VaeConfig:
    """Defaults: the released HunyuanVideo-1.5 VAE (official `AutoencoderKLConv3D`)."""

    in_channels: int = 3
    """Video channels fed to the encoder."""
    out_channels: int = 3
    """Video channels produced by the decoder."""
    latent_channels: int = 32
    """Channels of the latent z (the encoder emits twice as many: mean and log-variance)."""
    block_out_channels: list[int] = field(default_factory=lambda: [128, 256, 512, 1024, 1024])
    """Channels per resolution level, encoder order (the decoder walks it backwards)."""
    layers_per_block: int = 2
    """Resnets per encoder level; decoder levels have one more."""
    spatial_compression_ratio: int = 16
    """Pixels per latent cell along H and W (official `ffactor_spatial`)."""
    temporal_compression_ratio: int = 4
    """Video frames per latent frame after the first (official `ffactor_temporal`)."""
    scaling_factor: float = 1.03682
    """The DiT works on z * scaling_factor (no shift)."""

    @property
    def shift_factor(self) -> float:
        """Added to the latents after dividing by scaling_factor: none for this VAE."""
        return 0.0

    @property
    def spatial_levels(self) -> int:
        """Encoder levels that halve H and W (the first ones)."""
        return int(math.log2(self.spatial_compression_ratio))

    @property
    def temporal_levels(self) -> int:
        """Levels that also halve T: the last spatial ones in the encoder, the first in the decoder."""
        return int(math.log2(self.temporal_compression_ratio))

    def down_temporal(self, level: int) -> bool | None:
        """None if encoder level `level` has no downsampler, else whether it also halves T."""
        if level >= self.spatial_levels:
            return None
        return level >= self.spatial_levels - self.temporal_levels

    def up_temporal(self, level: int) -> bool | None:
        """None if decoder level `level` has no upsampler, else whether it also doubles T."""
        if level >= self.spatial_levels:
            return None
        return level < self.temporal_levels

    def validate(self) -> None:
        """Raise ValueError naming every inconsistent field."""
        problems = []
        counts = ("in_channels", "out_channels", "latent_channels", "layers_per_block")
        for name in (*counts, "spatial_compression_ratio", "temporal_compression_ratio"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                problems.append(f"{name} must be a positive integer, got {value!r}")
        channels = list(self.block_out_channels)
        if not channels or not all(isinstance(c, int) and c >= 1 for c in channels):
            problems.append(f"block_out_channels must be a list of positive integers, got {channels}")
        if not isinstance(self.scaling_factor, (int, float)) or not self.scaling_factor > 0:
            problems.append(f"scaling_factor must be > 0, got {self.scaling_factor!r}")
        if problems:
            raise ValueError("invalid HunyuanVideo-1.5 VAE config: " + "; ".join(problems))
        problems += self._geometry_problems(channels)
        if problems:
            raise ValueError("invalid HunyuanVideo-1.5 VAE config: " + "; ".join(problems))

    def _geometry_problems(self, channels: list[int]) -> list[str]:
        s, t, z = self.spatial_compression_ratio, self.temporal_compression_ratio, self.latent_channels
        if s & (s - 1) or t & (t - 1) or s < 2:
            return [f"compression ratios must be powers of two (spatial >= 2), got spatial={s}, temporal={t}"]
        if t > s or self.spatial_levels > len(channels) - 1:
            return [
                f"spatial_compression_ratio={s} needs log2({s}) = {self.spatial_levels} levels with a "
                f"downsampler plus one without (block_out_channels has {len(channels)}), and "
                f"temporal_compression_ratio={t} must not exceed it"
            ]
        problems = []
        if channels[-1] % (2 * z):
            problems.append(
                f"block_out_channels[-1]={channels[-1]} must be a multiple of 2 * latent_channels={2 * z}"
            )
        for level in range(self.spatial_levels):
            c_in, c_out = channels[level], channels[level + 1]
            if not _packs(c_in, c_out, 8 if self.down_temporal(level) else 4):
                problems.append(
                    f"encoder level {level} cannot pixel-unshuffle {c_in} -> {c_out} channels "
                    f"({'T, H, W' if self.down_temporal(level) else 'H, W'} halved)"
                )
            c_in, c_out = channels[::-1][level], channels[::-1][level + 1]
            if not _packs(c_out, c_in, 8 if self.up_temporal(level) else 4):
                problems.append(
                    f"decoder level {level} cannot pixel-shuffle {c_in} -> {c_out} channels "
                    f"({'T, H, W' if self.up_temporal(level) else 'H, W'} doubled)"
                )
        return problems

    @classmethod
    def full(cls) -> HunyuanVideo15VaeConfig:
        """The released VAE (1.26B parameters)."""
        return cls()

    @classmethod
    def tiny(cls) -> HunyuanVideo15VaeConfig:
        """The 1.5 structure (5 levels, 32 latent channels, 16x / 4x), widths 8..64, one resnet a level."""
        return cls(block_out_channels=[8, 16, 32, 64, 64], layers_per_block=1)

    def with_changes(self, **changes: Any) -> HunyuanVideo15VaeConfig:
        return replace(self, **changes)

    @classmethod
    def from_diffusers_config(
        cls, raw: Mapping[str, Any], origin: str = "config.json"
    ) -> HunyuanVideo15VaeConfig:
        """A diffusers `AutoencoderKLHunyuanVideo15` config.json (its defaults for absent fields)."""
        return _from_config(raw, origin, DIFFUSERS_CLASS_NAME, _DIFFUSERS_NAMES, ())

    @classmethod
    def from_official_config(
        cls, raw: Mapping[str, Any], origin: str = "config.json"
    ) -> HunyuanVideo15VaeConfig:
        """An official `vae/config.json` (`AutoencoderKLConv3D`, `ffactor_spatial` / `ffactor_temporal`)."""
        return _from_config(raw, origin, OFFICIAL_CLASS_NAME, _OFFICIAL_NAMES, _IGNORED_OFFICIAL)

    def to_diffusers_config(self) -> dict[str, Any]:
        """The diffusers config.json fields (tests build diffusers' model and checkpoints from it)."""
        values = {name: self._value(ours) for name, ours in _DIFFUSERS_NAMES}
        return {"_class_name": DIFFUSERS_CLASS_NAME, **values}

    def to_official_config(self) -> dict[str, Any]:
        """The official config.json fields (what `AutoencoderKLConv3D.from_pretrained` reads)."""
        values = {name: self._value(ours) for name, ours in _OFFICIAL_NAMES}
        return {"_class_name": OFFICIAL_CLASS_NAME, **values, "sample_size": 256, "sample_tsize": 64}

    def _value(self, name: str | None) -> Any:
        if name is None:  # a fixed field: only the released value is built
            return True
        value = getattr(self, name)
        return list(value) if isinstance(value, (list, tuple)) else value


def _packs(wide: int, narrow: int, cells: int) -> bool:
    """Whether a (un)shuffle that packs `cells` cells (4: H, W; 8: T, H, W) fits these widths.

    `narrow` is the side that is split into cells (the downsampler's output, the upsampler's
    input), `wide` the other; `cells * wide / narrow` channels are averaged (or repeated) per
    output channel, half as many in the single first frame when T is halved too.
    """
    if narrow % cells or wide % (cells // 2) or (cells * wide) % narrow:
        return False
    return cells == 4 or (cells * wide // narrow) % 2 == 0


# (config.json key, our field); None marks a flag that must be true (the released value).
_COMMON = (
    ("in_channels", "in_channels"),
    ("out_channels", "out_channels"),
    ("latent_channels", "latent_channels"),
    ("block_out_channels", "block_out_channels"),
    ("layers_per_block", "layers_per_block"),
    ("scaling_factor", "scaling_factor"),
    ("downsample_match_channel", None),
    ("upsample_match_channel", None),
)
_DIFFUSERS_NAMES = (
    *_COMMON,
    ("spatial_compression_ratio", "spatial_compression_ratio"),
    ("temporal_compression_ratio", "temporal_compression_ratio"),
)
_OFFICIAL_NAMES = (
    *_COMMON,
    ("ffactor_spatial", "spatial_compression_ratio"),
    ("ffactor_temporal", "temporal_compression_ratio"),
)


def _from_config(
    raw: Mapping[str, Any],
    origin: str,
    class_name: str,
    names: tuple[tuple[str, str | None], ...],
    ignored: tuple[str, ...],
) -> HunyuanVideo15VaeConfig:
    found = raw.get("_class_name", class_name)
    if found != class_name:
        raise ValueError(f"{origin}: _class_name is {found!r}, expected {class_name!r}")
    known = {key for key, _ in names}
    allowed = known | set(ignored) | {"shift_factor"}
    unknown = sorted(k for k in raw if k not in allowed and not k.startswith("_"))
    problems = [f"unknown keys {unknown} (known: {sorted(known)})"] if unknown else []
    if raw.get("shift_factor") not in (None, 0, 0.0):
        problems.append(f"shift_factor={raw['shift_factor']!r} (the HunyuanVideo-1.5 VAE has no shift: null)")
    problems += [
        f"{key}={raw[key]!r} (only true, the released value, is built)"
        for key, ours in names
        if ours is None and key in raw and raw[key] is not True
    ]
    if problems:
        raise ValueError(f"{origin}: unsupported HunyuanVideo-1.5 VAE settings: " + "; ".join(problems))
    kwargs = {ours: raw[key] for key, ours in names if ours is not None and key in raw}
    if isinstance(kwargs.get("block_out_channels"), (list, tuple)):
        kwargs["block_out_channels"] = list(kwargs["block_out_channels"])
    config = HunyuanVideo15VaeConfig(**kwargs)
    try:
        config.validate()
    except ValueError as err:
        raise ValueError(f"{origin}: {err}") from None
    return config
