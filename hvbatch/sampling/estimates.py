"""What step caching is expected to save, for `plan` and `submit --dry-run` (no torch needed).

The figures are the model family's (`StepCacheFigures.expected_speedups`, with their source). Below
the smallest threshold that can skip a step the speedup is exactly 1.0; from there it rises
linearly to the published points, and past the last published point it stays at that figure.
"""

from __future__ import annotations

import itertools

import numpy as np

from hvbatch.models.family import StepCacheFigures


def smallest_skipping_threshold(mode: str, figures: StepCacheFigures) -> float:
    """The threshold at or below which no step can be skipped.

    TeaCache accumulates the rescaled per-step change `max(p(x), 0)` (p: the family's polynomial,
    x >= 0 the relative change) and skips while the sum is under the threshold, so the smallest
    sum one step can add, p's minimum over x >= 0, is that bound. First-Block-Cache compares the raw
    change, which can be arbitrarily small: 0.
    """
    coefficients = figures.teacache_coefficients
    if mode != "teacache" or not coefficients:
        return 0.0
    candidates = [0.0]
    if len(coefficients) > 2:
        roots = np.roots(np.polyder(coefficients))
        candidates += [r.real for r in roots if abs(r.imag) < 1e-12 and r.real > 0]
    return max(0.0, min(float(np.polyval(coefficients, x)) for x in candidates))


def expected_speedup(mode: str, threshold: float, figures: StepCacheFigures) -> float:
    """Denoising speedup to expect from the family's published figures (an estimate; 1.0 for `none`)."""
    published = figures.expected_speedups.get(mode)
    floor = smallest_skipping_threshold(mode, figures)
    if published is None or threshold <= floor:
        return 1.0
    points = [(floor, 1.0), *(p for p in published if p[0] > floor)]
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        if threshold <= x1:
            return y0 + (y1 - y0) * (threshold - x0) / (x1 - x0)
    return points[-1][1]


def _note(figures: StepCacheFigures) -> str:
    return f"an estimate from {figures.source}; the real one depends on the prompts"


def speedup_line(mode: str, threshold: float, figures: StepCacheFigures) -> str:
    """`hvbatch plan`'s line about step caching at one threshold."""
    speedup = expected_speedup(mode, threshold, figures)
    floor = smallest_skipping_threshold(mode, figures)
    if speedup == 1.0 and threshold <= floor and mode in figures.expected_speedups:
        return (
            f"step caching: {mode} threshold {threshold:g}: no step can be skipped at or below "
            f"{floor:.4f} (the smallest rescaled change one step adds): 1.00x"
        )
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
