"""Sequence-parallel scaling on CPU: FLOPs share, bytes sent per rank, wall-clock speedup.

    python3 benchmarks/sp_scaling.py [--world-sizes 1 2 4 8] [--latent 9 32 32] [--repeats 3]
    python3 benchmarks/sp_scaling.py --comm-dtype fp8 [--steps 4] [--world-sizes 2 4 8]

For each world size P, runs one forward of the tiny model (12 heads) under gloo with one
thread per rank and prints: each rank's FLOPs as a share of the 1-rank FLOPs (ideal 1/P), the
bytes each rank sent per step against parallel.md's formulas (per layer: Ulysses
4·S·d·(u−1)/(u·P), Ring 2·S·d·(r−1)/P), and the wall-clock time. The speedup is only meaningful
up to P = the number of cores (2 on the CI machine).

With `--comm-dtype fp8` it also runs every layout with float8 attention transfers
(`parallel.comm_dtype=fp8`) and prints the bytes per rank per step of both and the relative
difference of the latents after `--steps` denoising steps (true CFG, scale 6) against the exact
transfers.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hvbatch.config import SamplingConfig, transformer_preset
from hvbatch.models.hunyuan_video import TextConditioning, random_transformer
from hvbatch.parallel.dims import ParallelDims, build_groups
from hvbatch.parallel.launch import free_local_port
from hvbatch.parallel.measure import count_flops
from hvbatch.parallel.runner import SequenceParallelTransformer
from hvbatch.sampling import denoise, initial_noise


def _inputs(latent: tuple[int, int, int]) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, *latent, generator=g)
    text = torch.randn(1, 64, 64, generator=g)
    mask = torch.ones(1, 64, dtype=torch.long)
    return x, torch.tensor([900.0]), text, mask, torch.randn(1, 32, generator=g), torch.tensor([6016.0])


def _measure(model: object, latent: tuple[int, int, int], repeats: int) -> tuple[int, float]:
    x, t, text, mask, pooled, guidance = _inputs(latent)
    cond = TextConditioning.from_mask(text, mask, pooled, guidance_scale=float(guidance[0]) / 1000)

    def call() -> torch.Tensor:
        return model(x, t, cond)  # type: ignore[operator]

    flops, _ = count_flops(call)
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            if dist.is_initialized():
                dist.barrier()
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
    return flops, statistics.median(times)


def _latents(model: object, latent: tuple[int, int, int], steps: int) -> torch.Tensor:
    """`steps` denoising steps with true CFG (batch 2) from fixed noise and prompts."""
    _, _, text, mask, pooled, _ = _inputs(latent)
    cond = TextConditioning.from_mask(text, mask, pooled)
    negative = TextConditioning.from_mask(text.flip(1), mask, -pooled)
    sampling = SamplingConfig(num_inference_steps=steps, seed=0, cfg_scale=6.0)
    with torch.no_grad():
        return denoise(model, initial_noise((1, 16, *latent), 0), cond, sampling, negative=negative)  # type: ignore[arg-type]


def layout(world: int, heads: int = 12) -> tuple[int, int]:
    ulysses = max(u for u in range(1, world + 1) if world % u == 0 and heads % u == 0)
    return ulysses, world // ulysses


def _worker(
    rank: int, world: int, port: int, latent: tuple[int, int, int], repeats: int, out: str, compare: int
) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=300),
    )
    try:
        ulysses, ring = layout(world)
        model = random_transformer(transformer_preset("tiny"), seed=0)
        runner = SequenceParallelTransformer(model, build_groups(ParallelDims(1, ulysses, ring, world), rank))
        flops, seconds = _measure(runner, latent, repeats)
        stats = runner.attention.stats
        calls = stats.calls  # forwards run: 1 counted + repeats timed
        sent = {kind: value / calls for kind, value in stats.bytes_sent.items()}
        result = {"flops": flops, "seconds": seconds, "bytes": sent, "shard": runner.attention.shard_len}
        if compare:  # `compare` steps with exact and with fp8 transfers
            for comm_dtype in ("none", "fp8"):
                model.attention_fn = runner.single_device_attention_fn
                runner = SequenceParallelTransformer(model, runner.groups, comm_dtype)
                latents = _latents(runner, latent, compare)
                per_step = {
                    k: v / runner.attention.stats.calls for k, v in runner.attention.stats.bytes_sent.items()
                }
                result[comm_dtype] = {"latents": latents, "bytes": per_step}
        torch.save(result, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--latent", type=int, nargs=3, default=[9, 32, 32], help="latent T H W")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--comm-dtype", choices=["none", "fp8"], default="none", help="fp8: compare")
    parser.add_argument("--steps", type=int, default=4, help="denoising steps of the fp8 comparison")
    args = parser.parse_args()
    compare = args.steps if args.comm_dtype == "fp8" else 0
    latent = tuple(args.latent)
    torch.set_num_threads(1)
    config = transformer_preset("tiny")
    layers = config.num_double_blocks + config.num_single_blocks
    base_flops, base_seconds = _measure(random_transformer(config, seed=0), latent, args.repeats)
    tokens = latent[0] * (latent[1] // 2) * (latent[2] // 2)
    print(
        f"tiny model, {tokens} image tokens, 1 thread per rank; 1 rank: {base_flops / 1e9:.2f} GFLOP, "
        f"{base_seconds * 1e3:.0f} ms"
    )
    for world in [w for w in args.world_sizes if w > 1]:
        ulysses, ring = layout(world)
        with tempfile.TemporaryDirectory() as out:
            mp.spawn(
                _worker,
                args=(world, free_local_port(), latent, args.repeats, out, compare),
                nprocs=world,
                join=True,
            )
            results = [torch.load(Path(out) / f"rank{r}.pt") for r in range(world)]
        share = max(r["flops"] for r in results) / base_flops
        seq = world * results[0]["shard"]
        d_bytes = config.hidden_size * 4
        f_uly = 4 * seq * d_bytes * (ulysses - 1) / (ulysses * world) * layers
        f_ring = 2 * seq * d_bytes * (ring - 1) / world * layers
        sent = results[0]["bytes"]
        slowest = max(r["seconds"] for r in results)
        mb = {kind: value / 1e6 for kind, value in sent.items()}
        print(
            f"P={world} (ulysses {ulysses} x ring {ring}): FLOPs share {share:.3f} (ideal {1 / world:.3f}); "
            f"bytes/rank/step ulysses {mb['ulysses']:.2f} MB (formula {f_uly / 1e6:.2f}), "
            f"ring {mb['ring']:.2f} MB (formula {f_ring / 1e6:.2f}), text {mb['text']:.2f} MB, "
            f"gather {mb['gather']:.2f} MB; {slowest * 1e3:.0f} ms, speedup {base_seconds / slowest:.2f}x"
        )
        if compare:
            _print_comparison(results[0], compare)


def _print_comparison(result: dict, steps: int) -> None:
    exact, fp8 = result["none"], result["fp8"]
    diff = ((fp8["latents"] - exact["latents"]).norm() / exact["latents"].norm()).item()
    moved = {k: (exact["bytes"][k] / 1e6, fp8["bytes"][k] / 1e6) for k in ("ulysses", "ring")}
    total = sum(exact["bytes"].values()) / 1e6, sum(fp8["bytes"].values()) / 1e6
    print(
        "    comm_dtype fp8 vs none, per rank per forward (batch 2): "
        + ", ".join(f"{k} {a:.2f} -> {b:.2f} MB" for k, (a, b) in moved.items())
        + f", all {total[0]:.2f} -> {total[1]:.2f} MB ({total[1] / total[0]:.2f}x); "
        f"latents after {steps} steps differ by {diff:.2e} (relative)"
    )


if __name__ == "__main__":
    main()
