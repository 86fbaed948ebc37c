"""What the layers above `models/` may ask of a family's components: the calling conventions.

Shape legend: B batch, C latent channels, T/Hh/Ww latent frames/height/width, L tokens, D hidden
size, P patch volume x output channels. Every family implements these with its own classes; the
sampler, the parallel runners, the step cache and the pipeline use nothing else.

The transformer is called `model(x_BCTHW, t_B, cond, *, t_next_B=None, step_cache=None)` and is
split in stages (`token_grid`, `rope`, `embed_image`, `forward_tokens`, `unpatchify`) so that a
sequence-parallel runner can shard the image tokens between them without touching the model file.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

if TYPE_CHECKING:
    import torch
    from torch import nn

    from hvbatch.models.encoding import EncodedPrompts
    from hvbatch.models.vae_tiling import VaeTilingConfig

RopeTables = tuple["torch.Tensor", "torch.Tensor"]
"""`(cos_LD, sin_LD)` of the image tokens, in token order."""

C = TypeVar("C", bound="Conditioning")


class Conditioning(Protocol):
    """One family-defined conditioning object: everything the transformer reads besides x and t.

    Text lengths (and any other sizes) are plain Python ints, so a step never waits for the device.
    """

    @property
    def batch_size(self) -> int: ...

    def to(self: C, device: torch.device | str) -> C: ...

    @classmethod
    def cat(cls: type[C], items: Sequence[C]) -> C:
        """The items along the batch (the CFG batch `[uncond, cond]`), variable-length token streams
        right-padded, their lengths kept exactly."""
        ...

    def select(self: C, index: int) -> C:
        """Batch element `index` alone (a CFG-parallel branch)."""
        ...

    def for_sampling(self: C, sampling: Any) -> C:
        """This conditioning with what the model reads from a video's `SamplingConfig` (for
        example an embedded guidance scale); the sampler calls it once per video."""
        ...


# Optional capabilities of a conditioning, for families whose conditioning pins latents or depends on
# a token's position (HunyuanVideo-I2V's frame 0). A conditioning without them is neither.


def conditioning_for_tokens(cond: C, grid: tuple[int, int, int], start: int, stop: int) -> C:
    """`cond` as read by a forward over image tokens `[start, stop)` of a video with token `grid`
    (all of them, or a sequence-parallel shard): its `for_image_tokens`, else `cond` itself."""
    method = getattr(cond, "for_image_tokens", None)
    return cond if method is None else method(grid, start, stop)  # type: ignore[no-any-return]


def initial_latents(cond: Any, noise_BCTHW: torch.Tensor) -> torch.Tensor:
    """Where the sampler starts from this noise: the conditioning's `initial_latents`, else the noise."""
    method = getattr(cond, "initial_latents", None)
    return noise_BCTHW if method is None else method(noise_BCTHW)  # type: ignore[no-any-return]


def pin_latents(cond: Any, latents_BCTHW: torch.Tensor) -> torch.Tensor:
    """The latents after a step, with what the conditioning fixes set again (its `pin_latents`)."""
    method = getattr(cond, "pin_latents", None)
    return latents_BCTHW if method is None else method(latents_BCTHW)  # type: ignore[no-any-return]


class StepCacheHook(Protocol):
    """What `forward_tokens` asks of a step cache (`hvbatch.sampling.cache.StepCache`).

    The family computes its own probe (its first block's modulated input, or that block's residual).
    """

    probe_after_first_block: bool
    """Probe with the first block's image residual (else with its modulated image input)."""

    def should_compute(self, probe_BLD: torch.Tensor) -> bool: ...

    def store(self, residual_BLD: torch.Tensor) -> None: ...

    def apply(self, img_BLD: torch.Tensor) -> torch.Tensor: ...


class SamplingConvention(Protocol):
    """How a family's reference code draws noise, builds the schedule and combines CFG, where it
    differs from hvbatch's defaults (`hvbatch.sampling.sampler`); `ModelFamily.sampling_convention`."""

    def initial_noise(self, shape: tuple[int, ...], seed: int) -> torch.Tensor:
        """Starting latents `[B, C, T, Hh, Ww]` from a seed, on the CPU."""
        ...

    def flow_schedule(self, num_steps: int, shift: float) -> tuple[torch.Tensor, torch.Tensor]:
        """`(sigmas [N+1], timesteps [N])`, float32."""
        ...

    def combine_cfg(self, velocity_2B: torch.Tensor, cfg_scale: float) -> torch.Tensor:
        """The `[negative, positive]` batch's velocity combined (in whatever dtype the reference does)."""
        ...


class VelocityModel(Protocol):
    """What the sampler calls: the model, or a sequence- / CFG-parallel runner of it."""

    @property
    def compute_dtype(self) -> torch.dtype: ...

    def __call__(
        self,
        x_BCTHW: torch.Tensor,
        t_B: torch.Tensor,
        cond: Any,
        *,
        t_next_B: torch.Tensor | None = None,
        step_cache: StepCacheHook | None = None,
    ) -> torch.Tensor: ...


class StagedTransformer(VelocityModel, Protocol):
    """A family's transformer: the stages a runner composes (`__call__` is all of them in order).

    `config` is the family's architecture dataclass; it has at least `num_heads` and `head_dim`
    (Ulysses must divide the heads; the attention kernel is chosen for the head dim).
    """

    config: Any
    attention_fn: Callable[..., torch.Tensor]
    """The one attention entry point (`hvbatch.models.attention.AttentionFn`) every block calls."""
    compiled_blocks: bool

    def token_grid(self, latent_shape: Sequence[int]) -> tuple[int, int, int]: ...

    def rope(self, grid: tuple[int, int, int], device: torch.device | str) -> RopeTables: ...

    def embed_image(self, x_BCTHW: torch.Tensor, cond: Any) -> torch.Tensor: ...

    def forward_tokens(
        self,
        img_BLD: torch.Tensor,
        rope: RopeTables,
        t_B: torch.Tensor,
        cond: Any,
        *,
        t_next_B: torch.Tensor | None = None,
        step_cache: StepCacheHook | None = None,
    ) -> torch.Tensor:
        """Image tokens (all, or this rank's contiguous shard) -> final-layer outputs `[B, L, P]`."""
        ...

    def unpatchify(self, out_BLP: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor: ...

    def transformer_blocks(self) -> Sequence[nn.Module]:
        """The repeated blocks, in order: what regional compilation compiles one by one."""
        ...


class PromptEncoder(Protocol):
    """A family's text encoders: prompts in, the family's conditioning out."""

    @property
    def device(self) -> torch.device: ...

    def to(self, device: torch.device) -> None: ...

    def key(self, prompt: str, num_frames: int) -> Hashable:
        """What an encoding depends on (prompts with equal keys share one encoding)."""
        ...

    def encoding_frames(self, num_frames: int) -> int:
        """The frame count to encode with for videos of `num_frames` frames: the same for every
        `num_frames` of one key, so a shared encoding never depends on which video asked first."""
        ...

    def encode(self, prompts: list[str], num_frames: int, *, allow_blank: bool = False) -> EncodedPrompts: ...


class VideoVae(Protocol):
    """A family's VAE as the pipeline and the parallel decode use it."""

    config: Any
    """Has `temporal_compression_ratio`, `spatial_compression_ratio` and `scaling_factor`."""

    @property
    def dtype(self) -> torch.dtype: ...

    def decode(self, z_BCTHW: torch.Tensor) -> torch.Tensor:
        """Raw (unscaled) latents -> video in about [-1, 1], untiled."""
        ...

    def decode_latents(self, latents: torch.Tensor, tiling: VaeTilingConfig | None = None) -> torch.Tensor:
        """The transformer's latents -> float32 video in [0, 1] (the VAE undoes its scale and shift)."""
        ...
