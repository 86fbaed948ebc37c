"""Sending shard jobs through submitit: Slurm arrays where `sbatch` exists, else the local executor.

Both run the same `run_shard_job` with the same number of ranks. Arrays larger than the cluster's
MaxArraySize are split. Job ids are recorded in `jobs/submission-NNNN.json`; status never waits on
submitit's job state (it can block forever on a cluster without accounting).
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import submitit

from hvbatch.batch.job import ShardJob
from hvbatch.batch.rundir import RunDir
from hvbatch.batch.supervisor import LocalShardJob
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


# Before srun: where this attempt's part of the job's stderr starts (srun reports failed tasks there).
LOG_OFFSET_LINE = "HVBATCH_LOG_OFFSET=$(stat -L -c %s /proc/$$/fd/2 2>/dev/null || echo 0)"


def finish_command(run: RunDir) -> str:
    """The job script's line after srun: record the attempt's end, retry or give up."""
    python = shlex.quote(sys.executable)
    run_dir = shlex.quote(str(run.root))
    return f'{python} -m hvbatch.batch.supervisor finish {run_dir} $? "${{HVBATCH_LOG_OFFSET:-0}}"'


def make_executor(run: RunDir, config: Config, kind: str, delay_s: float = 0.0) -> submitit.Executor:
    s, retry = config.slurm, config.retry
    folder = run.root / "submitit" / "%j"
    if kind == "local":
        # One task, the supervisor, which starts one process per rank itself. LocalExecutor directly:
        # through AutoExecutor it takes neither a fractional walltime nor a signal delay.
        local = submitit.LocalExecutor(folder=folder, max_num_timeout=retry.max_walltime_requeues)
        gpus = config.parallel.gpus_per_node if _local_gpus(config) else 0
        local.update_parameters(
            timeout_min=float(s.time_min),
            tasks_per_node=1,
            nodes=1,
            gpus_per_node=gpus,
            signal_delay_s=int(retry.signal_delay_s),
        )
        return local
    executor = submitit.AutoExecutor(
        folder=folder, cluster=kind, slurm_max_num_timeout=retry.max_walltime_requeues
    )
    additional: dict[str, Any] = {"requeue": True}  # node failures come back as the same job
    if delay_s > 0:
        additional["begin"] = f"now+{int(delay_s)}"
    additional.update(s.additional_parameters or {})
    params: dict[str, Any] = {
        "name": f"hvbatch-{run.root.name}",
        "timeout_min": math.ceil(s.time_min),
        "nodes": s.nodes,
        "tasks_per_node": s.tasks_per_node,
        "gpus_per_node": s.gpus_per_node,
        "slurm_array_parallelism": s.array_parallelism,
        "slurm_srun_args": ["--kill-on-bad-exit=1"],
        "slurm_signal_delay_s": int(retry.signal_delay_s),
        "slurm_additional_parameters": additional,
        # Must stay the first teardown line: it reads srun's exit status from $?.
        "slurm_teardown": [finish_command(run)],
        "slurm_setup": [*s.setup, LOG_OFFSET_LINE],
    }
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(s, key):
            params[f"slurm_{key}"] = getattr(s, key)
    if s.mem_gb:
        params["mem_gb"] = s.mem_gb
    if s.cpus_per_task:
        params["cpus_per_task"] = s.cpus_per_task
    executor.update_parameters(**params)
    return executor


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def submit_shards(
    run: RunDir, config: Config, shards: list[int], kind: str, *, delay_s: float = 0.0, manual: bool = True
) -> list[dict[str, Any]]:
    """Submit one array element per shard (split at MaxArraySize); record and return the jobs.

    `manual` submissions (submit, retry) give the shards a fresh budget of attempts; automatic
    resubmissions after a failure (`manual=False`) count against it.
    """
    executor = make_executor(run, config, kind, delay_s)
    records: list[dict[str, Any]] = []
    s, retry = config.slurm, config.retry
    if kind == "local":
        # One machine: a single job loads the model once and works through every shard in order.
        job_fn = LocalShardJob(
            s.tasks_per_node, s.time_min, retry.signal_delay_s, use_gpus=_local_gpus(config)
        )
        job = executor.submit(job_fn, str(run.root), shards)
        records = [{"shard": shard, "job_id": str(job.job_id), "executor": kind} for shard in shards]
    else:
        limit = max(1, s.max_array_size or cluster_max_array_size())
        shard_fn = ShardJob(s.time_min, retry.signal_delay_s)
        for start in range(0, len(shards), limit):
            chunk = shards[start : start + limit]
            jobs = executor.map_array(shard_fn, [str(run.root)] * len(chunk), [[s] for s in chunk])
            records += [
                {"shard": shard, "job_id": str(job.job_id), "executor": kind}
                for shard, job in zip(chunk, jobs, strict=True)
            ]
    run.add_submission(
        {
            "submitted_at": time.time(),
            "executor": kind,
            "jobs": records,
            "kind": "manual" if manual else "auto",
            "delay_s": delay_s,
        }
    )
    return records


def _local_gpus(config: Config) -> bool:
    return config.device != "cpu" and _has_cuda()


@contextlib.contextmanager
def _submission_environment() -> Iterator[None]:
    """Inside a job: hide its Slurm/submitit/torch variables from the new job (SLURM_CONF stays)."""
    keep = {"SLURM_CONF"}
    names = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
    hidden = {
        name: os.environ.pop(name)
        for name in list(os.environ)
        if name not in keep
        and (name.startswith(("SLURM_", "SLURMD_", "SRUN_", "SBATCH_", "SUBMITIT_")) or name in names)
    }
    try:
        yield
    finally:
        os.environ.update(hidden)


def resubmit_after_failure(run: RunDir, config: Config, shards: list[int], delay_s: float) -> None:
    """From a finished Slurm job: submit the shards again as a new job starting after `delay_s`."""
    with _submission_environment():
        submit_shards(run, config, shards, "slurm", delay_s=delay_s, manual=False)
