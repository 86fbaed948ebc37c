"""The `sp_multirank` phase of `gpu_check.py`: the real multi-rank sequence-parallel code on one device.

Several processes share the one GPU: gloo carries the collectives (NCCL refuses two ranks on one
GPU), CUDA runs the compute, and the transfers are staged through host memory
(`hvbatch.parallel.transport`). Each layout (ulysses x ring) runs `SequenceParallelTransformer` on
a model that was never configured (library use: the kernel is resolved on the GPU, `auto`) with
exact and fp8 transfers, and its output is compared with the one-rank forward of the same weights.
Then NCCL starts eagerly on a world of 1 (`device_id`) and a group is split from it.
"""

from __future__ import annotations

import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from gpu_check_phases import Context, Recorder, Sizes, build_transformer, free_port, step_inputs, synchronize

PROVES = (
    "the Ulysses all-to-all, ring rotation, LSE merge, padding and text-block code of hvbatch.parallel "
    "on this GPU's kernels and dtypes (the kernel auto resolves on the GPU, the LSE layouts it returns, "
    "fp8 packing on CUDA), against the one-rank forward"
)
DOES_NOT_PROVE = (
    "NCCL transport between GPUs, NVLink/InfiniBand bandwidth, compute/communication overlap, speed "
    "of the parallel step, or device binding of several GPUs (one GPU, gloo through host memory)"
)


def _worker(
    rank: int, world: int, port: int, smoke: bool, layouts: list[tuple[int, int]], out_dir: str
) -> None:
    from hvbatch.parallel.dims import ParallelDims, ProcessGroups
    from hvbatch.parallel.runner import SequenceParallelTransformer

    sizes = Sizes.smoke() if smoke else Sizes.full()
    if sizes.device == "cuda":
        torch.cuda.set_device(0)
    else:
        torch.set_num_threads(1)
    timeout = timedelta(seconds=120)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timeout
    )
    try:
        model = build_transformer(sizes, 1, 1)
        args, kwargs = step_inputs(sizes, sizes.sp_video)
        job_groups = ProcessGroups(world, rank, timeout)
        for ulysses, ring in layouts:
            groups = job_groups.for_layout(ParallelDims(dp=1, ulysses=ulysses, ring=ring, world_size=world))
            result: dict[str, Any] = {}
            for comm in ("none", "fp8"):
                runner = SequenceParallelTransformer(model, groups, comm)
                with torch.no_grad():
                    out = runner(*args, **kwargs)
                synchronize(sizes.device)
                backend = runner.attention.backend
                result[comm] = {
                    "out": out.float().cpu(),
                    "backend": None if backend is None else backend.name,
                    "fallbacks": {} if backend is None else dict(backend.fallbacks),
                    "bytes": dict(runner.attention.stats.bytes_sent),
                }
                model.attention_fn = runner.single_device_attention_fn
            torch.save(result, Path(out_dir) / f"u{ulysses}r{ring}-rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _nccl_world_of_one(rec: Recorder) -> None:
    port = free_port()
    device = torch.device("cuda", 0)
    t0 = time.perf_counter()
    dist.init_process_group(
        "nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1, device_id=device
    )
    try:
        init_s = time.perf_counter() - t0
        default = dist.distributed_c10d._get_default_group()
        t0 = time.perf_counter()
        group = dist.new_group([0])
        x = torch.ones(4, device=device)
        dist.all_reduce(x, group=group)
        dist.all_reduce(x)
        torch.cuda.synchronize()
        rec["nccl_world_1"] = {
            "init_s": round(init_s, 3),
            "bound_device_id": str(getattr(default, "bound_device_id", None)),
            "split_group_and_two_all_reduces_s": round(time.perf_counter() - t0, 3),
            "all_reduce_ok": bool((x == 1).all()),
        }
    finally:
        dist.destroy_process_group()


def _compare(
    results: list[dict[str, Any]], plain: torch.Tensor, world: int, seconds: float
) -> dict[str, Any]:
    layout: dict[str, Any] = {"ranks": world, "seconds_all_layouts_of_this_world": seconds}
    for comm in ("none", "fp8"):
        errors = [float((r[comm]["out"] - plain).norm() / plain.norm()) for r in results]
        layout[comm] = {
            "rel_err_max": max(errors),
            "backend": results[0][comm]["backend"],
            "fallbacks": results[0][comm]["fallbacks"],
            "bytes_rank0": results[0][comm]["bytes"],
        }
    return layout


def run(ctx: Context, rec: Recorder) -> None:
    s = ctx.sizes
    rec["proves"], rec["does_not_prove"] = PROVES, DOES_NOT_PROVE
    rec["video"] = list(s.sp_video)
    if s.device == "cuda":  # first: seconds, and nothing else in this process has touched NCCL
        _nccl_world_of_one(rec)
    model = build_transformer(s, 1, 1)
    args, kwargs = step_inputs(s, s.sp_video)
    with torch.no_grad():
        plain = model(*args, **kwargs).float().cpu()
    del model
    if s.device == "cuda":
        torch.cuda.empty_cache()
    by_world: dict[int, list[tuple[int, int]]] = {}
    for ulysses, ring in s.sp_layouts:
        by_world.setdefault(ulysses * ring, []).append((ulysses, ring))
    for world, layouts in sorted(by_world.items()):  # one start of `world` processes per world size
        if ctx.left() < 20:
            for ulysses, ring in layouts:
                rec[f"u{ulysses}r{ring}"] = "skipped: phase budget"
            continue
        with tempfile.TemporaryDirectory() as out_dir:
            t0 = time.perf_counter()
            mp.spawn(_worker, args=(world, free_port(), s.device == "cpu", layouts, out_dir), nprocs=world)
            seconds = round(time.perf_counter() - t0, 1)
            for ulysses, ring in layouts:
                key = f"u{ulysses}r{ring}"
                results = [torch.load(Path(out_dir) / f"{key}-rank{r}.pt") for r in range(world)]
                rec[key] = _compare(results, plain, world, seconds)
