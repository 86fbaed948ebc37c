"""What step caching is expected to save, for `plan` and `submit --dry-run` (no torch needed)."""

from __future__ import annotations

import itertools

EXPECTED_SPEEDUP: dict[str, tuple[tuple[float, float], ...]] = {
    # (threshold, speedup) points, linearly interpolated; 0 -> 1x. Published end-to-end figures at
    # 720p x 129 frames: TeaCache 1.6x at 0.1 and 2.1x at 0.15 (A800; 1.61x / 2.17x on an H100);
    # First-Block-Cache 1.62x at 0.06 (L20, 30 steps), about 2x at 0.1 (ParaAttention).
    "teacache": ((0.0, 1.0), (0.1, 1.6), (0.15, 2.1), (0.2, 2.5)),
    "fbcache": ((0.0, 1.0), (0.06, 1.62), (0.1, 2.0), (0.15, 2.3)),
}


def expected_speedup(mode: str, threshold: float) -> float:
    """Denoising speedup to expect from the published figures (an estimate; 1.0 for `none`)."""
    points = EXPECTED_SPEEDUP.get(mode)
    if points is None or threshold <= 0:
        return 1.0
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        if threshold <= x1:
            return y0 + (y1 - y0) * (threshold - x0) / (x1 - x0)
    return points[-1][1]


ESTIMATE_NOTE = "an estimate from published 720p HunyuanVideo speedups; the real one depends on the prompts"


def speedup_line(mode: str, threshold: float) -> str:
    """`hvbatch plan`'s line about step caching at one threshold."""
    speedup = expected_speedup(mode, threshold)
    return f"step caching: {mode} threshold {threshold:g}: ~{speedup:.2f}x faster denoising ({ESTIMATE_NOTE})"


def saving_line(mode: str, gpu_hours: float, costs: list[float], thresholds: list[float]) -> str:
    """`submit --dry-run`'s line about step caching: the GPU-hours to expect with it (per-row thresholds)."""
    total = sum(costs)
    cached = sum(c / expected_speedup(mode, t) for c, t in zip(costs, thresholds, strict=True))
    speedup = total / cached if cached else 1.0
    hours = gpu_hours / speedup
    return f"with step caching ({mode}): ~{hours:,.1f} GPU-hours, {speedup:.2f}x fewer ({ESTIMATE_NOTE})"
