"""Which GPU each rank uses, as Slurm and torchrun hand them out (CUDA faked: no GPU needed)."""

from __future__ import annotations

import os

import pytest
import torch

from hvbatch.config import ParallelConfig
from hvbatch.parallel import launch
from hvbatch.parallel.launch import (
    DistEnv,
    cuda_device_index,
    dist_env_from,
    export_submitit_environment,
    rank_device,
    setup_rank,
)

DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def gpus(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """Pretend CUDA is there; each test sets how many GPUs this process sees with `_see`."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    return monkeypatch


def _see(monkeypatch: pytest.MonkeyPatch, count: int, visible: str | None) -> None:
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)


def _torchrun(rank: int, world: int, local_rank: int, local_world: int) -> dict[str, str]:
    return {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(local_rank),
            "LOCAL_WORLD_SIZE": str(local_world), "MASTER_ADDR": "node1", "MASTER_PORT": "29500"}  # fmt: skip


def _srun(procid: int, ntasks: int, localid: int, per_node: int) -> dict[str, str]:
    return {"SLURM_PROCID": str(procid), "SLURM_NTASKS": str(ntasks), "SLURM_LOCALID": str(localid),
            "SLURM_NTASKS_PER_NODE": str(per_node), "SLURM_JOB_ID": "7", "MASTER_ADDR": "gpu1"}  # fmt: skip


@pytest.mark.parametrize(
    ("local_rank", "local_world", "visible", "index"),
    [
        (5, 8, 8, 5),  # torchrun, or Slurm with all 8 GPUs visible to every task
        (5, 8, 1, 0),  # Slurm --gpus-per-task=1, or CUDA_VISIBLE_DEVICES set per process
        (2, 4, 4, 2),  # CUDA_VISIBLE_DEVICES=4,5,6,7 and 4 ranks
        (1, 2, 8, 1),  # 2 ranks on a node with 8 visible GPUs: the first two
        (0, 1, 1, 0),  # a single process
        (0, 1, 8, 0),
    ],
)
def test_device_index_rule(local_rank: int, local_world: int, visible: int, index: int) -> None:
    assert cuda_device_index(local_rank, local_world, visible) == index


def test_torchrun_with_every_gpu_visible(gpus: pytest.MonkeyPatch) -> None:
    _see(gpus, 8, None)
    assert rank_device(dist_env_from(_torchrun(13, 16, 5, 8)), "auto") == torch.device("cuda", 5)


def test_slurm_one_gpu_per_task(gpus: pytest.MonkeyPatch) -> None:
    """`--gpus-per-task=1`: Slurm shows each task only its own GPU, whatever its local id."""
    _see(gpus, 1, "0")
    for localid in range(8):
        env = dist_env_from(_srun(8 + localid, 16, localid, 8))
        assert rank_device(env, "cuda") == torch.device("cuda", 0)


def test_slurm_all_eight_gpus_visible_to_each_task(gpus: pytest.MonkeyPatch) -> None:
    _see(gpus, 8, "0,1,2,3,4,5,6,7")
    assert rank_device(dist_env_from(_srun(11, 16, 3, 8)), "auto") == torch.device("cuda", 3)


def test_cuda_visible_devices_with_a_subset(gpus: pytest.MonkeyPatch) -> None:
    """torchrun --nproc-per-node 4 with CUDA_VISIBLE_DEVICES=4,5,6,7: indices are within the subset."""
    _see(gpus, 4, "4,5,6,7")
    assert rank_device(dist_env_from(_torchrun(2, 4, 2, 4)), "auto") == torch.device("cuda", 2)


def test_single_process(gpus: pytest.MonkeyPatch) -> None:
    _see(gpus, 2, None)
    assert dist_env_from({}) is None
    assert rank_device(None, "auto") == torch.device("cuda", 0)
    assert rank_device(None, "cuda") == torch.device("cuda", 0)
    assert rank_device(None, "cuda:1") == torch.device("cuda", 1)
    assert rank_device(None, "cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match=r"device='cuda:2' but this process sees 2 GPU\(s\).*N in 0\.\.1"):
        rank_device(None, "cuda:2")


def test_no_gpu_means_cpu_unless_cuda_is_asked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _see(monkeypatch, 0, None)
    assert rank_device(dist_env_from(_torchrun(1, 2, 1, 2)), "auto") == torch.device("cpu")
    with pytest.raises(ValueError, match=r"device='cuda' but this process sees 0 GPU\(s\)"):
        rank_device(None, "cuda")


def test_binding_that_cannot_work_is_explained(gpus: pytest.MonkeyPatch) -> None:
    _see(gpus, 3, "0,1,2")
    with pytest.raises(ValueError) as err:
        rank_device(dist_env_from(_srun(4, 8, 4, 8)), "auto")
    message = str(err.value)
    assert "local rank 4 of 8 ranks on this node needs a GPU, but this process sees 3" in message
    assert "CUDA_VISIBLE_DEVICES='0,1,2'" in message
    assert "exactly 1 visible GPU (its own) or at least 8" in message
    assert "--gpus-per-task=1" in message and "--gpus-per-node=8 --gpu-bind=none" in message
    with pytest.raises(ValueError, match=r"local rank 8 is outside 0\.\.7"):
        cuda_device_index(8, 8, 8)


def test_submitit_export_leaves_cuda_visible_devices_alone(
    gpus: pytest.MonkeyPatch,
) -> None:
    """Slurm bound GPU 0 (as the task sees it) to task 3: the export must not make that GPU '3'."""
    for name in DIST_VARS:  # set, then delete: the export's writes are undone after the test
        gpus.setenv(name, "")
        gpus.delenv(name)
    slurm = {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "4242", "SLURM_NTASKS": "8",
             "SLURM_JOB_NUM_NODES": "1", "SLURM_NODEID": "0", "SLURM_PROCID": "3", "SLURM_LOCALID": "3",
             "SLURM_JOB_NODELIST": "gpu-a07", "MASTER_PORT": "29411"}  # fmt: skip
    for name, value in slurm.items():
        gpus.setenv(name, value)
    _see(gpus, 1, "0")
    env = export_submitit_environment()
    assert env == DistEnv(3, 8, 3, 8, "gpu-a07", 29411)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0" and os.environ["RANK"] == "3"
    assert rank_device(env, "auto") == torch.device("cuda", 0)


def test_submitit_export_is_a_no_op_under_torchrun_or_outside_submitit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name, value in _torchrun(1, 2, 1, 2).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    assert export_submitit_environment() == DistEnv(1, 2, 1, 2, "node1", 29500)
    for name in DIST_VARS:
        monkeypatch.delenv(name)
    monkeypatch.delenv("SUBMITIT_EXECUTOR")
    monkeypatch.delenv("SLURM_PROCID", raising=False)
    assert export_submitit_environment() is None
    assert "RANK" not in os.environ


def test_set_device_comes_before_the_process_group(gpus: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    _see(gpus, 8, None)
    for name, value in _torchrun(9, 16, 1, 8).items():
        gpus.setenv(name, value)
    gpus.setattr(torch.cuda, "set_device", lambda device: calls.append(f"set_device {device}"))
    gpus.setattr(launch.dist, "init_process_group", lambda backend, **kw: calls.append(f"init {backend}"))
    setup = setup_rank(ParallelConfig(), "auto")
    assert setup.device == torch.device("cuda", 1) and setup.distributed
    assert calls[0] == "set_device cuda:1" and calls[-1] == "init nccl"
    assert os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
