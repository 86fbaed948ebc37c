"""HunyuanVideo-1.5's super-resolution stage as pure functions: what the SR transformer is fed.

Transcribed from the official `HunyuanVideo_1_5_SR_Pipeline.__call__`
(`hyvideo/pipelines/hunyuan_video_sr_pipeline.py`), the order its steps run in:
1. output size: `BucketMap` (here `variants.sr_target_size`); latent grid = size / 16, the base's frames;
2. starting latents: `prepare_latents`, bfloat16 `randn` from a fresh CPU generator seeded with the
   video's seed (what `sampling.initial_noise(shape, seed)` draws);
3. the base latents (float32, as the base loop leaves them) resized per frame to the output latent
   grid (`F.interpolate`, bilinear, `align_corners=False`, in their dtype), through the upsampler in
   float32, cast to bfloat16 (the pipeline's `target_dtype`);
4. `add_noise_to_lq`: `t = 1000 * 0.7`, `(1 - t/1000) * lq + (t/1000) * noise` with bfloat16
   noise; the result is float32 (bfloat16 tensors times a float32 tensor);
5. condition `[image latents (32) | image mask (1) | noised lq (32) | ones (1)]`: for
   text-to-video the first 33 channels are zeros (`_prepare_cond_latents`), for image-to-video the
   image's latent in frame 0 with mask 1 there (`image_condition.condition_from_latents`, the image
   encoded at the SR size); `_prepare_lq_cond_latents` gives the last 33;
6. the dropped condition: a copy with the lq latents and their mask zeroed, the image part kept;
7. per step: from the first timestep below `1000 * 0.7` on, the dropped condition; the model input
   is `cat([latents, condition])`; CFG 1 (no negative pass), flow shift 2, the base's Euler step;
   `timestep_r` for a MeanFlow checkpoint is the next timestep, 0 at the last step.

One difference: the official step-4 noise is `torch.randn_like` on the device's global generator,
seeded by nothing in the pipeline (so it changes with whatever drew random numbers before, and
with the device). Here it is the second bfloat16 draw of the seeded CPU generator that drew the
step-2 latents: the same distribution, and a video's result depends on its seed alone.

Shapes: `B` batch (1 per video), `C` 32 latent channels, `T/H/W` latent frames/height/width.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Protocol

import torch

from hvbatch.models.hunyuan_video_15.conditioning import HunyuanVideo15Conditioning
from hvbatch.models.hunyuan_video_15.image_condition import condition_from_latents
from hvbatch.models.hunyuan_video_15.sampling import NOISE_DTYPE, flow_schedule, next_timesteps
from hvbatch.models.hunyuan_video_15.upsampler import Upsampler, resize_latents
from hvbatch.models.hunyuan_video_15.variants import SPATIAL_MULTIPLE, SRVariant15, sr_target_size


class SRVelocityModel(Protocol):
    """The contract's calling convention (the transformer, or a sequence-parallel runner of it)."""

    @property
    def compute_dtype(self) -> torch.dtype: ...

    def __call__(
        self,
        x_BCTHW: torch.Tensor,
        t_B: torch.Tensor,
        cond: HunyuanVideo15Conditioning,
        *,
        t_next_B: torch.Tensor | None = None,
        step_cache: object | None = None,
    ) -> torch.Tensor: ...


def sr_latent_grid(base_latents_shape: tuple[int, ...] | torch.Size, sr: SRVariant15) -> tuple[int, int, int]:
    """`(T, H, W)` of the SR latents for base latents `[B, C, T, h, w]` (the base size is `16h x 16w`)."""
    frames, height, width = base_latents_shape[-3:]
    out_h, out_w = sr_target_size(height * SPATIAL_MULTIPLE, width * SPATIAL_MULTIPLE, sr)
    return frames, out_h // SPATIAL_MULTIPLE, out_w // SPATIAL_MULTIPLE


def sr_noise(shape: tuple[int, ...], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`(starting latents, lq noise)`: two bfloat16 draws of one CPU generator seeded with `seed`; the
    first is the official starting latents, the second stands in for the official `randn_like`."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    first = torch.randn(shape, generator=generator, dtype=NOISE_DTYPE)
    return first, torch.randn(shape, generator=generator, dtype=NOISE_DTYPE)


def upsample_low_res_latents(
    base_latents_BCTHW: torch.Tensor,
    size_hw: tuple[int, int],
    upsampler: Upsampler,
    *,
    dtype: torch.dtype = NOISE_DTYPE,
) -> torch.Tensor:
    """Resize each frame to `size_hw` (bilinear), refine with the upsampler in float32, cast to `dtype`
    (the official pipeline's bfloat16 `target_dtype`)."""
    resized = resize_latents(base_latents_BCTHW, size_hw)
    device = next(upsampler.parameters()).device
    return upsampler(resized.to(device=device, dtype=torch.float32)).to(dtype)


def noise_low_res_latents(lq_BCTHW: torch.Tensor, noise_BCTHW: torch.Tensor, strength: float) -> torch.Tensor:
    """`(1 - t/1000) * lq + (t/1000) * noise` at `t = 1000 * strength`, as the official float32 ops."""
    t = (torch.tensor([1000.0], device=lq_BCTHW.device) * strength).reshape(1, 1, 1, 1, 1)
    return (1 - t / 1000.0) * lq_BCTHW + (t / 1000.0) * noise_BCTHW.to(lq_BCTHW.device)


def sr_condition(lq_BCTHW: torch.Tensor, image_latents_BC1HW: torch.Tensor | None = None) -> torch.Tensor:
    """`[B, 2C + 2, T, H, W]`: image latents and mask (zeros for text-to-video; image-to-video: the
    image's latent in frame 0, mask 1 there), then the noised lq latents and a mask of ones."""
    batch, channels, frames, height, width = lq_BCTHW.shape
    if image_latents_BC1HW is None:
        image = lq_BCTHW.new_zeros((batch, channels + 1, frames, height, width))
    elif tuple(image_latents_BC1HW.shape) != (batch, channels, 1, height, width):
        raise ValueError(
            f"image latents have shape {tuple(image_latents_BC1HW.shape)}, expected "
            f"{(batch, channels, 1, height, width)} (the image encoded at the SR size)"
        )
    else:
        image = condition_from_latents(image_latents_BC1HW.to(lq_BCTHW.device), frames, dtype=lq_BCTHW.dtype)
    lq_mask = lq_BCTHW.new_ones((batch, 1, frames, height, width))
    return torch.cat([image, lq_BCTHW, lq_mask], dim=1)


def drop_low_res_condition(condition_BCTHW: torch.Tensor) -> torch.Tensor:
    """The condition with the lq latents and their mask zeroed (official `zero_lq_condition`)."""
    channels = (condition_BCTHW.shape[1] - 2) // 2
    dropped = condition_BCTHW.clone()
    dropped[:, channels + 1 : 2 * channels + 2] = 0
    return dropped


def condition_drop_step(timesteps_N: torch.Tensor, strength: float) -> int:
    """The first step whose timestep is below `1000 * strength` (float32, as the official compare);
    from it on the condition stays dropped. `N` if none is."""
    below = (timesteps_N.detach().cpu().float() < 1000 * strength).tolist()
    return below.index(True) if True in below else len(below)


@dataclass(frozen=True)
class SuperResolutionInputs:
    """Everything the SR loop of one video needs besides the transformer and the text conditioning."""

    noise: torch.Tensor
    """Starting latents `[B, C, T, H, W]` (bfloat16)."""
    condition: torch.Tensor
    """`[B, 2C + 2, T, H, W]` (float32) of the steps before `drop_step`."""
    dropped_condition: torch.Tensor
    """The same with the lq part zeroed, from `drop_step` on."""
    sigmas: torch.Tensor
    """`[N + 1]` float32."""
    timesteps: torch.Tensor
    """`[N]` float32."""
    drop_step: int

    @property
    def num_steps(self) -> int:
        return self.timesteps.shape[0]

    @property
    def must_compute_steps(self) -> frozenset[int]:
        """Steps a step cache must not skip: the first, the last, and the first with the dropped
        condition (its input changes there; a residual cached before it saw the lq latents)."""
        return frozenset({0, self.drop_step, self.num_steps - 1} & set(range(self.num_steps)))

    def condition_at(self, step: int) -> torch.Tensor:
        return self.dropped_condition if step >= self.drop_step else self.condition

    def conditioning_at(self, step: int, text: HunyuanVideo15Conditioning) -> HunyuanVideo15Conditioning:
        """`text` (the positive prompt's LLM and byT5 states, image tokens) with step `step`'s condition."""
        return replace(text, cond_latents=self.condition_at(step))


def prepare_super_resolution(
    base_latents_BCTHW: torch.Tensor,
    upsampler: Upsampler,
    sr: SRVariant15,
    seed: int,
    *,
    num_steps: int | None = None,
    image_latents_BC1HW: torch.Tensor | None = None,
    grid_hw: tuple[int, int] | None = None,
) -> SuperResolutionInputs:
    """The SR inputs of one video from its clean base latents (on their device) and seed.

    `grid_hw`: the output latent height and width; None takes the official bucket map
    (`sr_latent_grid`), which needs a base bucket size. Tiny presets and tests give their own.
    """
    steps = sr.default_steps if num_steps is None else num_steps
    sr.check_steps(steps)
    frames = base_latents_BCTHW.shape[2]
    height, width = sr_latent_grid(base_latents_BCTHW.shape, sr)[1:] if grid_hw is None else grid_hw
    batch, channels = base_latents_BCTHW.shape[:2]
    noise, lq_noise = sr_noise((batch, channels, frames, height, width), seed)
    lq = upsample_low_res_latents(base_latents_BCTHW, (height, width), upsampler)
    lq = noise_low_res_latents(lq, lq_noise, sr.noise_strength)
    condition = sr_condition(lq, image_latents_BC1HW)
    sigmas, timesteps = flow_schedule(steps, sr.flow_shift)
    return SuperResolutionInputs(
        noise.to(lq.device),
        condition,
        drop_low_res_condition(condition),
        sigmas,
        timesteps.to(lq.device),
        condition_drop_step(timesteps, sr.noise_strength),
    )


def denoise_super_resolution(
    model: SRVelocityModel,
    inputs: SuperResolutionInputs,
    text: HunyuanVideo15Conditioning,
    *,
    on_step: Callable[[int, int], None] | None = None,
    step_cache: object | None = None,
) -> torch.Tensor:
    """The SR Euler loop (CFG 1: the positive prompt only), float32 latents out.

    The reference for the shared sampler: it is the base loop with the conditioning of step `i`
    taken from `inputs.conditioning_at(i, text)`. Nothing in a step waits for the device.
    """
    if text.batch_size != inputs.noise.shape[0]:
        raise ValueError(
            f"text conditioning has batch {text.batch_size}, the SR latents {inputs.noise.shape[0]}"
        )
    batch = inputs.noise.shape[0]
    conds = (inputs.conditioning_at(0, text), replace(text, cond_latents=inputs.dropped_condition))
    t_next = next_timesteps(inputs.timesteps)
    dts = [float(s) for s in (inputs.sigmas[1:] - inputs.sigmas[:-1]).tolist()]
    cache_arg = {} if step_cache is None else {"step_cache": step_cache}
    latents = inputs.noise
    for i in range(inputs.num_steps):
        velocity = model(
            latents.to(model.compute_dtype),
            inputs.timesteps[i].expand(batch),
            conds[i >= inputs.drop_step],
            t_next_B=t_next[i].expand(batch),
            **cache_arg,
        )
        latents = latents.float() + velocity.float() * dts[i]
        if on_step is not None:
            on_step(i + 1, inputs.num_steps)
    return latents.float()
