"""`parallel.comm_dtype=fp8`: float8 attention transfers, about as accurate, a fraction of the bytes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hvbatch.config import load_config, transformer_preset
from hvbatch.models import random_transformer
from hvbatch.parallel import transport
from hvbatch.parallel.attention import SCALE_BYTES, USPAttention, pack_fp8, resolve_comm_dtype, unpack_fp8
from hvbatch.parallel.dims import ParallelDims, build_groups
from hvbatch.parallel.runner import SequenceParallelTransformer
from tests.helpers import rel_err
from tests.parallel_worker import run_cases
from tests.test_parallel import free_port

LAYOUTS = [(2, 1), (1, 2)]  # (ulysses, ring) on 2 ranks
# Measured (tiny model, 2 steps, 35 tokens; relative to the exact latents): ulysses 2 "plain"
# 2.6e-4, "cfg" 8.8e-4; ring 2 "plain" 1.5e-4, "cfg" 5.2e-4. e4m3 keeps 3 mantissa bits (a round
# trip costs about 2.4% per row, test_pack_round_trip), most of which attention averages out. The
# bound leaves 3.4x headroom; a wrong scale or byte order gives errors of order 1.
FP8_BOUND = 3e-3


def compression_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    from tests.parallel_worker import init_gloo

    init_gloo(rank, world, port)
    real_staged = transport.staged
    try:
        model = random_transformer(transformer_preset("tiny"), seed=0)
        for ulysses, ring in LAYOUTS:
            groups = build_groups(ParallelDims(dp=1, ulysses=ulysses, ring=ring, world_size=world), rank)
            result = {}
            for comm_dtype in ("none", "fp8", "staged"):
                if comm_dtype == "staged":  # the host staging path of gloo with CUDA tensors, forced
                    transport.staged = lambda tensor, group: True
                runner = SequenceParallelTransformer(
                    model, groups, "none" if comm_dtype == "staged" else comm_dtype
                )
                latents = run_cases(runner)
                result[comm_dtype] = {"latents": latents, "bytes": dict(runner.attention.stats.bytes_sent)}
                model.attention_fn = runner.single_device_attention_fn
            transport.staged = real_staged
            torch.save(result, Path(out_dir) / f"u{ulysses}r{ring}-rank{rank}.pt")
            dist.barrier()
    finally:
        dist.destroy_process_group()


def test_fp8_transfers_are_close_and_smaller(tmp_path: Path) -> None:
    world = 2
    reference = run_cases(random_transformer(transformer_preset("tiny"), seed=0))
    mp.spawn(compression_worker, args=(world, free_port(), str(tmp_path)), nprocs=world, join=True)
    head_dim = transformer_preset("tiny").head_dim
    for ulysses, ring in LAYOUTS:
        per_rank = [torch.load(tmp_path / f"u{ulysses}r{ring}-rank{r}.pt") for r in range(world)]
        for result in per_rank:
            exact, fp8 = result["none"], result["fp8"]
            for name, expected in reference.items():
                assert rel_err(exact["latents"][name], expected) <= 1e-5
                error = rel_err(fp8["latents"][name], expected)
                assert 1e-5 < error <= FP8_BOUND, (ulysses, ring, name, error)  # compressed, but close
            kind = "ulysses" if ulysses > 1 else "ring"
            # float32 D values per token and head become D float8 bytes + one float32 scale.
            ratio = (head_dim + SCALE_BYTES) / (4 * head_dim)
            assert exact["bytes"][kind] > 0
            assert fp8["bytes"][kind] == pytest.approx(exact["bytes"][kind] * ratio, abs=2)
            for exact_kind in ("text", "gather"):  # the text tokens and the final gather stay exact
                assert fp8["bytes"][exact_kind] == exact["bytes"][exact_kind]
        assert torch.equal(per_rank[0]["fp8"]["latents"]["cfg"], per_rank[1]["fp8"]["latents"]["cfg"])
        for result in per_rank:  # staged through host buffers: the same bits
            assert all(
                torch.equal(result["staged"]["latents"][n], result["none"]["latents"][n]) for n in reference
            )


def test_pack_round_trip() -> None:
    x = torch.randn(3, 5, 16, dtype=torch.bfloat16) * torch.logspace(-3, 3, 5)[:, None].to(torch.bfloat16)
    x[0, 0] = 0  # an all-zero row keeps a finite scale
    packed = pack_fp8(x)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 5, 16 + SCALE_BYTES)
    back = unpack_fp8(packed, torch.bfloat16)
    assert back.dtype == torch.bfloat16 and torch.equal(back[0, 0], x[0, 0])
    per_row = (back - x).float().norm(dim=-1) / x.float().norm(dim=-1).clamp_min(1e-30)
    assert per_row[x.float().norm(dim=-1) > 0].max() < 0.05  # per-row scales: every magnitude alike
    assert packed.numel() < x.numel() * x.element_size() * 0.65  # bf16: (16 + 4) / 32 bytes


def test_comm_dtype_is_validated() -> None:
    with pytest.raises(ValueError, match=r"parallel\.comm_dtype='int4' is not one of auto, none, fp8"):
        load_config(overrides=["parallel.comm_dtype=int4"])
    dims = ParallelDims(dp=1, ulysses=1, ring=1, world_size=1)
    with pytest.raises(ValueError, match=r"parallel\.comm_dtype='fp16' is not one of none, fp8"):
        USPAttention(build_groups(dims, 0), comm_dtype="fp16")


@pytest.mark.parametrize(
    ("dp", "ulysses", "ring", "gpus_per_node", "expected"),
    [
        (1, 8, 1, 8, "none"),  # one node: NVLink, packing costs more than it saves
        (2, 4, 1, 8, "none"),
        (1, 8, 2, 8, "fp8"),  # the ring spans the two nodes
        (1, 4, 4, 8, "fp8"),  # u4 x r4 on 2 x 8: the ring groups {0, 4, 8, 12} cross nodes
        (2, 4, 2, 8, "none"),  # 16 GPUs, each video inside one node
        (1, 2, 2, 2, "fp8"),  # 2 GPUs per node: the ring crosses
        (1, 16, 1, 8, "fp8"),  # a Ulysses group across nodes (only by an explicit setting)
        (8, 1, 1, 8, "none"),  # no sequence parallelism: nothing to compress
    ],
)
def test_comm_dtype_auto_compresses_only_across_nodes(
    dp: int, ulysses: int, ring: int, gpus_per_node: int, expected: str
) -> None:
    dims = ParallelDims(dp=dp, ulysses=ulysses, ring=ring, world_size=dp * ulysses * ring)
    assert resolve_comm_dtype("auto", dims, gpus_per_node) == expected
    assert resolve_comm_dtype("none", dims, gpus_per_node) == "none"
    assert resolve_comm_dtype("fp8", dims, gpus_per_node) == "fp8"
    assert load_config().parallel.comm_dtype == "auto"  # the default
