"""Flow-matching sampling for HunyuanVideo."""

from hvbatch.sampling.sampler import (
    TextConditioning,
    denoise,
    embedded_guidance,
    initial_noise,
    latent_shape,
    sample,
)
from hvbatch.sampling.scheduler import FlowMatchSchedule, euler_step, flow_match_schedule

__all__ = [
    "FlowMatchSchedule",
    "TextConditioning",
    "denoise",
    "embedded_guidance",
    "euler_step",
    "flow_match_schedule",
    "initial_noise",
    "latent_shape",
    "sample",
]
