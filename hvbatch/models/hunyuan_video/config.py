"""HunyuanVideo 1.0's config sections: `model.transformer` (architecture) and `model.text_encoder`.

The family registers these as the types of its sections of the config tree (`ModelFamily.config_sections`),
so omegaconf checks keys and types against them; defaults are the released 720p model's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

RELEASED_PRESET = "hunyuan-video-t2v-720p"
"""The released 720p text-to-video model (HYVideo-T/2-cfgdistill): hvbatch's default preset."""
TINY_PRESET = "tiny"
"""The released structure at a size that runs on a CPU in seconds, with seeded random weights."""
I2V_PRESET = "hunyuan-video-i2v-720p"
"""HunyuanVideo-I2V (2025-03, the `token_replace` weights): the 1.0 architecture conditioned on an image."""
TINY_I2V_PRESET = "tiny-i2v"
"""The image-to-video structure at the tiny size, seeded random weights (a tiny LLaVA included)."""
IMAGE_CONDITION_TYPES = ("token_replace",)
"""`TransformerConfig.image_condition_type` values built (the official `--i2v-condition-type`;
`latent_concat`, the 33-channel variant, is not)."""


@dataclass
class TransformerConfig:
    """Architecture of the HunyuanVideo diffusion transformer (defaults: HYVideo-T/2-cfgdistill)."""

    in_channels: int = 16
    """Latent channels in."""
    out_channels: int = 16
    """Latent channels out (the predicted velocity)."""
    num_heads: int = 24
    """Attention heads; hidden size is num_heads * head_dim."""
    head_dim: int = 128
    """Channels per head; must equal sum(rope_axes_dim)."""
    mlp_ratio: float = 4.0
    """MLP width as a multiple of the hidden size (blocks and token refiner)."""
    num_double_blocks: int = 20
    """Dual-stream (image, text) blocks: official `mm_double_blocks_depth`."""
    num_single_blocks: int = 40
    """Single-stream blocks: official `mm_single_blocks_depth`."""
    num_refiner_blocks: int = 2
    """Token-refiner blocks applied to the LLM text states."""
    refiner_mlp_ratio: float = 4.0
    """Token-refiner MLP width ratio (4 in the official code and in diffusers, whatever mlp_ratio is)."""
    patch_size: int = 2
    """Spatial patch size (height and width)."""
    patch_size_t: int = 1
    """Temporal patch size."""
    rope_axes_dim: list[int] = field(default_factory=lambda: [16, 56, 56])
    """Head channels rotated by the (t, h, w) positions; sums to head_dim."""
    rope_theta: float = 256.0
    """RoPE base."""
    text_dim: int = 4096
    """Channels of the LLM text states (`text_states`)."""
    pooled_text_dim: int = 768
    """Channels of the pooled CLIP embedding (`text_states_2`)."""
    guidance_embed: bool = True
    """Guidance-distilled model with an embedded-guidance input (`guidance_in`)."""
    image_condition_type: str | None = None
    """Image-to-video (HunyuanVideo-I2V): `token_replace` (latent frame 0 is the clean image latent
    and its tokens are modulated with a t = 0 embedding); null for text-to-video."""

    @property
    def hidden_size(self) -> int:
        return self.num_heads * self.head_dim

    def validate(self) -> None:
        """Raise ValueError naming every inconsistent field."""
        problems = []
        if len(self.rope_axes_dim) != 3:
            problems.append(f"rope_axes_dim must have 3 entries (t, h, w), got {list(self.rope_axes_dim)}")
        elif sum(self.rope_axes_dim) != self.head_dim:
            problems.append(
                f"sum(rope_axes_dim)={sum(self.rope_axes_dim)} must equal head_dim={self.head_dim}"
            )
        if any(d % 2 for d in self.rope_axes_dim):
            problems.append(f"every rope_axes_dim entry must be even, got {list(self.rope_axes_dim)}")
        for name in ("in_channels", "out_channels", "num_heads", "head_dim", "patch_size", "patch_size_t"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.image_condition_type is not None and self.image_condition_type not in IMAGE_CONDITION_TYPES:
            problems.append(
                f"image_condition_type={self.image_condition_type!r} is not supported (built: "
                f"{', '.join(IMAGE_CONDITION_TYPES)}, or null for text-to-video; the 33-channel "
                "latent_concat weights are not)"
            )
        if self.image_condition_type == "token_replace" and self.in_channels != self.out_channels:
            problems.append(
                f"token_replace takes the noisy latents alone: in_channels={self.in_channels} must equal "
                f"out_channels={self.out_channels}"
            )
        if problems:
            raise ValueError("invalid transformer config: " + "; ".join(problems))

    @property
    def token_replace(self) -> bool:
        return self.image_condition_type == "token_replace"


@dataclass
class TextEncoderConfig:
    """How prompts become conditioning (the reference's values by default)."""

    max_text_tokens: int = 256
    """LLM tokens kept after the template is cropped off (longer prompts are truncated)."""
    hidden_state_skip_layer: int = 2
    """Use the LLM hidden state this many layers before the last (no final norm)."""
    crop_start_video: int | None = 95
    """Template tokens before the prompt (video template); null measures it with the tokenizer."""
    crop_start_image: int | None = 36
    """Likewise for the image template, used when num_frames == 1."""
    clip_max_tokens: int = 77
    """CLIP-L tokens."""
    crop_start_i2v: int | None = 103
    """Image-to-video (LLaVA with the image): template tokens before the prompt, counting the one
    `<image>` placeholder (the official 103); null measures it with the tokenizer."""
    image_embed_interleave: int = 4
    """Image-to-video: every n-th of LLaVA's image tokens is kept (the official 4 for token_replace:
    576 -> 144 tokens in front of the text)."""
    i2v_stability: bool = True
    """Image-to-video: start from 0.999 x noise + 0.001 x image latent (the official `--i2v-stability`,
    paired with flow_shift 7); false starts from pure noise (the official pairs it with flow_shift 17)."""
