"""Rank and world from torchrun's or Slurm's environment."""

from __future__ import annotations

import pytest
import torch

from hvbatch.parallel.launch import DistEnv, dist_env_from


def test_single_process_when_nothing_is_set() -> None:
    assert dist_env_from({}) is None
    assert dist_env_from({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}) is None


def test_torchrun_environment() -> None:
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "8",
           "MASTER_ADDR": "node1", "MASTER_PORT": "29400"}  # fmt: skip
    assert dist_env_from(env) == DistEnv(3, 8, 3, 8, "node1", 29400)


def test_slurm_environment() -> None:
    env = {"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "SLURM_NTASKS_PER_NODE": "8",
           "SLURM_JOB_ID": "1234", "MASTER_ADDR": "gpu-a01"}  # fmt: skip
    assert dist_env_from(env) == DistEnv(9, 16, 1, 8, "gpu-a01", 20000 + 1234)


@pytest.mark.parametrize(
    ("extra", "node_id", "local_world"),
    [
        ({"SLURM_TASKS_PER_NODE": "8(x2)"}, "1", 8),  # --nodes=2 --ntasks=16, no --ntasks-per-node
        ({"SLURM_TASKS_PER_NODE": "8(x2)", "SLURM_STEP_TASKS_PER_NODE": "4(x2)"}, "1", 4),  # the step's
        ({"SLURM_TASKS_PER_NODE": "6,5(x2)"}, "2", 5),  # uneven: this node's own count
        ({"SLURM_TASKS_PER_NODE": "garbled"}, "0", 16),
        ({}, "0", 16),
    ],
)
def test_slurm_ranks_per_node_without_ntasks_per_node(
    extra: dict[str, str], node_id: str, local_world: int
) -> None:
    env = {"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "SLURM_NODEID": node_id,
           "SLURM_JOB_ID": "5", "MASTER_ADDR": "gpu-a01", **extra}  # fmt: skip
    dist_env = dist_env_from(env)
    assert dist_env is not None and dist_env.local_world_size == local_world


def test_incomplete_environment_is_explained() -> None:
    with pytest.raises(ValueError, match="MASTER_ADDR, MASTER_PORT"):
        dist_env_from({"RANK": "0", "WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match="WORLD_SIZE='eight' is not an integer"):
        dist_env_from({"RANK": "0", "WORLD_SIZE": "eight"})


def test_nccl_defaults_are_exported_unless_already_set(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch.distributed as dist

    from hvbatch.config import load_config
    from hvbatch.parallel.launch import free_local_port, init_distributed

    monkeypatch.setenv("TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC", "77")
    monkeypatch.delenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", raising=False)
    config = load_config(overrides=["model=tiny"])
    env = DistEnv(0, 1, 0, 1, "127.0.0.1", free_local_port())
    init_distributed(env, torch.device("cpu"), nccl_env=config.parallel.nccl_env, timeout_s=30)
    try:
        import os

        assert os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"  # the config's default
        assert os.environ["TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC"] == "77"  # the user's own value wins
        assert dist.get_backend() == "gloo"
    finally:
        dist.destroy_process_group()
