"""Sending shard jobs through submitit: Slurm arrays where `sbatch` exists, else the local executor.

Both run the same `run_shard_job` with the same number of ranks. Arrays larger than the cluster's
MaxArraySize are split. Job ids are recorded in `jobs/submission-NNNN.json`; status never waits on
submitit's job state (it can block forever on a cluster without accounting).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from typing import Any

import submitit

from hvbatch.batch.job import run_shards_job
from hvbatch.batch.rundir import RunDir, write_json_atomic
from hvbatch.config import Config

DEFAULT_MAX_ARRAY_SIZE = 1001


def slurm_controller_up() -> bool:
    """`sbatch` is installed and a Slurm controller answers `scontrol ping`."""
    if not (shutil.which("sbatch") and shutil.which("scontrol")):
        return False
    try:
        result = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return False
    return result.returncode == 0 and " is UP" in result.stdout


def resolve_executor(kind: str) -> str:
    if kind == "auto":
        return "slurm" if slurm_controller_up() else "local"
    if kind not in ("slurm", "local"):
        raise ValueError(f"--executor {kind!r}: use auto, slurm or local")
    if kind == "slurm" and not shutil.which("sbatch"):
        raise ValueError(
            "--executor slurm: sbatch is not on PATH (load the Slurm module, or use --executor local)"
        )
    return kind


def cluster_max_array_size() -> int:
    try:
        out = subprocess.run(
            ["scontrol", "show", "config"], capture_output=True, text=True, timeout=30
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return DEFAULT_MAX_ARRAY_SIZE
    match = re.search(r"^MaxArraySize\s*=\s*(\d+)", out, flags=re.M)
    return int(match.group(1)) if match else DEFAULT_MAX_ARRAY_SIZE


def make_executor(run: RunDir, config: Config, kind: str) -> submitit.Executor:
    s = config.slurm
    executor = submitit.AutoExecutor(folder=run.root / "submitit" / "%j", cluster=kind)
    params: dict[str, Any] = {
        "name": f"hvbatch-{run.root.name}",
        "timeout_min": int(s.time_min),
        "nodes": s.nodes,
        "tasks_per_node": s.tasks_per_node,
    }
    if kind == "slurm":
        params.update(
            gpus_per_node=s.gpus_per_node,
            slurm_array_parallelism=s.array_parallelism,
            slurm_srun_args=["--kill-on-bad-exit=1"],
        )
        for key in ("partition", "account", "qos", "constraint"):
            if getattr(s, key):
                params[f"slurm_{key}"] = getattr(s, key)
        if s.mem_gb:
            params["mem_gb"] = s.mem_gb
        if s.cpus_per_task:
            params["cpus_per_task"] = s.cpus_per_task
        if s.additional_parameters:
            params["slurm_additional_parameters"] = dict(s.additional_parameters)
        if s.setup:
            params["slurm_setup"] = list(s.setup)
    else:
        gpus = config.parallel.gpus_per_node if config.device != "cpu" and _has_cuda() else 0
        params["gpus_per_node"] = gpus
    executor.update_parameters(**params)
    return executor


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def submit_shards(run: RunDir, config: Config, shards: list[int], kind: str) -> list[dict[str, Any]]:
    """Submit one array element per shard (split at MaxArraySize); record and return the jobs."""
    executor = make_executor(run, config, kind)
    records: list[dict[str, Any]] = []
    if kind == "local":
        # One machine: a single job loads the model once and works through every shard in order.
        job = executor.submit(run_shards_job, str(run.root), shards)
        records = [{"shard": shard, "job_id": str(job.job_id), "executor": kind} for shard in shards]
    else:
        limit = max(1, config.slurm.max_array_size or cluster_max_array_size())
        for start in range(0, len(shards), limit):
            chunk = shards[start : start + limit]
            jobs = executor.map_array(run_shards_job, [str(run.root)] * len(chunk), [[s] for s in chunk])
            records += [
                {"shard": shard, "job_id": str(job.job_id), "executor": kind}
                for shard, job in zip(chunk, jobs, strict=True)
            ]
    number = len(run.submissions()) + 1
    write_json_atomic(
        run.root / "jobs" / f"submission-{number:04d}.json",
        {"submitted_at": time.time(), "executor": kind, "jobs": records},
    )
    return records
