"""NCCL set up the way it runs fastest: eager init with `device_id`, one group per member set for the
whole job, host memory requested from the memory model, and doctor's check of it (all on CPU)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch

from hvbatch.batch.executors import sbatch as sbatch_jobs
from hvbatch.config import load_config
from hvbatch.doctor import cluster, system
from hvbatch.parallel import launch
from hvbatch.parallel.dims import ParallelDims, ProcessGroups, layout_blocks
from hvbatch.parallel.launch import DistEnv
from hvbatch.parallel.plan import host_memory_for_config, slurm_mem_gb

WORLD = 8
# A 3-shard job on one 8-GPU node with two layouts, as the planner picks them per shard.
SHARDS = [
    ParallelDims(dp=2, ulysses=4, ring=1, world_size=WORLD),
    ParallelDims(dp=1, ulysses=4, ring=2, world_size=WORLD),
    ParallelDims(dp=2, ulysses=4, ring=1, world_size=WORLD),
]


def groups_made_before(shards: list[ParallelDims]) -> int:
    """What the job made before: every Ulysses, ring and SP group of each shard's layout (cfg groups
    only with cfg 2), one-rank and world-sized sets included, created and destroyed per shard."""
    total = 0
    for dims in shards:
        blocks = layout_blocks(dims)
        total += sum(len(blocks[kind]) for kind in ("ulysses", "ring", "sp"))
        total += len(blocks["cfg"]) if dims.cfg > 1 else 0
    return total


class FakeNewGroup:
    def __init__(self) -> None:
        self.calls: list[tuple[int, ...]] = []

    def __call__(self, ranks: list[int], timeout: timedelta | None = None) -> object:
        self.calls.append(tuple(ranks))
        return object()


def test_groups_are_made_once_per_member_set_and_reused_across_shards() -> None:
    world_group = object()
    made = FakeNewGroup()
    job = ProcessGroups(WORLD, rank=5, new_group=made, world_group=world_group)  # type: ignore[arg-type]
    per_shard = [job.for_layout(dims) for dims in SHARDS]
    # dp 2 x u4: Ulysses {0-3}, {4-7} (= SP = video); u4 x r2: ring {0,4} {1,5} {2,6} {3,7}, SP = world
    assert sorted(made.calls) == [(0, 1, 2, 3), (0, 4), (1, 5), (2, 6), (3, 7), (4, 5, 6, 7)]
    assert job.created == 6 and groups_made_before(SHARDS) == 31  # per job: 31 communicators -> 6
    first, second, third = per_shard
    assert third.ulysses is first.ulysses and third.sp is first.sp  # the third shard reuses the first's
    assert first.ulysses is first.sp is first.video  # identical member sets: one communicator
    assert first.ring is None  # ring 1: one-rank sets make no group
    assert second.sp is second.video is world_group and second.ulysses is first.ulysses
    assert second.ring is not None and second.ring_ranks == [1, 5]


def test_one_node_layouts_make_no_communicator_but_the_world() -> None:
    made = FakeNewGroup()
    job = ProcessGroups(WORLD, rank=0, new_group=made, world_group="world")  # type: ignore[arg-type]
    dp8 = job.for_layout(ParallelDims(dp=8, ulysses=1, ring=1, world_size=WORLD))
    u8 = job.for_layout(ParallelDims(dp=1, ulysses=8, ring=1, world_size=WORLD))
    assert made.calls == []  # before: 24 one-rank groups for dp 8, and 10 for ulysses 8
    assert groups_made_before([ParallelDims(8, 1, 1, WORLD), ParallelDims(1, 8, 1, WORLD)]) == 34
    assert dp8.ulysses is dp8.sp is dp8.video is None
    assert u8.ulysses == u8.sp == u8.video == "world" and u8.ring is None


def test_nccl_starts_eagerly_with_the_rank_device(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(launch.dist, "init_process_group", lambda backend, **kwargs: calls.append(kwargs))
    monkeypatch.setattr(launch.torch.cuda, "set_device", lambda device: None)
    env = DistEnv(rank=3, world_size=8, local_rank=3, local_world_size=8, master_addr="h", master_port=1)
    launch.init_distributed(env, torch.device("cuda", 3), timeout_s=30)
    assert calls[-1]["device_id"] == torch.device("cuda", 3)
    launch.init_distributed(env, torch.device("cpu"), timeout_s=30)  # gloo: no device to bind
    assert calls[-1]["device_id"] is None


def test_mem_gb_defaults_to_the_host_memory_model(tmp_path: Path) -> None:
    config = load_config()
    gib = host_memory_for_config(config)
    assert gib == pytest.approx(8 * (14.21 + 4.0) * 1.1, abs=0.1)  # each rank's offloaded encoders
    assert slurm_mem_gb(config) == 173
    assert "#SBATCH --mem=173G" in sbatch_jobs._sbatch_options(config)
    assert slurm_mem_gb(load_config(overrides=["slurm.mem_gb=900"])) == 900  # the user's value wins
    kept = load_config(overrides=["model.text_encoder_offload=keep"])
    assert slurm_mem_gb(kept) == 38  # the encoders stay on the GPUs: only the per-rank baseline
    assert slurm_mem_gb(load_config(overrides=["model=tiny"])) is None  # toy preset: cluster default
    assert "--mem" not in sbatch_jobs._sbatch_options(load_config(overrides=["model=tiny"]))


def test_doctor_warns_when_the_nodes_cannot_hold_the_offloaded_encoders(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = load_config(overrides=["slurm.partition=gpu"])
    outputs = {"%m": "128000\n2000000+\n"}
    monkeypatch.setattr(cluster, "_run", lambda *cmd: cluster._Result(0, outputs[cmd[-1]], ""))
    check = cluster._check_node_memory(config)
    assert check.status == "warn" and "--mem=173G" in check.detail and "128 GB" in check.detail
    assert "text_encoder_offload=keep" in check.fix
    outputs["%m"] = "1000000\n"
    assert cluster._check_node_memory(config).status == "ok"
    monkeypatch.setattr(system, "host_memory_total_gib", lambda: 64.0)
    local = system.check_host_memory(load_config(overrides=["batch.executor=local"]))
    assert local.status == "warn" and "this machine has 64 GiB" in local.detail
    monkeypatch.setattr(system, "host_memory_total_gib", lambda: 512.0)
    assert system.check_host_memory(load_config(overrides=["batch.executor=local"])).status == "ok"
