"""Flow-matching Euler scheduler with shift, from noise (sigma 1) to data (sigma 0).

This is the official `--flow-reverse` schedule (every official script passes that flag; without
it the schedule would run backwards) and equals diffusers' `FlowMatchEulerDiscreteScheduler(shift)`
with `sigmas=linspace(1, 0, N+1)[:-1]`, as its HunyuanVideo pipeline sets it up.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NUM_TRAIN_TIMESTEPS = 1000


@dataclass(frozen=True)
class FlowMatchSchedule:
    sigmas: torch.Tensor
    """`[N+1]` float32, from 1 down to 0 (shifted)."""
    timesteps: torch.Tensor
    """`[N]` float32: `sigmas[:-1] * 1000`, the model's `t` input."""

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.numel())


def flow_match_schedule(num_steps: int, shift: float = 7.0) -> FlowMatchSchedule:
    """`s = linspace(1, 0, N+1)`, then `s <- shift*s / (1 + (shift-1)*s)` (computed in float64)."""
    if num_steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_steps}")
    if shift <= 0:
        raise ValueError(f"flow_shift must be > 0, got {shift}")
    base = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    sigmas = (shift * base / (1.0 + (shift - 1.0) * base)).float()
    return FlowMatchSchedule(sigmas=sigmas, timesteps=sigmas[:-1] * NUM_TRAIN_TIMESTEPS)


def euler_step(
    latents: torch.Tensor,
    velocity: torch.Tensor,
    sigma: float | torch.Tensor,
    sigma_next: float | torch.Tensor,
) -> torch.Tensor:
    """`x <- x + v * (sigma_next - sigma)` in float32."""
    return latents.float() + velocity.float() * (sigma_next - sigma)
