"""Submission details that do not need a cluster: array splitting and executor parameters."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from hvbatch.batch.executors import slurm
from hvbatch.batch.rundir import RunDir
from hvbatch.config import load_config


class _FakeJob:
    def __init__(self, job_id: str) -> None:
        self.job_id = job_id


class _FakeExecutor:
    def __init__(self) -> None:
        self.arrays: list[list[Any]] = []

    def map_array(self, fn: object, run_dirs: list[str], shard_lists: list[list[int]]) -> list[_FakeJob]:
        self.arrays.append(shard_lists)
        array_id = 100 + len(self.arrays)
        return [_FakeJob(f"{array_id}_{i}") for i in range(len(shard_lists))]


def test_arrays_are_split_at_max_array_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _FakeExecutor()
    monkeypatch.setattr(slurm.SlurmExecutor, "make_submitit", lambda self, delay_s=0.0: fake)
    monkeypatch.setattr(slurm, "cluster_max_array_size", lambda: 4)
    run = RunDir(tmp_path)
    records = slurm.SlurmExecutor(run, load_config(overrides=["model=tiny"])).submit(list(range(10)))
    assert [len(a) for a in fake.arrays] == [4, 4, 2]
    assert [r.shard for r in records] == list(range(10))
    assert [r.job_id for r in records][:5] == ["101_0", "101_1", "101_2", "101_3", "102_0"]
    assert run.submissions()[0]["jobs"] == [r.to_dict() for r in records]


def test_executor_parameters_come_from_the_config(tmp_path: Path) -> None:
    config = load_config(overrides=[
        "model=tiny", "slurm.partition=gpu", "slurm.account=proj", "slurm.qos=high", "slurm.constraint=h100",
        "slurm.mem_gb=900", "slurm.time_min=90", "slurm.array_parallelism=3",
        "slurm.additional_parameters.reservation=big",
    ])  # fmt: skip
    executor = slurm.SlurmExecutor(RunDir(tmp_path), config).make_submitit()
    params = executor._executor.parameters  # the sbatch options submitit will write
    assert params["partition"] == "gpu" and params["account"] == "proj" and params["qos"] == "high"
    assert params["constraint"] == "h100" and params["mem"] == "900GB" and params["time"] == 90
    assert params["gpus_per_node"] == 8 and params["ntasks_per_node"] == 8 and params["nodes"] == 1
    assert params["array_parallelism"] == 3 and params["srun_args"] == ["--kill-on-bad-exit=1"]
    assert params["additional_parameters"] == {"reservation": "big", "requeue": True}
    assert params["signal_delay_s"] == 120 and "hvbatch.batch.executors.slurm finish" in params["teardown"][0]
