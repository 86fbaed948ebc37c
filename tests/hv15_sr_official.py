"""The official super-resolution code's math, written out for the tests from the official sources.

`hyvideo/models/transformers/modules/upsample.py` (the upsamplers, here on a state dict by the
official key names), `hyvideo/models/autoencoders/hunyuanvideo_15_vae.py` (`CausalConv3d`,
`RMS_norm`, `ResnetBlock`), `hyvideo/pipelines/hunyuan_video_sr_pipeline.py` (`BucketMap`, the input
preparation and the loop of `__call__`, `add_noise_to_lq`, `_prepare_lq_cond_latents`),
`hunyuan_video_pipeline.py` (`_prepare_cond_latents`, `get_task_mask`), `multitask_utils.py`
(`merge_tensor_by_mask`) and `scheduling_flow_match_discrete.py` (`set_timesteps`, `step`).
Nothing here imports hvbatch: it is the independent side of the comparisons.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange

State = dict[str, torch.Tensor]


def causal_conv(state: State, prefix: str, x: torch.Tensor) -> torch.Tensor:
    weight, bias = state[f"{prefix}.conv.weight"], state[f"{prefix}.conv.bias"]
    k = weight.shape[-1]
    x = F.pad(x, (k // 2, k // 2, k // 2, k // 2, k - 1, 0), mode="replicate")
    return F.conv3d(x, weight, bias)


def rms_norm(state: State, prefix: str, x: torch.Tensor) -> torch.Tensor:
    gamma = state[f"{prefix}.gamma"]
    return F.normalize(x, dim=1) * gamma.shape[0] ** 0.5 * gamma + 0.0


def resnet_block(state: State, prefix: str, x: torch.Tensor) -> torch.Tensor:
    h = causal_conv(state, f"{prefix}.conv1", F.silu(rms_norm(state, f"{prefix}.norm1", x)))
    h = causal_conv(state, f"{prefix}.conv2", F.silu(rms_norm(state, f"{prefix}.norm2", h)))
    if f"{prefix}.nin_shortcut.weight" in state:
        x = F.conv3d(x, state[f"{prefix}.nin_shortcut.weight"], state[f"{prefix}.nin_shortcut.bias"])
    return x + h


def upsampler_720p(state: State, x: torch.Tensor, *, global_residual: bool) -> torch.Tensor:
    """`SRTo720pUpsampler.forward`."""
    residual = x
    y = causal_conv(state, "in_conv", x)
    num_blocks = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    for i in range(num_blocks):
        h = F.silu(causal_conv(state, f"blocks.{i}.block.0", y))
        h = F.silu(causal_conv(state, f"blocks.{i}.block.2", h))
        y = y + causal_conv(state, f"blocks.{i}.block.4", h)
    y = causal_conv(state, "out_conv", y)
    if global_residual and y.shape == residual.shape:
        y = y + residual
    return y


def upsampler_1080p(
    state: State, z: torch.Tensor, block_out_channels: list[int], num_res_blocks: int, target_shape=None
) -> torch.Tensor:
    """`SRTo1080pUpsampler.forward`."""
    if target_shape is not None and z.shape[-2:] != target_shape:
        bsz = z.shape[0]
        z = rearrange(z, "b c f h w -> (b f) c h w")
        z = F.interpolate(z, size=target_shape, mode="bilinear", align_corners=False)
        z = rearrange(z, "(b f) c h w -> b c f h w", b=bsz)
    repeats = block_out_channels[0] // z.shape[1]
    h = causal_conv(state, "conv_in", z) + z.repeat_interleave(repeats=repeats, dim=1)
    for i_level in range(len(block_out_channels)):
        for i_block in range(num_res_blocks + 1):
            h = resnet_block(state, f"up.{i_level}.block.{i_block}", h)
    h = F.silu(rms_norm(state, "norm_out", h))
    return causal_conv(state, "conv_out", h)


def _conv_tensors(prefix: str, c_in: int, c_out: int, k: int, g: torch.Generator) -> State:
    return {
        f"{prefix}.weight": torch.randn(c_out, c_in, k, k, k, generator=g) / (c_in * k**3) ** 0.5,
        f"{prefix}.bias": 0.1 * torch.randn(c_out, generator=g),
    }


def state_720p(in_ch: int, out_ch: int, hidden: int, num_blocks: int, seed: int) -> State:
    """A random state dict with every official key of `SRTo720pUpsampler` and its official shape."""
    g = torch.Generator().manual_seed(seed)
    state = _conv_tensors("in_conv.conv", in_ch, hidden, 3, g)
    for i in range(num_blocks):
        for j in (0, 2, 4):
            state |= _conv_tensors(f"blocks.{i}.block.{j}.conv", hidden, hidden, 3, g)
    return state | _conv_tensors("out_conv.conv", hidden, out_ch, 3, g)


def state_1080p(z_ch: int, out_ch: int, block_out: list[int], num_res_blocks: int, seed: int) -> State:
    """A random state dict with every official key of `SRTo1080pUpsampler` and its official shape."""
    g = torch.Generator().manual_seed(seed)
    block_in = block_out[0]
    state = _conv_tensors("conv_in.conv", z_ch, block_in, 3, g)
    for i, width in enumerate(block_out):
        for j in range(num_res_blocks + 1):
            p = f"up.{i}.block.{j}"
            state[f"{p}.norm1.gamma"] = 1 + 0.1 * torch.randn(block_in, 1, 1, 1, generator=g)
            state |= _conv_tensors(f"{p}.conv1.conv", block_in, width, 3, g)
            state[f"{p}.norm2.gamma"] = 1 + 0.1 * torch.randn(width, 1, 1, 1, generator=g)
            state |= _conv_tensors(f"{p}.conv2.conv", width, width, 3, g)
            if block_in != width:
                state |= _conv_tensors(f"{p}.nin_shortcut", block_in, width, 1, g)
            block_in = width
    state["norm_out.gamma"] = 1 + 0.1 * torch.randn(block_in, 1, 1, 1, generator=g)
    return state | _conv_tensors("conv_out.conv", block_in, out_ch, 3, g)


def generate_crop_size_list(base_size: int = 256, patch_size: int = 16, max_ratio: float = 4.0):
    num_patches = round((base_size / patch_size) ** 2)
    crop_size_list = []
    wp, hp = num_patches, 1
    while wp > 0:
        if max(wp, hp) / min(wp, hp) <= max_ratio:
            crop_size_list.append((wp * patch_size, hp * patch_size))
        if (hp + 1) * wp <= num_patches:
            hp += 1
        else:
            wp -= 1
    return crop_size_list


def bucket_map(lr_base_size: int, hr_base_size: int) -> dict[tuple[int, int], tuple[int, int]]:
    """`BucketMap.hr_bucket_map`: (lr width, lr height) -> (hr width, hr height)."""
    lr_buckets = generate_crop_size_list(base_size=lr_base_size, patch_size=16)
    hr_buckets = generate_crop_size_list(base_size=hr_base_size, patch_size=16)
    lr_aspect_ratios = np.array([float(w) / float(h) for w, h in lr_buckets])
    hr_aspect_ratios = np.array([float(w) / float(h) for w, h in hr_buckets])
    out = {}
    for i, (lr_w, lr_h) in enumerate(lr_buckets):
        out[(lr_w, lr_h)] = hr_buckets[np.abs(hr_aspect_ratios - lr_aspect_ratios[i]).argmin()]
    return out


def schedule(num_inference_steps: int, shift: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`FlowMatchDiscreteScheduler(shift=shift, reverse=True).set_timesteps(n)`: (sigmas, timesteps)."""
    sigmas = torch.linspace(1, 0, num_inference_steps + 1)
    if shift != 1.0:
        sigmas = (shift * sigmas) / (1 + (shift - 1) * sigmas)
    return sigmas, (sigmas[:-1] * 1000).to(dtype=torch.float32)


def resize_and_upsample(
    lq_latents: torch.Tensor, latents: torch.Tensor, upsampler: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """`__call__`: the base latents resized to the starting latents' grid, through the upsampler."""
    tgt_shape = latents.shape[-2:]
    bsz = lq_latents.shape[0]
    lq_latents = rearrange(lq_latents, "b c f h w -> (b f) c h w")
    lq_latents = F.interpolate(lq_latents, size=tgt_shape, mode="bilinear", align_corners=False)
    lq_latents = rearrange(lq_latents, "(b f) c h w -> b c f h w", b=bsz)
    return upsampler(lq_latents.to(dtype=torch.float32))


def sr_condition(
    lq_latents: torch.Tensor,
    noise: torch.Tensor,
    latents: torch.Tensor,
    upsampler: Callable[[torch.Tensor], torch.Tensor],
    image_cond: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`__call__` from the resize to `zero_lq_condition`: (condition, zero_lq_condition). `latents`
    are the starting latents (their dtype and shape), `noise` what `torch.randn_like` would draw."""
    lq_latents = resize_and_upsample(lq_latents, latents, upsampler)
    lq_latents = lq_latents.to(dtype=latents.dtype)

    noise_scale = 0.7  # add_noise_to_lq(lq_latents, noise_scale)
    timestep = torch.tensor([1000.0]) * noise_scale
    t = timestep.reshape(timestep.shape + (1,) * (lq_latents.ndim - timestep.ndim))
    lq_latents = (1 - t / 1000.0) * lq_latents + (t / 1000.0) * noise

    latent_target_length = latents.shape[2]  # get_task_mask
    multitask_mask = torch.zeros(latent_target_length)
    if image_cond is not None:
        multitask_mask[0] = 1.0
    if image_cond is not None:  # _prepare_cond_latents
        latents_concat = image_cond.repeat(1, 1, latents.shape[2], 1, 1)
        latents_concat[:, :, 1:, :, :] = 0.0
    else:
        latents_concat = torch.zeros(*latents.shape)
    mask_zeros = torch.zeros(latents.shape[0], 1, *latents.shape[2:])
    mask_ones = torch.ones(latents.shape[0], 1, *latents.shape[2:])
    masked_indices = torch.nonzero(multitask_mask).squeeze(1)  # merge_tensor_by_mask(dim=2)
    mask_concat = mask_zeros.clone()
    mask_concat[:, :, masked_indices] = mask_ones[:, :, masked_indices]
    cond_latents = torch.concat([latents_concat, mask_concat], dim=1)

    b, _, f, h, w = lq_latents.shape  # _prepare_lq_cond_latents
    lq_cond_latents = torch.concat([lq_latents, torch.ones(b, 1, f, h, w)], dim=1)

    condition = torch.concat([cond_latents, lq_cond_latents], dim=1)
    c = lq_latents.shape[1]
    zero_lq_condition = condition.clone()
    zero_lq_condition[:, c + 1 : 2 * c + 1] = torch.zeros_like(lq_latents)
    zero_lq_condition[:, 2 * c + 1] = 0
    return condition, zero_lq_condition


def sr_loop(
    latents: torch.Tensor,
    condition: torch.Tensor,
    zero_lq_condition: torch.Tensor,
    transformer: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor],
    num_inference_steps: int,
    *,
    flow_shift: float = 2.0,
    use_meanflow: bool = False,
) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]]:
    """The denoising loop of `__call__` at CFG 1: final latents and each step's
    `(latent_model_input, t_expand, timesteps_r)`."""
    sigmas, timesteps = schedule(num_inference_steps, flow_shift)
    noise_scale = 0.7
    seen = []
    for i, t in enumerate(timesteps):
        if t < 1000 * noise_scale:
            condition = zero_lq_condition
        latent_model_input = torch.concat([latents, condition], dim=1)
        t_expand = t.repeat(latent_model_input.shape[0])
        timesteps_r = None
        if use_meanflow:
            timesteps_r = torch.tensor([0.0]) if i == len(timesteps) - 1 else timesteps[i + 1]
            timesteps_r = timesteps_r.repeat(latent_model_input.shape[0])
        seen.append((latent_model_input, t_expand, timesteps_r))
        noise_pred = transformer(latent_model_input, t_expand, timesteps_r)
        dt = sigmas[i + 1] - sigmas[i]  # scheduler.step
        latents = latents.to(torch.float32) + noise_pred.float() * dt
    return latents, seen
