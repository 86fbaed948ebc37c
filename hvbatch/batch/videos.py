"""A video of a run: one row of a shard, and the sampling settings it asks for."""

from __future__ import annotations

import dataclasses
from typing import Any

from hvbatch.config import SamplingConfig

SAMPLING_KEYS = (
    "seed",
    "height",
    "width",
    "num_frames",
    "num_inference_steps",
    "guidance_scale",
    "flow_shift",
    "negative_prompt",
    "cache_threshold",
)


def sampling_for(video: dict[str, Any], defaults: SamplingConfig) -> SamplingConfig:
    """A video row's sampling settings: its own columns over the config's `sampling.*`."""
    return dataclasses.replace(defaults, **{k: video[k] for k in SAMPLING_KEYS if video.get(k) is not None})
