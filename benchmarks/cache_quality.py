"""What step caching costs in quality on the tiny model: computed steps and latent difference.

    python benchmarks/cache_quality.py [--steps 20] [--thresholds 0.05 0.1 0.15]

For each policy (`teacache`, `fbcache`) and threshold, samples one video with the cache and
prints the steps computed, the relative L2 difference of its final latents from the uncached
latents, and the denoising time relative to uncached. The tiny model has random weights, so
the figures show the mechanism (how many steps a threshold skips, how far the latents move), not
the visual quality of the released model. `cache_quality` is the core, for other benchmarks.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from typing import Any

import torch

from hvbatch.config import SamplingConfig, transformer_preset
from hvbatch.models.family import get_family
from hvbatch.models.hunyuan_video import HunyuanVideoTransformer, TextConditioning, random_transformer
from hvbatch.sampling import new_step_cache, sample

FAMILY = get_family("hunyuan-video-1.0")


def _conditioning(config: Any, seed: int = 0, text_len: int = 24) -> TextConditioning:
    generator = torch.Generator().manual_seed(seed)
    mask = torch.zeros(1, 32, dtype=torch.long)
    mask[0, :text_len] = 1
    states = torch.randn(1, 32, config.text_dim, generator=generator)
    pooled = torch.randn(1, config.pooled_text_dim, generator=generator)
    return TextConditioning.from_mask(states, mask, pooled)


def _timed_sample(
    model: HunyuanVideoTransformer, cond: TextConditioning, sampling: SamplingConfig
) -> tuple[torch.Tensor, float, int]:
    cache = new_step_cache(sampling, FAMILY.step_cache.teacache_coefficients)
    start = time.perf_counter()
    with torch.no_grad():
        latents = sample(model, cond, sampling, geometry=FAMILY.geometry, step_cache=cache)
    computed = sampling.num_inference_steps if cache is None else cache.computed
    return latents, time.perf_counter() - start, computed


def cache_quality(
    model: HunyuanVideoTransformer,
    sampling: SamplingConfig,
    modes: tuple[str, ...] = ("teacache", "fbcache"),
    thresholds: tuple[float, ...] = (0.05, 0.1, 0.15),
) -> list[dict[str, Any]]:
    """One row per (mode, threshold): steps computed, relative latent difference, time ratio."""
    cond = _conditioning(model.config, seed=sampling.seed)
    reference, reference_s, _ = _timed_sample(model, cond, sampling)
    rows = []
    for mode in modes:
        for threshold in thresholds:
            cached_sampling = dataclasses.replace(sampling, cache=mode, cache_threshold=threshold)
            latents, seconds, computed = _timed_sample(model, cond, cached_sampling)
            diff = float((latents - reference).norm() / reference.norm())
            rows.append(
                {
                    "mode": mode,
                    "threshold": threshold,
                    "steps": sampling.num_inference_steps,
                    "computed": computed,
                    "rel_latent_diff": diff,
                    "time_ratio": seconds / reference_s,
                }
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.05, 0.1, 0.15])
    parser.add_argument("--height", type=int, default=64)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--frames", type=int, default=17)
    args = parser.parse_args()
    model = random_transformer(transformer_preset("tiny"), seed=0)
    sampling = SamplingConfig(
        height=args.height, width=args.width, num_frames=args.frames, num_inference_steps=args.steps, seed=0
    )
    grid = FAMILY.geometry.latent_shape(args.height, args.width, args.frames)
    print(f"tiny model (random weights), latent {grid}, {args.steps} steps, cache_max_skips 3")
    print(f"{'cache':<9} {'threshold':>9} {'computed':>9} {'rel. latent diff':>17} {'time vs none':>13}")
    for row in cache_quality(model, sampling, thresholds=tuple(args.thresholds)):
        print(
            f"{row['mode']:<9} {row['threshold']:>9g} {row['computed']:>5}/{row['steps']:<3} "
            f"{row['rel_latent_diff']:>17.2e} {row['time_ratio']:>12.2f}x"
        )


if __name__ == "__main__":
    main()
