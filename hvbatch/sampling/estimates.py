"""What step caching is expected to save, for `plan` and `submit --dry-run` (no torch needed).

The figures are the model family's (`StepCacheFigures.expected_speedups`, with their source).
"""

from __future__ import annotations

import itertools

from hvbatch.models.family import StepCacheFigures


def expected_speedup(mode: str, threshold: float, figures: StepCacheFigures) -> float:
    """Denoising speedup to expect from the family's published figures (an estimate; 1.0 for `none`)."""
    points = figures.expected_speedups.get(mode)
    if points is None or threshold <= 0:
        return 1.0
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        if threshold <= x1:
            return y0 + (y1 - y0) * (threshold - x0) / (x1 - x0)
    return points[-1][1]


def _note(figures: StepCacheFigures) -> str:
    return f"an estimate from {figures.source}; the real one depends on the prompts"


def speedup_line(mode: str, threshold: float, figures: StepCacheFigures) -> str:
    """`hvbatch plan`'s line about step caching at one threshold."""
    speedup = expected_speedup(mode, threshold, figures)
    return (
        f"step caching: {mode} threshold {threshold:g}: ~{speedup:.2f}x faster denoising ({_note(figures)})"
    )


def saving_line(
    mode: str, gpu_hours: float, costs: list[float], thresholds: list[float], figures: StepCacheFigures
) -> str:
    """`submit --dry-run`'s line about step caching: the GPU-hours to expect with it (per-row thresholds)."""
    total = sum(costs)
    cached = sum(c / expected_speedup(mode, t, figures) for c, t in zip(costs, thresholds, strict=True))
    speedup = total / cached if cached else 1.0
    hours = gpu_hours / speedup
    return f"with step caching ({mode}): ~{hours:,.1f} GPU-hours, {speedup:.2f}x fewer ({_note(figures)})"
