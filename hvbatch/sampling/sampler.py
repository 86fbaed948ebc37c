"""The denoising loop: seeded noise, flow-matching Euler steps and true CFG, for any model family.

Shapes: B batch, C latent channels, T/Hh/Ww latent frames/height/width. The model and its
conditioning follow `hvbatch.models.protocols` (`model(x, t, cond, *, t_next_B, step_cache)`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from hvbatch.config import SamplingConfig
from hvbatch.models.geometry import LatentGeometry
from hvbatch.models.protocols import (
    Conditioning,
    SamplingConvention,
    VelocityModel,
    initial_latents,
    pin_latents,
)
from hvbatch.sampling.cache import StepCache, step_cache_for
from hvbatch.sampling.scheduler import FlowMatchSchedule, euler_step, flow_match_schedule


def initial_noise(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Float32 Gaussian noise from a CPU generator: the same for a seed on every run, rank and device.

    (The official code draws fp16 noise on a CUDA generator, which ties a seed to the device.)
    """
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=torch.float32)


def denoise(
    model: VelocityModel,
    noise: torch.Tensor,
    cond: Conditioning,
    sampling: SamplingConfig,
    *,
    negative: Conditioning | None = None,
    on_step: Callable[[int, int], None] | None = None,
    step_cache: StepCache | None = None,
    convention: SamplingConvention | None = None,
) -> torch.Tensor:
    """Run the Euler loop from `noise` `[B, C, T, Hh, Ww]` (sigma 1) to clean latents (sigma 0), float32.

    `cond` (and `negative`, with true CFG) is the model family's conditioning object; it gets the
    video's sampling settings once (`for_sampling`) and the CFG batch is `cat([negative, cond])`.
    Everything the steps share is prepared once here (sigmas as Python floats, timesteps on the
    device), so a step never waits for the device (except a step cache's decision, one host value
    per step). Every step passes `t_next_B`, the next step's timestep (0 at the last step).
    `step_cache` (see `new_step_cache`) counts the steps it computed and skipped; the whole batch
    takes one decision per step. A conditioning that pins part of the latents (image-to-video's
    frame 0) gives the start (`initial_latents`) and sets them again after every step (`pin_latents`).
    `convention` (the family's, `ModelFamily.sampler_convention`) replaces the schedule and the CFG
    combination where its reference code computes them otherwise.
    """
    use_cfg = sampling.cfg_scale > 1.0
    if use_cfg and negative is None:
        raise ValueError(f"cfg_scale={sampling.cfg_scale} > 1 needs a negative-prompt conditioning")
    if convention is None:
        schedule = flow_match_schedule(sampling.num_inference_steps, sampling.flow_shift)
    else:
        schedule = FlowMatchSchedule(
            *convention.flow_schedule(sampling.num_inference_steps, sampling.flow_shift)
        )
    positive = model_cond = cond.for_sampling(sampling)
    if use_cfg and negative is not None:
        model_cond = type(model_cond).cat([negative.for_sampling(sampling), model_cond])
    batch = model_cond.batch_size
    sigmas = [float(s) for s in schedule.sigmas.tolist()]
    timesteps_N = schedule.timesteps.to(noise.device)
    next_timesteps_N = torch.cat([timesteps_N[1:], timesteps_N.new_zeros(1)])
    if step_cache is not None and step_cache.num_steps != schedule.num_steps:
        made, steps = step_cache.num_steps, schedule.num_steps
        raise ValueError(f"step_cache was made for {made} steps, sampling has {steps}: use new_step_cache")
    # Only a cache is passed on, so that velocity models without the argument run uncached as before.
    cache_arg: dict[str, Any] = {} if step_cache is None else {"step_cache": step_cache}
    latents = initial_latents(positive, noise.float())
    for i in range(schedule.num_steps):
        x = torch.cat([latents, latents]) if use_cfg else latents
        velocity = model(
            x.to(model.compute_dtype),
            timesteps_N[i].expand(batch),
            model_cond,
            t_next_B=next_timesteps_N[i].expand(batch),
            **cache_arg,
        )
        if use_cfg and convention is not None:
            velocity = convention.combine_cfg(velocity, sampling.cfg_scale)
        elif use_cfg:
            uncond, conditional = velocity.float().chunk(2)
            velocity = uncond + sampling.cfg_scale * (conditional - uncond)
        latents = pin_latents(positive, euler_step(latents, velocity, sigmas[i], sigmas[i + 1]))
        if on_step is not None:
            on_step(i + 1, schedule.num_steps)
    return latents


def new_step_cache(
    sampling: SamplingConfig, teacache_coefficients: tuple[float, ...] | None = None
) -> StepCache | None:
    """A fresh cache for one video by `sampling.cache*`, or None when `sampling.cache` is `none`.

    `teacache_coefficients` is the model family's TeaCache polynomial (`StepCacheFigures`);
    `sampling.cache=teacache` is refused without one.
    """
    return step_cache_for(
        sampling.cache,
        sampling.cache_threshold,
        sampling.cache_max_skips,
        sampling.num_inference_steps,
        teacache_coefficients=teacache_coefficients,
    )


def sample(
    model: VelocityModel,
    cond: Conditioning,
    sampling: SamplingConfig,
    *,
    geometry: LatentGeometry,
    negative: Conditioning | None = None,
    device: torch.device | str = "cpu",
    on_step: Callable[[int, int], None] | None = None,
    step_cache: StepCache | None = None,
    convention: SamplingConvention | None = None,
) -> torch.Tensor:
    """One video's clean latents `[1, C, T, Hh, Ww]` from its seed; `cond` holds batch 1.

    The latent's shape comes from the family's `geometry` (channels, VAE ratios); the noise from
    its `convention` (else `initial_noise`).
    """
    shape = geometry.latent_shape(sampling.height, sampling.width, sampling.num_frames)
    draw = initial_noise if convention is None else convention.initial_noise
    noise = draw((1, *shape), sampling.seed).to(device)
    return denoise(
        model,
        noise,
        cond.to(device),
        sampling,
        negative=negative and negative.to(device),
        on_step=on_step,
        step_cache=step_cache,
        convention=convention,
    )
