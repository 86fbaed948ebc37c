"""HunyuanVideo-1.5's sampling conventions, as the official pipeline runs them (pure functions).

From `hyvideo/pipelines/hunyuan_video_pipeline.py` and `hyvideo/schedulers/scheduling_flow_match_discrete.py`
(the pipeline always builds `FlowMatchDiscreteScheduler(shift=flow_shift, reverse=True, solver="euler")`):
- schedule: `sigmas = linspace(1, 0, N+1)` then `shift*s / (1 + (shift-1)*s)` (skipped when shift is 1),
  all in float32 torch arithmetic; timesteps `sigmas[:-1] * 1000` (float32), passed to the model as
  float32 (diffusers casts them to the transformer's dtype first);
- Euler: `x <- x.float() + v.float() * (sigma[i+1] - sigma[i])`; after the first step the latents stay
  float32 (the official cast back is commented out);
- noise: `torch.randn((B, 32, T, H, W), generator=torch.Generator("cpu").manual_seed(seed),
  dtype=torch.bfloat16)` on the CPU, then moved to the GPU (bfloat16 whatever the transformer's dtype);
- CFG (scale > 1): every stream batched `[negative, positive]`, the output split in that order and
  combined `uncond + scale * (cond - uncond)` in the output's dtype; scale 1 runs the positive only;
- MeanFlow (step-distilled checkpoints): `timestep_r` is the next timestep, 0 at the last step.

The schedule equals hvbatch/sampling/scheduler.py's `flow_match_schedule` (1.0's) up to one float32
ulp: that one evaluates the shift in float64 and rounds once, so 456 of 500 (steps 1..100 x shifts
1, 2, 5, 7, 9) schedules differ from the official float32 ones by 1.2e-7 at most. The Euler step
is the same as 1.0's `euler_step`.
"""

from __future__ import annotations

import torch

NUM_TRAIN_TIMESTEPS = 1000
NOISE_DTYPE = torch.bfloat16


def flow_schedule(num_steps: int, shift: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`(sigmas [N+1], timesteps [N])`, float32, computed exactly as the official scheduler does."""
    if num_steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_steps}")
    if shift <= 0:
        raise ValueError(f"flow_shift must be > 0, got {shift}")
    sigmas = torch.linspace(1, 0, num_steps + 1, dtype=torch.float32)
    if shift != 1.0:
        sigmas = (shift * sigmas) / (1 + (shift - 1) * sigmas)
    return sigmas, (sigmas[:-1] * NUM_TRAIN_TIMESTEPS).to(torch.float32)


def next_timesteps(timesteps_N: torch.Tensor) -> torch.Tensor:
    """`[N]`: step i's `timestep_r` (MeanFlow), i.e. `timesteps[i+1]`, and 0 for the last step."""
    return torch.cat([timesteps_N[1:], timesteps_N.new_zeros(1)])


def initial_noise(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """The official starting latents: bfloat16 Gaussian noise from a seeded CPU generator.

    `shape` is `(B, C, T, H, W)`; one generator draws the whole batch, so a video's noise equals the
    official one when it is drawn with batch 1 (the official script makes one video per run).
    """
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=NOISE_DTYPE)


def uses_cfg(cfg_scale: float) -> bool:
    """The official rule: true CFG (an unconditional pass) only for a scale above 1."""
    return cfg_scale > 1.0


def combine_cfg(velocity_2B: torch.Tensor, cfg_scale: float) -> torch.Tensor:
    """Split a `[negative, positive]` batch's output and combine it (in its own dtype)."""
    uncond, cond = velocity_2B.chunk(2)
    return uncond + cfg_scale * (cond - uncond)
