"""Shard jobs on Slurm through submitit: one array element per shard, 8-rank node jobs.

Control plane: `SlurmExecutor` submits (arrays split at the cluster's MaxArraySize), asks `squeue`
which jobs are alive, `sacct` how they ended, and cancels with `scancel`.

Inside a job: every rank runs `SlurmShardJob` (submitit pickles it); on USR2 (walltime or
preemption) rank 0 records why and submitit requeues the same job, which resumes from the
manifest. After srun, the job script's first teardown line runs
`python -m hvbatch.batch.executors.slurm finish RUN_DIR $? OFFSET`: it records how the attempt
ended and, while attempts are left, submits the shard again as a new job that begins after the
backoff; otherwise the unfinished videos are marked failed for good.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import submitit

from hvbatch.batch import ledger
from hvbatch.batch.attempt import AttemptKey, interruption_reason, parse_sacct_state, parse_srun_failure
from hvbatch.batch.control.calibration import resubmission_config
from hvbatch.batch.executors.base import (
    TERMINAL_STATES,
    Executor,
    FoundJob,
    JobRecord,
    RunProbe,
    SchedulerUnavailable,
    log_to_stderr,
    record_submission,
    submission_lock,
)
from hvbatch.batch.rundir import RunDir
from hvbatch.config import load_config
from hvbatch.parallel.plan import slurm_mem_gb
from hvbatch.process import task_exits_cleanly

logger = logging.getLogger(__name__)
DEFAULT_MAX_ARRAY_SIZE = 1001
# Before srun: where this attempt's part of the job's stderr starts (srun reports failed tasks there).
LOG_OFFSET_LINE = "HVBATCH_LOG_OFFSET=$(stat -L -c %s /proc/$$/fd/2 2>/dev/null || echo 0)"


@dataclass(frozen=True)
class ControllerProbe:
    """What `scontrol ping` said: whether a controller answers, and why not in words."""

    up: bool
    why: str
    command_failed: bool = False
    """Slurm's commands are installed but `scontrol ping` failed or found no controller up (on a
    login node: a misconfigured SLURM_CONF, a controller down), not merely absent."""


def probe_slurm_controller() -> ControllerProbe:
    """`sbatch` is installed and a Slurm controller answers `scontrol ping`, and in words why not."""
    missing = [name for name in ("sbatch", "scontrol") if not shutil.which(name)]
    if missing:
        return ControllerProbe(False, f"{' and '.join(missing)} not on PATH")
    try:
        result = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError) as err:
        return ControllerProbe(False, f"scontrol ping failed: {err}", command_failed=True)
    said = " ".join((result.stdout.strip() or result.stderr.strip() or "no output").split())[:300]
    if result.returncode == 0 and " is UP" in result.stdout:
        return ControllerProbe(True, f"scontrol ping: {said}")
    return ControllerProbe(
        False, f"scontrol ping failed (exit status {result.returncode}): {said}", command_failed=True
    )


def slurm_controller_up() -> bool:
    """`sbatch` is installed and a Slurm controller answers `scontrol ping`."""
    return probe_slurm_controller().up


def cluster_max_array_size() -> int:
    try:
        out = subprocess.run(
            ["scontrol", "show", "config"], capture_output=True, text=True, timeout=30
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return DEFAULT_MAX_ARRAY_SIZE
    match = re.search(r"^MaxArraySize\s*=\s*(\d+)", out, flags=re.M)
    return int(match.group(1)) if match else DEFAULT_MAX_ARRAY_SIZE


def _squeue(arguments: list[str]) -> str | None:
    """squeue's output; None when it says that every id given has left the queue."""
    if not shutil.which("squeue"):
        raise SchedulerUnavailable("squeue is not on PATH (load the Slurm module)")
    try:
        command = ["squeue", "-h", "-r", *arguments]
        result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as err:
        raise SchedulerUnavailable(f"squeue failed: {err}") from err
    if result.returncode != 0:
        if "Invalid job id" in result.stderr:
            return None
        raise SchedulerUnavailable(f"squeue exited {result.returncode}: {result.stderr.strip()[:300]}")
    return result.stdout


def squeue_states(job_ids: list[str]) -> dict[str, str]:
    """`squeue` states of the given jobs (array elements expanded) that have not ended; absent
    ids have left the queue, and a job listed in a terminal state (CANCELLED, COMPLETED ... until
    MinJobAge) has ended too. A COMPLETING job is listed: its processes may still be running.

    Raises SchedulerUnavailable when squeue cannot answer: never "no job alive" on a failure.
    """
    if not job_ids:
        return {}
    out = _squeue(["-o", "%i %T", "--jobs", ",".join(sorted(set(job_ids)))]) or ""
    states = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1] not in TERMINAL_STATES:
            states[parts[0]] = parts[1]
    return states


def squeue_jobs_writing_under(folder: Path) -> dict[str, tuple[str, str]]:
    """This user's jobs that have not ended whose stdout lies under `folder` (a run directory:
    submitit's and the sbatch templates' logs are all inside it): job id -> (state, stdout)."""
    out = _squeue(["--me", "-O", "JobArrayID:|,State:|,StdOut:"]) or ""
    prefix = f"{folder}/"
    jobs = {}
    for line in out.splitlines():
        job_id, _, rest = line.partition("|")
        state, _, stdout = rest.partition("|")
        if stdout.strip().startswith(prefix) and state.strip() not in TERMINAL_STATES:
            jobs[job_id.strip()] = (state.strip(), stdout.strip()[len(prefix) :])
    return jobs


def sacct_state(job_id: str) -> str | None:
    """The job's final state word from sacct (`CANCELLED by 1000` -> `CANCELLED`), or None."""
    if not shutil.which("sacct"):
        return None
    try:
        out = subprocess.run(
            ["sacct", "-n", "-X", "-P", "-o", "State", "-j", job_id],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return parse_sacct_state(out)


def scancel(job_ids: list[str]) -> None:
    if job_ids:
        subprocess.run(["scancel", *job_ids], check=False, timeout=60)


def finish_command(run: RunDir, module: str = "hvbatch.batch.executors.slurm") -> str:
    """The job script's line after srun: record the attempt's end, retry or give up."""
    python = shlex.quote(sys.executable)
    return f'{python} -m {module} finish {shlex.quote(str(run.root))} $? "${{HVBATCH_LOG_OFFSET:-0}}"'


class SlurmQueue:
    """squeue / sacct / scancel, shared by the submitit and the plain sbatch executors."""

    kind = "slurm"

    run: RunDir

    def live(self, records: list[JobRecord]) -> dict[str, str]:
        return squeue_states([record.job_id for record in records])

    def find_jobs(self) -> list[FoundJob]:
        """Jobs logging under the run: in submitit/ submitit's, in logs/ plain sbatch jobs'."""
        jobs = squeue_jobs_writing_under(self.run.root)
        return [
            FoundJob(job_id, "slurm" if where.startswith("submitit/") else "sbatch", state)
            for job_id, (state, where) in jobs.items()
        ]

    def cancel(self, records: list[JobRecord]) -> None:
        scancel(sorted({record.job_id for record in records}))

    def final_state(self, job_id: str) -> str | None:
        return sacct_state(job_id)


class SlurmExecutor(SlurmQueue, Executor):
    kind = "slurm"
    one_shard_per_job = True  # one array element per shard

    def make_submitit(self, delay_s: float = 0.0) -> submitit.AutoExecutor:
        s, retry = self.config.slurm, self.config.retry
        executor = submitit.AutoExecutor(
            folder=self.run.root / "submitit" / "%j",
            cluster="slurm",
            slurm_max_num_timeout=retry.max_walltime_requeues,
        )
        additional: dict[str, Any] = {"requeue": True}  # node failures come back as the same job
        if delay_s > 0:
            additional["begin"] = f"now+{int(delay_s)}"
        additional.update(s.additional_parameters or {})
        params: dict[str, Any] = {
            "name": f"hvbatch-{self.run.root.name}",
            "timeout_min": math.ceil(s.time_min),
            "nodes": s.nodes,
            "tasks_per_node": s.tasks_per_node,
            "gpus_per_node": s.gpus_per_node,
            "slurm_array_parallelism": s.array_parallelism,
            "slurm_srun_args": ["--kill-on-bad-exit=1"],
            "slurm_signal_delay_s": int(retry.signal_delay_s),
            "slurm_additional_parameters": additional,
            # Must stay the first teardown line: it reads srun's exit status from $?.
            "slurm_teardown": [finish_command(self.run)],
            "slurm_setup": [*s.setup, LOG_OFFSET_LINE],
        }
        for key in ("partition", "account", "qos", "constraint"):
            if getattr(s, key):
                params[f"slurm_{key}"] = getattr(s, key)
        mem_gb = slurm_mem_gb(self.config)  # slurm.mem_gb, or the memory model's host memory per node
        if mem_gb:
            params["mem_gb"] = mem_gb
        if s.cpus_per_task:
            params["cpus_per_task"] = s.cpus_per_task
        executor.update_parameters(**params)
        return executor

    def submit(self, shards: list[int], *, delay_s: float = 0.0, manual: bool = True) -> list[JobRecord]:
        executor = self.make_submitit(delay_s)
        s = self.config.slurm
        limit = max(1, s.max_array_size or cluster_max_array_size())
        job_fn = SlurmShardJob(s.time_min, self.config.retry.signal_delay_s)
        records: list[JobRecord] = []
        for start in range(0, len(shards), limit):
            chunk = shards[start : start + limit]
            with submission_environment():  # sbatch exports this environment: no stale RANK or MASTER_*
                jobs = executor.map_array(job_fn, [str(self.run.root)] * len(chunk), [[s] for s in chunk])
            records += [
                JobRecord(shard, str(job.job_id), self.kind) for shard, job in zip(chunk, jobs, strict=True)
            ]
        record_submission(self.run, records, self.kind, manual=manual, delay_s=delay_s)
        return records


@dataclass
class SlurmShardJob:
    """What submitit runs on every rank of a Slurm job."""

    time_min: float
    signal_delay_s: float
    active: tuple[RunDir, int, AttemptKey] | None = None

    def __call__(self, run_dir: str, shards: list[int]) -> list[dict[str, Any]]:
        from hvbatch.batch.runtime.job import run_shards_job
        from hvbatch.parallel.launch import export_submitit_environment

        log_to_stderr()  # hvbatch's own lines (phases, layout, videos) in the job's log
        if os.environ.get("SLURM_PROCID", "0") == "0":  # said before the seconds of torch's import
            key = AttemptKey.slurm(job_id_from_environment(), int(os.environ.get("SLURM_RESTART_COUNT", "0")))
            what = f"{os.environ.get('SLURM_NTASKS', '?')} ranks started; importing torch and the model code"
            logger.info("%s: %s", key, what)
            ledger.record_phase(RunDir(run_dir), key, what)
        export_submitit_environment()  # RANK and MASTER_*; CUDA_VISIBLE_DEVICES left as Slurm set it
        with task_exits_cleanly():
            return run_shards_job(run_dir, shards, RunProbe(RunDir(run_dir)), on_shard=self._set_active)

    def _set_active(self, run: RunDir, shard: int, key: AttemptKey) -> None:
        self.active = (run, shard, key)

    def record_interruption(self) -> None:
        if self.active is not None:
            from hvbatch.batch.runtime.support import PROCESS_START

            run, shard, key = self.active
            reason = interruption_reason(time.time() - PROCESS_START, self.time_min, self.signal_delay_s)
            ledger.interrupt(run, [shard], key, reason, "USR2: checkpointed and requeued")

    def checkpoint(self, run_dir: str, shards: list[int]) -> Any:
        self.record_interruption()
        return submitit.helpers.DelayedSubmission(
            SlurmShardJob(self.time_min, self.signal_delay_s), run_dir, shards
        )


def job_id_from_environment() -> str:
    env = os.environ
    if "SLURM_ARRAY_JOB_ID" in env:
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env["SLURM_JOB_ID"]


def srun_outcome(exit_code: int, log_offset: int) -> tuple[int, str | None]:
    """(exit code, scheduler state) of this attempt's srun: srun's own status is that of the last
    task it stopped, while its log, past `log_offset`, names the first task to fail."""
    if not exit_code:
        return exit_code, None
    try:
        with Path(f"/proc/{os.getpid()}/fd/2").open("rb") as handle:
            handle.seek(log_offset)
            first = parse_srun_failure(handle.read(1 << 20).decode("utf-8", "replace"))
    except OSError:
        first = None
    if first == "oom":
        return exit_code, "OUT_OF_MEMORY"
    return (first if isinstance(first, int) else exit_code), None


@contextlib.contextmanager
def submission_environment() -> Iterator[None]:
    """Hide Slurm/submitit/torch variables from a job about to be submitted (SLURM_CONF stays): a
    login shell's MASTER_ADDR or a finished job's SLURM_* must not reach the new job."""
    names = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
    hidden = {
        name: os.environ.pop(name)
        for name in list(os.environ)
        if name != "SLURM_CONF"
        and (name.startswith(("SLURM_", "SLURMD_", "SRUN_", "SBATCH_", "SUBMITIT_")) or name in names)
    }
    try:
        yield
    finally:
        os.environ.update(hidden)


def finish_after_srun(run_dir: str, exit_code: int, log_offset: int) -> dict[int, ledger.ShardFate]:
    """The submitit job script's last step: record how the attempt ended, resubmit or give up."""
    run = RunDir(run_dir)
    config = load_config(run.root / "config.yaml")
    job_id = job_id_from_environment()
    key = AttemptKey.slurm(job_id, int(os.environ.get("SLURM_RESTART_COUNT", "0")))
    exit_code, state = srun_outcome(exit_code, log_offset)
    shards = shards_of_job(run, job_id)

    def resubmit(todo: list[int], delay_s: float) -> None:
        with submission_lock(run):
            sized = resubmission_config(config, run, todo)[0]  # walltime from the run's finished videos
            SlurmExecutor(run, sized).submit(todo, delay_s=delay_s, manual=False)

    return ledger.finish(run, config.retry, shards, key, exit_code, scheduler_state=state, resubmit=resubmit)


def shards_of_job(run: RunDir, job_id: str, wait_s: float = 60.0) -> list[int]:
    deadline = time.time() + wait_s
    while True:
        shards = [
            int(record["shard"])
            for submission in run.submissions()
            for record in submission["jobs"]
            if record["job_id"] == job_id
        ]
        if shards or time.time() > deadline:
            return shards
        time.sleep(1.0)  # the submitting process records the job ids just after sbatch returns


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    log_to_stderr()
    if len(args) == 4 and args[0] == "finish":
        fates = finish_after_srun(args[1], int(args[2]), int(args[3] or 0))
        print(f"hvbatch: attempt finished: {ledger.dumps_fates(fates)}", flush=True)
        return 0
    print("usage: python -m hvbatch.batch.executors.slurm finish RUN_DIR STATUS LOG_OFFSET", file=sys.stderr)
    return 2


if __name__ == "__main__":
    from hvbatch.process import run_then_exit

    run_then_exit(main)
