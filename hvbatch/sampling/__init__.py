"""Flow-matching sampling for any model family (`hvbatch.models.protocols`).

Names are imported on first use (PEP 562), so `hvbatch.sampling.estimates` serves the control
plane without importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "CachePolicy": "cache",
    "StepCache": "cache",
    "expected_speedup": "estimates",
    "denoise": "sampler",
    "initial_noise": "sampler",
    "new_step_cache": "sampler",
    "sample": "sampler",
    "FlowMatchSchedule": "scheduler",
    "euler_step": "scheduler",
    "flow_match_schedule": "scheduler",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
