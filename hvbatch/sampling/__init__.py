"""Flow-matching sampling for HunyuanVideo."""

from hvbatch.sampling.cache import CachePolicy, StepCache, expected_speedup
from hvbatch.sampling.sampler import (
    TextConditioning,
    denoise,
    embedded_guidance,
    initial_noise,
    latent_shape,
    new_step_cache,
    sample,
)
from hvbatch.sampling.scheduler import FlowMatchSchedule, euler_step, flow_match_schedule

__all__ = [
    "CachePolicy",
    "FlowMatchSchedule",
    "StepCache",
    "TextConditioning",
    "denoise",
    "embedded_guidance",
    "euler_step",
    "expected_speedup",
    "flow_match_schedule",
    "initial_noise",
    "latent_shape",
    "new_step_cache",
    "sample",
]
