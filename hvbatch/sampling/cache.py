"""Step caching: skip the transformer's blocks on steps whose input barely changed (opt-in).

Two policies, both deciding from a relative L1 change `sum|a - a_prev| / sum|a_prev|`:

- `teacache` (TeaCache): `a` is the first block's modulated image input (the model computes it:
  `StepCacheHook.probe_after_first_block` is False). The change of every step is rescaled by the
  polynomial fitted for the model family (`StepCacheFigures.teacache_coefficients`; a family without
  one refuses TeaCache) and accumulated; while the sum stays under the threshold the step reuses the
  residual (output of all blocks minus their input) of the last computed step.
- `fbcache` (First-Block-Cache): the first block always runs; `a` is its image residual. While it
  differs from the last computed step's by less than the threshold, the remaining blocks are
  skipped and their cached residual is added to the first block's output.

The first and last steps are always computed, and at most `max_skips` steps in a row are skipped.

Sequence-parallel ranks each hold a shard of the image tokens, so each holds only part of the two
sums: the runner sets `reduce_sums` (a SUM all-reduce over every rank of the video) and
`valid_tokens` (its shard's tokens that are not padding). The decision is taken on one float64
host value that is the same on every rank, so every rank skips the same steps as one rank would.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

CACHE_MODES = ("none", "teacache", "fbcache")


def _rescale(value: float, coefficients: tuple[float, ...]) -> float:
    result = 0.0
    for coefficient in coefficients:
        result = result * value + coefficient
    return max(result, 0.0)  # never negative, so a threshold of 0 never skips


@dataclass(frozen=True)
class CachePolicy:
    mode: str
    threshold: float
    max_skips: int

    def __post_init__(self) -> None:
        if self.mode not in CACHE_MODES:
            raise ValueError(f"sampling.cache={self.mode!r} is not one of {', '.join(CACHE_MODES)}")
        if not self.threshold >= 0:
            raise ValueError(f"sampling.cache_threshold={self.threshold} must be >= 0")
        if self.max_skips < 1:
            raise ValueError(f"sampling.cache_max_skips={self.max_skips} must be >= 1")


class StepCache:
    """One video's cache state for one rank; the transformer calls it once per step.

    Counts: `computed` and `skipped` steps so far.
    """

    def __init__(
        self, policy: CachePolicy, num_steps: int, teacache_coefficients: tuple[float, ...] | None = None
    ) -> None:
        if policy.mode == "none":
            raise ValueError("StepCache needs a policy other than `none`")
        self.policy = policy
        self.teacache_coefficients = tuple(teacache_coefficients or (1.0, 0.0))
        """TeaCache's rescale polynomial; without one the raw change accumulates (`step_cache_for`,
        which every video's cache comes from, refuses TeaCache for a family that has none)."""
        self.num_steps = num_steps
        self.probe_after_first_block = policy.mode == "fbcache"
        """What `should_compute` is given: the first block's residual (fbcache) or modulated input."""
        self.reduce_sums: Callable[[torch.Tensor], torch.Tensor] = lambda sums: sums
        """Sums `[2]` float64 of this rank -> sums over every rank of the video (set by the runner)."""
        self.valid_tokens: int | None = None
        """Image tokens of the probe that are not padding (all when None); set by the runner."""
        self.computed = 0
        self.skipped = 0
        self.history: list[bool] = []
        """Per step so far: True if computed."""
        self._previous: torch.Tensor | None = None
        self._residual: torch.Tensor | None = None
        self._accumulated = 0.0
        self._run = 0

    def _relative_l1(self, probe_BLD: torch.Tensor, previous_BLD: torch.Tensor) -> float:
        n = self.valid_tokens
        a, b = (probe_BLD, previous_BLD) if n is None else (probe_BLD[:, :n], previous_BLD[:, :n])
        diff = (a - b).abs().sum(dim=-1, dtype=torch.float32).sum(dtype=torch.float64)
        base = b.abs().sum(dim=-1, dtype=torch.float32).sum(dtype=torch.float64)
        total_diff, total_base = self.reduce_sums(torch.stack([diff, base])).tolist()
        return total_diff / total_base if total_base > 0 else float("inf")

    def _decide(self, probe_BLD: torch.Tensor) -> bool:
        step = len(self.history)
        previous = self._previous
        must = step == 0 or step >= self.num_steps - 1 or previous is None or self._residual is None
        if self.policy.mode == "teacache":
            self._previous = probe_BLD  # TeaCache compares consecutive steps
            if must:
                return True
            self._accumulated += _rescale(self._relative_l1(probe_BLD, previous), self.teacache_coefficients)
            return not (self._accumulated < self.policy.threshold and self._run < self.policy.max_skips)
        if must:  # fbcache compares with the last computed step
            return True
        change = self._relative_l1(probe_BLD, previous)
        return not (change < self.policy.threshold and self._run < self.policy.max_skips)

    def should_compute(self, probe_BLD: torch.Tensor) -> bool:
        """Record this step's decision: compute the blocks (True) or apply the cached residual."""
        compute = self._decide(probe_BLD)
        self.history.append(compute)
        if compute:
            self.computed += 1
            self._accumulated, self._run = 0.0, 0
            if self.probe_after_first_block:
                self._previous = probe_BLD
        else:
            self.skipped += 1
            self._run += 1
        return compute

    def store(self, residual_BLD: torch.Tensor) -> None:
        """The residual of the blocks this step computed (output minus input, image tokens)."""
        self._residual = residual_BLD

    def apply(self, img_BLD: torch.Tensor) -> torch.Tensor:
        """A skipped step's output: its input plus the last computed residual."""
        assert self._residual is not None, "a step was skipped before any was computed"
        return img_BLD + self._residual


def step_cache_for(
    mode: str,
    threshold: float,
    max_skips: int,
    num_steps: int,
    *,
    teacache_coefficients: tuple[float, ...] | None = None,
) -> StepCache | None:
    """The cache of one video, or None when caching is off; TeaCache needs the family's coefficients."""
    policy = CachePolicy(mode, float(threshold), int(max_skips))
    if mode == "teacache" and not teacache_coefficients:
        raise ValueError(
            "sampling.cache=teacache needs TeaCache coefficients fitted for this model family, and it "
            "has none: use sampling.cache=fbcache (First-Block-Cache needs none) or none"
        )
    return None if mode == "none" else StepCache(policy, num_steps, teacache_coefficients)
