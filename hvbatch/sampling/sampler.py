"""The denoising loop: seeded noise, flow-matching Euler steps, embedded guidance and true CFG.

Shapes: B batch, C latent channels, T/Hh/Ww latent frames/height/width, L text tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from hvbatch.config import SamplingConfig
from hvbatch.models.transformer import StepCacheHook, TextLengths
from hvbatch.sampling.cache import StepCache, step_cache_for
from hvbatch.sampling.scheduler import euler_step, flow_match_schedule
from hvbatch.sampling.sizes import (  # noqa: F401 (re-exported: callers import them from here)
    SIZE_MULTIPLE,
    VAE_SPATIAL_RATIO,
    VAE_TEMPORAL_RATIO,
    latent_shape,
)


class VelocityModel(Protocol):
    """The transformer's forward signature (our model, or a sequence-parallel wrapper of it)."""

    @property
    def compute_dtype(self) -> torch.dtype: ...

    def __call__(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        text_states: torch.Tensor,
        text_mask: torch.Tensor | TextLengths | None,
        text_states_2: torch.Tensor,
        guidance: torch.Tensor | None = None,
        step_cache: StepCacheHook | None = None,
    ) -> torch.Tensor: ...


def initial_noise(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Float32 Gaussian noise from a CPU generator: the same for a seed on every run, rank and device.

    (The official code draws fp16 noise on a CUDA generator, which ties a seed to the device.)
    """
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=torch.float32)


def embedded_guidance(
    scale: float, batch: int, dtype: torch.dtype, device: torch.device | str
) -> torch.Tensor:
    """The `guidance` input: `scale * 1000` computed in the transformer's dtype.

    The official code and diffusers both build this tensor in the model dtype; in bf16,
    6.0 * 1000 rounds to 6016.0, and that is the value the distilled model was run with. We
    compute it exactly the same way so our numbers match either reference in every dtype.
    """
    return torch.full((batch,), scale, dtype=dtype, device=device) * 1000.0


@dataclass
class TextConditioning:
    """Encoded prompt(s): LLM states `[B, L, C]`, right-padded mask `[B, L]`, pooled CLIP `[B, C2]`."""

    text_states: torch.Tensor
    text_mask: torch.Tensor | None
    text_states_2: torch.Tensor

    def to(self, device: torch.device | str) -> TextConditioning:
        mask = None if self.text_mask is None else self.text_mask.to(device)
        return TextConditioning(self.text_states.to(device), mask, self.text_states_2.to(device))

    def mask_or_ones(self) -> torch.Tensor:
        if self.text_mask is not None:
            return self.text_mask
        return torch.ones(self.text_states.shape[:2], dtype=torch.long, device=self.text_states.device)


def stack_conditionings(first: TextConditioning, second: TextConditioning) -> TextConditioning:
    """Concatenate along the batch, right-padding the shorter text to the longer length."""
    length = max(first.text_states.shape[1], second.text_states.shape[1])

    def pad(cond: TextConditioning) -> tuple[torch.Tensor, torch.Tensor]:
        extra = length - cond.text_states.shape[1]
        return F.pad(cond.text_states, (0, 0, 0, extra)), F.pad(cond.mask_or_ones(), (0, extra))

    (s1, m1), (s2, m2) = pad(first), pad(second)
    return TextConditioning(
        torch.cat([s1, s2]),
        torch.cat([m1, m2.to(m1.dtype)]),
        torch.cat([first.text_states_2, second.text_states_2]),
    )


def denoise(
    model: VelocityModel,
    noise: torch.Tensor,
    cond: TextConditioning,
    sampling: SamplingConfig,
    *,
    negative: TextConditioning | None = None,
    on_step: Callable[[int, int], None] | None = None,
    step_cache: StepCache | None = None,
) -> torch.Tensor:
    """Run the Euler loop from `noise` `[B, C, T, Hh, Ww]` (sigma 1) to clean latents (sigma 0), float32.

    Everything the steps share is prepared once here (text lengths read from the mask, sigmas as
    Python floats, timesteps and guidance on the device), so a step never waits for the device
    (except a step cache's decision, one host value per step). `step_cache` (see `new_step_cache`)
    counts the steps it computed and skipped; the whole batch takes one decision per step.
    """
    use_cfg = sampling.cfg_scale > 1.0
    if use_cfg and negative is None:
        raise ValueError(f"cfg_scale={sampling.cfg_scale} > 1 needs a negative-prompt conditioning")
    schedule = flow_match_schedule(sampling.num_inference_steps, sampling.flow_shift)
    model_cond = stack_conditionings(negative, cond) if use_cfg and negative is not None else cond
    batch, text_len = model_cond.text_states.shape[:2]
    lengths = TextLengths.from_mask(model_cond.text_mask, batch, text_len)
    guidance = embedded_guidance(sampling.guidance_scale, batch, model.compute_dtype, noise.device)
    sigmas = [float(s) for s in schedule.sigmas.tolist()]
    timesteps_N = schedule.timesteps.to(noise.device)
    if step_cache is not None and step_cache.num_steps != schedule.num_steps:
        made, steps = step_cache.num_steps, schedule.num_steps
        raise ValueError(f"step_cache was made for {made} steps, sampling has {steps}: use new_step_cache")
    # Only a cache is passed on, so that velocity models without the argument run uncached as before.
    cache_arg = {} if step_cache is None else {"step_cache": step_cache}
    latents = noise.float()
    for i in range(schedule.num_steps):
        x = torch.cat([latents, latents]) if use_cfg else latents
        velocity = model(
            x.to(model.compute_dtype),
            timesteps_N[i].expand(batch),
            model_cond.text_states,
            lengths,
            model_cond.text_states_2,
            guidance=guidance,
            **cache_arg,
        ).float()
        if use_cfg:
            uncond, conditional = velocity.chunk(2)
            velocity = uncond + sampling.cfg_scale * (conditional - uncond)
        latents = euler_step(latents, velocity, sigmas[i], sigmas[i + 1])
        if on_step is not None:
            on_step(i + 1, schedule.num_steps)
    return latents


def new_step_cache(sampling: SamplingConfig) -> StepCache | None:
    """A fresh cache for one video by `sampling.cache*`, or None when `sampling.cache` is `none`."""
    return step_cache_for(
        sampling.cache, sampling.cache_threshold, sampling.cache_max_skips, sampling.num_inference_steps
    )


def sample(
    model: VelocityModel,
    cond: TextConditioning,
    sampling: SamplingConfig,
    *,
    negative: TextConditioning | None = None,
    latent_channels: int = 16,
    device: torch.device | str = "cpu",
    on_step: Callable[[int, int], None] | None = None,
    step_cache: StepCache | None = None,
) -> torch.Tensor:
    """One video's clean latents `[1, C, T, Hh, Ww]` from its seed; `cond` holds batch 1."""
    shape = latent_shape(sampling.height, sampling.width, sampling.num_frames, channels=latent_channels)
    noise = initial_noise((1, *shape), sampling.seed).to(device)
    return denoise(
        model,
        noise,
        cond.to(device),
        sampling,
        negative=negative and negative.to(device),
        on_step=on_step,
        step_cache=step_cache,
    )
