"""Smoke tests of the real Slurm test cluster (tests/slurm_cluster.py): sbatch, submitit, scancel."""

from __future__ import annotations

import os
import sys
from datetime import timedelta
from pathlib import Path

import cloudpickle
import submitit

from tests.slurm_cluster import (
    SlurmCluster,
    run,
    start_cluster,
    stop_cluster,
    wait_for_sacct_state,
    wait_until,
)

pytest_plugins = ["tests.slurm_cluster"]

NUM_GPUS = 8
SUBMITIT_TIMEOUT_S = 150


def sbatch(cluster: SlurmCluster, *args: str) -> str:
    return cluster.run(["sbatch", "--parsable", *args]).strip()


def test_sbatch_job_sees_eight_gpus_and_is_accounted(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    out = tmp_path / "job.out"
    job_id = sbatch(
        slurm_cluster,
        f"--gpus-per-node={NUM_GPUS}",
        f"--output={out}",
        "--wrap",
        "echo CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES",
    )
    assert wait_for_sacct_state(job_id, slurm_cluster.env) == "COMPLETED"
    assert out.read_text().split() == ["CUDA_VISIBLE_DEVICES=0,1,2,3,4,5,6,7"]
    tres = slurm_cluster.run(["sacct", "-X", "-n", "-P", "-o", "AllocTRES", "-j", job_id])
    assert f"gres/gpu={NUM_GPUS}" in tres


def all_reduce_over_ranks(item: int) -> dict[str, object]:
    """Runs in each of the job's 8 tasks: sums item * (rank + 1) over the ranks with gloo."""
    import torch
    import torch.distributed as dist

    visible_gpus_from_slurm = os.environ.get("CUDA_VISIBLE_DEVICES")
    env = submitit.helpers.TorchDistributedEnvironment().export()
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    try:
        total = torch.tensor([float(item * (env.rank + 1))])
        dist.all_reduce(total)
    finally:
        dist.destroy_process_group()
    return {
        "sum": int(total.item()),
        "rank": env.rank,
        "world_size": env.world_size,
        "gpus_from_slurm": visible_gpus_from_slurm,
        "gpu_after_export": os.environ["CUDA_VISIBLE_DEVICES"],
    }


def test_submitit_array_all_reduces_over_eight_tasks(slurm_env: SlurmCluster, tmp_path: Path) -> None:
    executor = submitit.AutoExecutor(folder=tmp_path / "%j")
    assert executor.cluster == "slurm"
    executor.update_parameters(
        nodes=1, tasks_per_node=NUM_GPUS, gpus_per_node=NUM_GPUS, timeout_min=5, slurm_array_parallelism=2
    )
    items = [1, 2, 3]
    # By value, so that the 8 tasks of each job need not import this module and pytest: less CPU.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        jobs = executor.map_array(all_reduce_over_ranks, items)
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    try:
        wait_until(
            lambda: all(job.done(force_check=True) for job in jobs),
            SUBMITIT_TIMEOUT_S,
            f"submitit jobs {[job.job_id for job in jobs]} (logs in {tmp_path})",
            interval=1.0,
        )
    finally:
        for job in jobs:
            if not job.done():
                job.cancel(check=False)

    ranks_sum = NUM_GPUS * (NUM_GPUS + 1) // 2
    all_gpus = ",".join(str(i) for i in range(NUM_GPUS))
    for item, job in zip(items, jobs, strict=True):
        results = job.results()
        assert [r["rank"] for r in results] == list(range(NUM_GPUS)), job.job_id
        for rank, result in enumerate(results):
            assert result["sum"] == item * ranks_sum
            assert result["world_size"] == NUM_GPUS
            assert result["gpus_from_slurm"] == all_gpus
            assert result["gpu_after_export"] == str(rank)
        assert wait_for_sacct_state(job.job_id, slurm_env.env) == "COMPLETED"


def test_scancel_of_a_running_job_shows_cancelled(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    job_id = sbatch(slurm_cluster, f"--output={tmp_path / 'job.out'}", "--wrap", "sleep 300")
    wait_until(
        lambda: slurm_cluster.run(["squeue", "-h", "-o", "%T", "-j", job_id]).strip() == "RUNNING",
        30,
        f"job {job_id} to run",
        interval=0.2,
    )
    slurm_cluster.run(["scancel", job_id])
    assert wait_for_sacct_state(job_id, slurm_cluster.env) == "CANCELLED"
    assert "JobState=CANCELLED" in slurm_cluster.run(["scontrol", "show", "job", job_id])


def test_second_cluster_with_small_max_array_size_runs_beside_the_first(
    slurm_cluster: SlurmCluster, tmp_path: Path
) -> None:
    second = start_cluster(tmp_path / "second", max_array_size=4)
    try:
        assert second.conf != slurm_cluster.conf
        config = second.run(["scontrol", "show", "config"])
        assert any(line.split() == ["MaxArraySize", "=", "4"] for line in config.splitlines())
        rejected = run_failing(second, ["sbatch", "--array=0-4", "--wrap", "true"])
        assert "Invalid job array specification" in rejected
        job_id = sbatch(second, f"--output={tmp_path / '%A_%a.out'}", "--array=0-3", "--wrap", "true")
        for index in range(4):
            assert wait_for_sacct_state(f"{job_id}_{index}", second.env) == "COMPLETED"
        # The session cluster still answers beside the second one.
        assert slurm_cluster.run(["sinfo", "-h", "-o", "%T"]).strip() in {"idle", "mixed", "allocated"}
    finally:
        stop_cluster(second)
    daemons = [int(pid) for pid in (second.dir / "pids.stopped").read_text().split()]
    assert [pid for pid in daemons if runs_for(pid, second.dir)] == []


def run_failing(cluster: SlurmCluster, cmd: list[str]) -> str:
    try:
        out = run(cmd, cluster.env)
    except AssertionError as error:
        return str(error)
    raise AssertionError(f"{' '.join(cmd)} succeeded but should have failed: {out}")


def runs_for(pid: int, directory: Path) -> bool:
    """Whether `pid` is a live daemon started for the cluster in `directory`."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False
    return f"HVBATCH_SLURM_CLUSTER_DIR={directory}".encode() in environ
