"""Sequence parallelism applied from outside the model: dims, attention, sampler, planner."""
