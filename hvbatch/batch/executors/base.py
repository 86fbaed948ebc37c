"""The one interface every executor adapts: submit shards, say which jobs are alive, cancel them.

    Executor.submit(shards, delay_s, manual)   one job per shard (local: one job for them all)
    Executor.live(records)                     job id -> scheduler state, for jobs still alive
    Executor.cancel(records)                   stop those jobs
    Executor.find_jobs()                       the run's jobs the scheduler knows, records or not
    Executor.is_alive / final_state            what `hvbatch.batch.ledger.reconcile` asks

Inside a job the same adapters know how to run the ranks and how to come back after a failure
(`resubmit` with a delay): the local supervisor retries in-process, submitit's Slurm jobs submit a
new job that begins after the backoff, plain sbatch jobs requeue themselves with a later start time.
Every submission is recorded in `jobs/submission-NNNN.json`, which status, retry and cancel read.

A scheduler that cannot answer (`squeue` fails) raises `SchedulerUnavailable`: a job whose state is
unknown is never taken for gone, so nothing is submitted twice on a guess.
"""

from __future__ import annotations

import abc
import contextlib
import enum
import fcntl
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

from hvbatch.batch.rundir import RunDir
from hvbatch.config import Config, load_config

JOB_LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s: %(message)s"


def log_to_stderr() -> None:
    """hvbatch's INFO lines on stderr, the job's log (a no-op where logging is already set up)."""
    logging.basicConfig(level=logging.INFO, format=JOB_LOG_FORMAT)
    logging.getLogger("hvbatch").setLevel(logging.INFO)


LIVE_STATES = frozenset(
    {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "RESIZING", "SUSPENDED"}
)
# Ended, but the job's processes may still run (Slurm kills them, then runs the epilog).
ENDING_STATES = frozenset({"COMPLETING", "SIGNALING", "STAGE_OUT"})
# Ended for good: a job squeue still lists in one of these (until MinJobAge) is gone.
TERMINAL_STATES = frozenset(
    {"BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY",
     "PREEMPTED", "REVOKED", "TIMEOUT"}
)  # fmt: skip


class JobPhase(enum.IntEnum):
    """Where a job is in its life, for deciding whether its shard may be submitted again."""

    GONE = 0  # not in the queue, or listed in a terminal state
    ENDING = 1  # ended, its processes may still be running (COMPLETING)
    ALIVE = 2  # queued or running

    @classmethod
    def of(cls, state: str | None) -> JobPhase:
        if state is None or state in TERMINAL_STATES:
            return cls.GONE
        return cls.ENDING if state in ENDING_STATES else cls.ALIVE  # an unknown word: alive


class SchedulerUnavailable(RuntimeError):
    """The scheduler could not say which jobs are alive."""


@dataclass(frozen=True)
class JobRecord:
    """One shard's job in a submission record."""

    shard: int
    job_id: str
    executor: str
    identity: str | None = None  # local jobs: the controller's `pid:start time` (pids are reused)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"shard": self.shard, "job_id": self.job_id, "executor": self.executor}
        if self.identity is not None:
            data["identity"] = self.identity
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobRecord:
        return cls(int(data["shard"]), str(data["job_id"]), str(data["executor"]), data.get("identity"))


@dataclass(frozen=True)
class FoundJob:
    """A job of the run that the scheduler knows, found without the submission records."""

    job_id: str
    executor: str
    state: str
    identity: str | None = None

    def record(self, shard: int) -> JobRecord:
        return JobRecord(shard, self.job_id, self.executor, self.identity)


def record_submission(
    run: RunDir, records: list[JobRecord], executor: str, *, manual: bool, delay_s: float = 0.0,
    kind: str | None = None,
) -> None:  # fmt: skip
    """`manual` submissions (submit, retry, a plain sbatch job's first start) give the shards a
    fresh budget of attempts; automatic resubmissions after a failure count against it. `kind`
    `recovered` re-records jobs found in the queue whose record was lost (no new budget)."""
    run.add_submission(
        {
            "submitted_at": time.time(),
            "executor": executor,
            "jobs": [record.to_dict() for record in records],
            "kind": kind or ("manual" if manual else "auto"),
            "delay_s": delay_s,
        }
    )


def latest_records(run: RunDir) -> dict[int, JobRecord]:
    """The most recent job of each shard."""
    latest: dict[int, JobRecord] = {}
    for submission in run.submissions():
        for data in submission["jobs"]:
            record = JobRecord.from_dict(data)
            latest[record.shard] = record
    return latest


@contextlib.contextmanager
def submission_lock(run: RunDir) -> Iterator[None]:
    """Held while deciding what to submit and submitting it: two `retry`s at once, or a retry and
    a job resubmitting itself, never both submit the same shard."""
    folder = run.root / "jobs"
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / ".lock", os.O_CREAT | os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


EXECUTOR_CLASSES: dict[str, type[Executor]] = {}


class Executor(abc.ABC):
    kind: ClassVar[str]
    one_shard_per_job: ClassVar[bool] = False
    """Each job runs one shard (a submitit array element): a job found in the queue is then
    placed by the shard its metrics row names; otherwise it may be running any shard."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "kind" in cls.__dict__:
            EXECUTOR_CLASSES[cls.kind] = cls

    def __init__(self, run: RunDir, config: Config) -> None:
        self.run, self.config = run, config

    @abc.abstractmethod
    def submit(self, shards: list[int], *, delay_s: float = 0.0, manual: bool = True) -> list[JobRecord]:
        """Submit the shards' jobs and record them."""

    @abc.abstractmethod
    def live(self, records: list[JobRecord]) -> dict[str, str]:
        """Scheduler state of each job still queued or running; raises SchedulerUnavailable."""

    @abc.abstractmethod
    def cancel(self, records: list[JobRecord]) -> None:
        """Stop these jobs (their attempts are recorded `cancelled` first, by the caller)."""

    def find_jobs(self) -> list[FoundJob]:
        """The run's jobs that the scheduler still lists (not in a terminal state), whether or not
        a submission record names them; raises SchedulerUnavailable."""
        return []

    def is_alive(self, job_id: str) -> bool | None:
        try:
            return job_id in self.live([JobRecord(-1, job_id, self.kind)])
        except SchedulerUnavailable:
            return None

    def final_state(self, job_id: str) -> str | None:
        return None


class RunProbe:
    """`ledger.JobProbe` for a run's jobs, whichever executor each was submitted with.

    A job of an executor this process has not loaded, or one missing from the run's records, is
    "unknown" (None): it is never taken for gone.
    """

    def __init__(self, run: RunDir, config: Config | None = None) -> None:
        self.run, self.config = run, config
        self._alive: dict[str, bool | None] = {}
        self.kinds = {
            str(data["job_id"]): str(data["executor"])
            for submission in run.submissions()
            for data in submission["jobs"]
        }

    def _executor(self, job_id: str) -> Executor | None:
        cls = EXECUTOR_CLASSES.get(self.kinds.get(job_id, ""))
        if cls is None:
            return None
        config = self.config if self.config is not None else load_config(self.run.root / "config.yaml")
        return cls(self.run, config)

    def is_alive(self, job_id: str) -> bool | None:
        if job_id not in self._alive:  # many shards share one job: ask once
            executor = self._executor(job_id)
            self._alive[job_id] = executor.is_alive(job_id) if executor is not None else None
        return self._alive[job_id]

    def final_state(self, job_id: str) -> str | None:
        executor = self._executor(job_id)
        return executor.final_state(job_id) if executor is not None else None
