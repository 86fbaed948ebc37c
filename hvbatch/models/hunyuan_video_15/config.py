"""Architecture of the HunyuanVideo-1.5 diffusion transformer, as a plain dataclass.

`full()` is the released 8.3B model (every released variant; `use_meanflow` only for the 480p
step-distilled one), `tiny()` the same structure at a size that runs on a CPU in seconds.
`super_resolution=True` gives the SR transformers' input (`transformer/720p_sr_distilled/`,
`1080p_sr_distilled/`): the same DiT with 98 input channels, `[noisy latents | condition latents |
condition mask | upsampled low-resolution latents | their mask]`.
`from_diffusers_config` / `from_official_config` read a checkpoint's `config.json` and refuse,
naming the field, anything this implementation does not build.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

DIFFUSERS_CLASS_NAME = "HunyuanVideo15Transformer3DModel"
OFFICIAL_CLASS_NAME = "HunyuanVideo_1_5_DiffusionTransformer"
GLYPH_HIDDEN_DIM = 2048
"""Hidden width of the byT5 projection (`byt5_in`): fixed at 2048 in the official code and in diffusers."""


@dataclass
class HunyuanVideo15TransformerConfig:
    """Defaults: the released 8.3B model (`hidden 2048 = 16 heads x 128`, 54 double blocks)."""

    in_channels: int = 65
    """Channels into `img_in`: noisy latents, then condition latents and the condition mask
    (`2 * out + 1`); super-resolution adds the low-resolution latents and their mask (`3 * out + 2`)."""
    out_channels: int = 32
    """Latent channels out (the predicted velocity) = noisy latent channels."""
    num_heads: int = 16
    head_dim: int = 128
    """Channels per head; must equal sum(rope_axes_dim)."""
    mlp_ratio: float = 4.0
    """Double-block MLP width as a multiple of the hidden size."""
    num_double_blocks: int = 54
    """Official `mm_double_blocks_depth` (1.5 has no single-stream blocks)."""
    num_refiner_blocks: int = 2
    """Token-refiner blocks on the LLM states (fixed at 2 in the official code)."""
    refiner_mlp_ratio: float = 4.0
    patch_size: int = 1
    """Spatial patch size (height and width)."""
    patch_size_t: int = 1
    rope_axes_dim: list[int] = field(default_factory=lambda: [16, 56, 56])
    """Head channels rotated by the (t, h, w) positions; sums to head_dim."""
    rope_theta: float = 256.0
    text_dim: int = 3584
    """Channels of the LLM (Qwen2.5-VL) states."""
    glyph_dim: int = 1472
    """Channels of the byT5 glyph states."""
    glyph_hidden_dim: int = GLYPH_HIDDEN_DIM
    """Hidden width of `byt5_in` (2048 in every released checkpoint; smaller only for tiny models)."""
    image_embed_dim: int = 1152
    """Channels of the SigLIP image-encoder tokens (`vision_in`)."""
    use_meanflow: bool = False
    """MeanFlow second timestep embedding `time_r_in` (the 480p step-distilled checkpoint)."""

    @property
    def hidden_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def condition_channels(self) -> int:
        """Condition latents plus the mask, concatenated after the noisy latents."""
        return self.in_channels - self.out_channels

    @property
    def is_super_resolution(self) -> bool:
        """An SR transformer: the condition holds the upsampled low-resolution latents too."""
        return self.in_channels == 3 * self.out_channels + 2

    @property
    def patch(self) -> tuple[int, int, int]:
        return (self.patch_size_t, self.patch_size, self.patch_size)

    def validate(self) -> None:
        """Raise ValueError naming every inconsistent field."""
        problems = []
        positive = (
            "in_channels", "out_channels", "num_heads", "head_dim", "num_double_blocks", "patch_size",
            "patch_size_t", "text_dim", "glyph_dim", "glyph_hidden_dim", "image_embed_dim",
        )  # fmt: skip
        for name in positive:
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_refiner_blocks < 0:
            problems.append(f"num_refiner_blocks must be >= 0, got {self.num_refiner_blocks}")
        for name in ("mlp_ratio", "refiner_mlp_ratio", "rope_theta"):
            if not getattr(self, name) > 0:
                problems.append(f"{name} must be > 0, got {getattr(self, name)}")
        if self.in_channels not in (2 * self.out_channels + 1, 3 * self.out_channels + 2):
            problems.append(
                f"in_channels={self.in_channels} must be 2 * out_channels + 1 = {2 * self.out_channels + 1} "
                "(noisy latents, condition latents, one mask channel) or, for super-resolution, "
                f"3 * out_channels + 2 = {3 * self.out_channels + 2} (plus low-resolution latents and mask)"
            )
        axes = list(self.rope_axes_dim)
        if len(axes) != 3:
            problems.append(f"rope_axes_dim must have 3 entries (t, h, w), got {axes}")
        elif sum(axes) != self.head_dim:
            problems.append(f"sum(rope_axes_dim)={sum(axes)} must equal head_dim={self.head_dim}")
        if any(d % 2 for d in axes):
            problems.append(f"every rope_axes_dim entry must be even, got {axes}")
        if problems:
            raise ValueError("invalid HunyuanVideo-1.5 transformer config: " + "; ".join(problems))

    @classmethod
    def full(
        cls, *, use_meanflow: bool = False, super_resolution: bool = False
    ) -> HunyuanVideo15TransformerConfig:
        """The released 8.3B transformer (MeanFlow: the 480p step-distilled image-to-video one)."""
        return cls(in_channels=98 if super_resolution else 65, use_meanflow=use_meanflow)

    @classmethod
    def tiny(
        cls, *, use_meanflow: bool = False, super_resolution: bool = False
    ) -> HunyuanVideo15TransformerConfig:
        """The 1.5 structure in seconds on a CPU: 12 heads (Ulysses 1, 2, 3, 4, 6, 12), 2 double blocks.

        Latent channels stay 32 (the family's latent geometry); the encoder widths are small.
        """
        return cls(
            in_channels=98 if super_resolution else 65,
            num_heads=12,
            head_dim=16,
            num_double_blocks=2,
            num_refiner_blocks=1,
            rope_axes_dim=[4, 6, 6],
            text_dim=64,
            glyph_dim=24,
            glyph_hidden_dim=40,
            image_embed_dim=48,
            use_meanflow=use_meanflow,
        )

    def with_changes(self, **changes: Any) -> HunyuanVideo15TransformerConfig:
        return replace(self, **changes)

    @classmethod
    def from_diffusers_config(
        cls, raw: Mapping[str, Any], origin: str = "config.json"
    ) -> HunyuanVideo15TransformerConfig:
        """A diffusers `HunyuanVideo15Transformer3DModel` config.json (its defaults for absent fields)."""
        class_name = raw.get("_class_name", DIFFUSERS_CLASS_NAME)
        if class_name != DIFFUSERS_CLASS_NAME:
            raise ValueError(f"{origin}: _class_name is {class_name!r}, expected {DIFFUSERS_CLASS_NAME!r}")
        if raw.get("qk_norm", "rms_norm") != "rms_norm":
            raise ValueError(f"{origin}: qk_norm={raw['qk_norm']!r} is not supported (only 'rms_norm')")
        out_channels = raw.get("out_channels") or raw.get("in_channels", 65)
        config = cls(
            in_channels=int(raw.get("in_channels", 65)),
            out_channels=int(out_channels),
            num_heads=int(raw.get("num_attention_heads", 16)),
            head_dim=int(raw.get("attention_head_dim", 128)),
            mlp_ratio=float(raw.get("mlp_ratio", 4.0)),
            num_double_blocks=int(raw.get("num_layers", 54)),
            num_refiner_blocks=int(raw.get("num_refiner_layers", 2)),
            patch_size=int(raw.get("patch_size", 1)),
            patch_size_t=int(raw.get("patch_size_t", 1)),
            rope_axes_dim=[int(d) for d in raw.get("rope_axes_dim", (16, 56, 56))],
            rope_theta=float(raw.get("rope_theta", 256.0)),
            text_dim=int(raw.get("text_embed_dim", 3584)),
            glyph_dim=int(raw.get("text_embed_2_dim", 1472)),
            image_embed_dim=int(raw.get("image_embed_dim", 1152)),
            use_meanflow=bool(raw.get("use_meanflow", False)),
        )
        _validate_from(config, origin)
        return config

    def to_diffusers_config(self) -> dict[str, Any]:
        """The diffusers config.json fields of this architecture (tests write checkpoints with it)."""
        if self.glyph_hidden_dim != GLYPH_HIDDEN_DIM or self.refiner_mlp_ratio != 4.0:
            raise ValueError(
                "diffusers fixes glyph_hidden_dim=2048 and refiner_mlp_ratio=4: no diffusers config"
            )
        return {
            "_class_name": DIFFUSERS_CLASS_NAME,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "num_attention_heads": self.num_heads,
            "attention_head_dim": self.head_dim,
            "num_layers": self.num_double_blocks,
            "num_refiner_layers": self.num_refiner_blocks,
            "mlp_ratio": self.mlp_ratio,
            "patch_size": self.patch_size,
            "patch_size_t": self.patch_size_t,
            "qk_norm": "rms_norm",
            "text_embed_dim": self.text_dim,
            "text_embed_2_dim": self.glyph_dim,
            "image_embed_dim": self.image_embed_dim,
            "rope_theta": self.rope_theta,
            "rope_axes_dim": list(self.rope_axes_dim),
            "use_meanflow": self.use_meanflow,
        }

    @classmethod
    def from_official_config(
        cls, raw: Mapping[str, Any], origin: str = "config.json"
    ) -> HunyuanVideo15TransformerConfig:
        """An official `transformer/<version>/config.json` (`HunyuanVideo_1_5_DiffusionTransformer`).

        The `img_in` width follows the official PatchEmbed (`concat_condition`,
        `is_reshape_temporal_channels`), so an SR config of 98 input channels reads as super-resolution.
        """
        problems = [
            f"{key}={raw[key]!r} (this implementation builds {want!r})"
            for key, want in _OFFICIAL_FIXED.items()
            if key in raw and raw[key] != want
        ]
        patch = list(raw.get("patch_size", [1, 1, 1]))
        if len(patch) != 3 or patch[1] != patch[2]:
            problems.append(f"patch_size={patch} (expected [t, p, p])")
        if problems:
            raise ValueError(
                f"{origin}: unsupported HunyuanVideo-1.5 transformer settings: " + "; ".join(problems)
            )
        hidden, heads = int(raw.get("hidden_size", 2048)), int(raw.get("heads_num", 16))
        if hidden % heads:
            raise ValueError(f"{origin}: hidden_size={hidden} is not divisible by heads_num={heads}")
        latent = int(raw.get("in_channels", 32))
        config = cls(
            in_channels=_official_img_in_channels(raw, latent),
            out_channels=int(raw.get("out_channels") or latent),
            num_heads=heads,
            head_dim=hidden // heads,
            mlp_ratio=float(raw.get("mlp_width_ratio", 4.0)),
            num_double_blocks=int(raw.get("mm_double_blocks_depth", 54)),
            patch_size=int(patch[1]),
            patch_size_t=int(patch[0]),
            rope_axes_dim=[int(d) for d in raw.get("rope_dim_list", [16, 56, 56])],
            rope_theta=float(raw.get("rope_theta", 256)),
            text_dim=int(raw.get("text_states_dim", 3584)),
            image_embed_dim=int(raw.get("vision_states_dim", 1152)),
            use_meanflow=bool(raw.get("use_meanflow", False)),
        )
        _validate_from(config, origin)
        return config

    def to_official_config(self, **metadata: Any) -> dict[str, Any]:
        """The official config.json fields of this architecture (`metadata`: e.g. ideal_resolution)."""
        problems = [
            f"{name}={getattr(self, name)} (official: {want})"
            for name, want in (
                ("num_refiner_blocks", 2), ("refiner_mlp_ratio", 4.0), ("glyph_dim", 1472),
                ("glyph_hidden_dim", GLYPH_HIDDEN_DIM),
            )
            if getattr(self, name) != want
        ]  # fmt: skip
        if problems:
            raise ValueError("the official code fixes " + ", ".join(problems) + ": no official config")
        return {
            "_class_name": OFFICIAL_CLASS_NAME,
            **_OFFICIAL_FIXED,
            # The official PatchEmbed widens `in_channels` to 2 * in + 1 when concat_condition is set;
            # the SR width (3 * out + 2) is only reachable with it off.
            "concat_condition": not self.is_super_resolution,
            "is_reshape_temporal_channels": False,
            "patch_size": list(self.patch),
            "in_channels": self.in_channels if self.is_super_resolution else self.out_channels,
            "out_channels": self.out_channels,
            "hidden_size": self.hidden_size,
            "heads_num": self.num_heads,
            "mlp_width_ratio": self.mlp_ratio,
            "mm_double_blocks_depth": self.num_double_blocks,
            "rope_dim_list": list(self.rope_axes_dim),
            "rope_theta": self.rope_theta,
            "text_states_dim": self.text_dim,
            "text_states_dim_2": None,
            "vision_states_dim": self.image_embed_dim,
            "use_meanflow": self.use_meanflow,
            **metadata,
        }


_OFFICIAL_FIXED: dict[str, Any] = {
    "mm_single_blocks_depth": 0,
    "mlp_act_type": "gelu_tanh",
    "qkv_bias": True,
    "qk_norm": True,
    "qk_norm_type": "rms",
    "guidance_embed": False,
    "text_projection": "single_refiner",
    "use_attention_mask": True,
    "text_pool_type": None,
    "glyph_byT5_v2": True,
    "vision_projection": "linear",
    "use_cond_type_embedding": True,
}
"""Official config fields every released 1.5 transformer has, and the only values built here."""


def _official_img_in_channels(raw: Mapping[str, Any], in_channels: int) -> int:
    """The input width of the official `img_in` (its PatchEmbed): `concat_condition` (default on)
    widens `in_channels` to `2 * in + 1`, or `in + in // 2 + 1` with `is_reshape_temporal_channels`."""
    if not raw.get("concat_condition", True):
        return in_channels
    if raw.get("is_reshape_temporal_channels", False):
        return in_channels + in_channels // 2 + 1
    return 2 * in_channels + 1


def _validate_from(config: HunyuanVideo15TransformerConfig, origin: str) -> None:
    try:
        config.validate()
    except ValueError as err:
        raise ValueError(f"{origin}: {err}") from err
