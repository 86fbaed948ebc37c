"""The values an attempt's life is told in: its key, how it ended, and what happens to its shards.

An attempt is one run of a shard job's ranks: a Slurm job (a requeue of the same job id is a new
attempt) or one round of the local supervisor. Its key names it in every file of the run
directory (`manifest/`, `metrics/`, `attempts/`): `job<job id>.r<Slurm restart count>` or
`job<job id>.a<local attempt number>`. `AttemptKey` is the only code that formats or parses it.

This module also reads the two texts Slurm reports failures in: `sacct` states and srun's
task-failure lines. It writes nothing; `hvbatch.batch.ledger` is the only writer.
"""

from __future__ import annotations

import enum
import re
import signal
from dataclasses import dataclass
from typing import Any


class ExitReason(str, enum.Enum):
    """How an attempt ended (the `exit_reason` of its metrics row)."""

    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    TIMEOUT = "timeout"
    CRASH = "crash"
    STALLED = "stalled"
    OOM = "oom"
    WALLTIME = "walltime"
    PREEMPTED = "preempted"
    CANCELLED = "cancelled"
    NODE_FAILURE = "node-failure"
    LOST = "lost"
    LOAD_FAILED = "load-failed"  # the model did not load
    PORT_FAILED = "port-failed"  # no rendezvous port could be found or bound
    SUPERVISOR_ERROR = "supervisor-error"  # the local supervisor's own code failed
    DISK_FULL = "disk-full"  # a write in the run directory found no space (ENOSPC, EDQUOT)

    def __str__(self) -> str:
        return self.value

    @property
    def charges_shard(self) -> bool:
        """Whether it uses one of the shard's `retry.max_attempts`."""
        return self not in (
            ExitReason.RUNNING,
            ExitReason.COMPLETED,
            ExitReason.WALLTIME,
            ExitReason.PREEMPTED,
            ExitReason.CANCELLED,
        )

    @property
    def outside_the_videos(self) -> bool:
        """A fault of the job's surroundings: it charges no video, and a shard that runs out of
        attempts for it stops without marking its videos failed."""
        return self in (
            ExitReason.LOAD_FAILED,
            ExitReason.PORT_FAILED,
            ExitReason.SUPERVISOR_ERROR,
            ExitReason.DISK_FULL,
        )

    @property
    def charges_videos(self) -> bool:
        """Whether the videos it interrupted count one attempt (not for reasons outside the videos)."""
        return self.charges_shard and not self.outside_the_videos


class RankErrorKind(str, enum.Enum):
    """What a rank reports about its own failure (`attempts/<key>.rank<N>.json`)."""

    TIMEOUT = "timeout"  # a collective timed out
    PEER_LOST = "peer-lost"  # a peer died, or its connection dropped
    STALLED = "stalled"  # this rank made no progress (the watchdog)
    OOM = "oom"
    FAILED = "failed"
    LOAD_FAILED = "load-failed"  # the model did not load on this rank
    PORT_FAILED = "port-failed"  # the rendezvous port was taken
    DISK_FULL = "disk-full"  # a write found no space

    def __str__(self) -> str:
        return self.value


class ShardFate(str, enum.Enum):
    """What happens to a shard after an attempt ends."""

    COMPLETE = "complete"
    RETRY = "retry"  # a new attempt after the backoff
    REQUEUED = "requeued"  # walltime or preemption: the executor requeues the same job
    GAVE_UP = "gave-up"  # attempts used up: its unfinished videos failed for good
    STOPPED = "stopped"  # attempts used up by faults outside the videos: none marked failed
    LEFT = "left"  # cancelled: only `hvbatch retry` brings it back

    def __str__(self) -> str:
        return self.value


class VideoStatus(str, enum.Enum):
    """The `status` of a manifest row."""

    STARTED = "started"  # replaced by done or failed when the video ends
    DONE = "done"
    FAILED = "failed"

    def __str__(self) -> str:
        return self.value


_KEY = re.compile(r"^job(?P<job_id>[^.\s]+)\.(?P<kind>[ra])(?P<number>\d+)$")


@dataclass(frozen=True)
class AttemptKey:
    """`job<job_id>.r<restart>` (Slurm) or `job<job_id>.a<number>` (local supervisor)."""

    job_id: str
    kind: str
    number: int

    def __post_init__(self) -> None:
        assert self.kind in ("r", "a") and self.number >= 0 and self.job_id, self

    @classmethod
    def slurm(cls, job_id: str, restart_count: int) -> AttemptKey:
        return cls(job_id, "r", restart_count)

    @classmethod
    def local(cls, job_id: str, number: int) -> AttemptKey:
        return cls(job_id, "a", number)

    @classmethod
    def parse(cls, text: str) -> AttemptKey:
        match = _KEY.match(text)
        if match is None:
            raise ValueError(f"{text!r} is not an attempt key (job<id>.r<N> or job<id>.a<N>)")
        return cls(match["job_id"], match["kind"], int(match["number"]))

    def __str__(self) -> str:
        return f"job{self.job_id}.{self.kind}{self.number}"


SACCT_REASONS = {
    "OUT_OF_MEMORY": ExitReason.OOM,
    "TIMEOUT": ExitReason.WALLTIME,
    "PREEMPTED": ExitReason.PREEMPTED,
    "CANCELLED": ExitReason.CANCELLED,
    "NODE_FAIL": ExitReason.NODE_FAILURE,
    "BOOT_FAIL": ExitReason.NODE_FAILURE,
    "DEADLINE": ExitReason.WALLTIME,
}


def parse_sacct_state(output: str) -> str | None:
    """The state word of `sacct -n -X -P -o State` output: `CANCELLED by 1000` -> `CANCELLED`."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    return lines[-1].split()[0].rstrip("+") if lines else None


SRUN_TASK_FAILURE = re.compile(r"^srun: error: \S+: tasks? [0-9,\-\[\]]+: (.+)$", re.M)
SRUN_SIGNAL_WORDS = {
    "Killed": signal.SIGKILL,
    "Aborted": signal.SIGABRT,
    "Segmentation fault": signal.SIGSEGV,
    "Bus error": signal.SIGBUS,
    "Terminated": signal.SIGTERM,
}


def parse_srun_failure(text: str) -> int | str | None:
    """How the first failing task ended, from srun's messages: a shell-style status (128 + signal,
    or the exit code), "oom", or None. Reads `task 1: Killed` and `tasks 0-3: Killed` alike."""
    match = SRUN_TASK_FAILURE.search(text)
    if match is None:
        return None
    what = match.group(1).strip()
    if what.startswith("Exited with exit code"):
        return int(what.rsplit(" ", 1)[1])
    if "Out Of Memory" in what:
        return "oom"
    number = SRUN_SIGNAL_WORDS.get(what)
    return 128 + int(number) if number is not None else None


EXIT_STALLED = 124
EXIT_DISK_FULL = 75
"""A rank's exit status after a write found no space (its error record may not fit either)."""

# What the ranks said wins over how the processes ended: a peer that timed out names the cause
# of a hang, while the hung rank only shows the SIGKILL that srun or the supervisor sent it. A
# rank that could not write, bind or load names the cause of its peers' timeouts.
_KIND_PRIORITY = (
    RankErrorKind.DISK_FULL,
    RankErrorKind.PORT_FAILED,
    RankErrorKind.LOAD_FAILED,
    RankErrorKind.TIMEOUT,
    RankErrorKind.STALLED,
    RankErrorKind.OOM,
    RankErrorKind.FAILED,
)


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def classify_exit(
    exit_code: int | None, errors: list[dict[str, Any]], scheduler_state: str | None = None
) -> tuple[ExitReason, str]:
    """(exit reason, detail) of an attempt from its exit code, rank errors and Slurm's state.

    `exit_code` is a shell-style status: 128 + N for death by signal N; negative means signal -N.
    """
    if scheduler_state in SACCT_REASONS:
        return SACCT_REASONS[scheduler_state], f"Slurm state {scheduler_state}"
    by_kind = {RankErrorKind(e["kind"]): e for e in errors}
    for kind in _KIND_PRIORITY:
        if kind in by_kind:
            error = by_kind[kind]
            return ExitReason(kind.value), f"rank {error['rank']}: {error['error']}"
    peer = by_kind.get(RankErrorKind.PEER_LOST)
    if exit_code is not None and (exit_code < 0 or exit_code > 128):
        number = -exit_code if exit_code < 0 else exit_code - 128
        return ExitReason.CRASH, f"killed by {signal_name(number)}"
    if exit_code == EXIT_STALLED:
        return ExitReason.STALLED, "no progress within retry.stall_timeout_s"
    if exit_code == EXIT_DISK_FULL:
        return ExitReason.DISK_FULL, "a write in the run directory found no space (see the job log)"
    if exit_code:
        detail = f"exit code {exit_code}" + (f"; rank {peer['rank']}: {peer['error']}" if peer else "")
        return ExitReason.CRASH, detail
    if peer is not None:
        return ExitReason.CRASH, f"rank {peer['rank']}: {peer['error']}"
    return ExitReason.LOST, "the attempt ended without a report"


def interruption_reason(elapsed_s: float, time_min: float, signal_delay_s: float) -> ExitReason:
    """USR2 near the walltime is the walltime warning; earlier it is preemption."""
    # Slurm may send the signal up to a minute before the requested lead time.
    if elapsed_s >= time_min * 60.0 - signal_delay_s - 90.0:
        return ExitReason.WALLTIME
    return ExitReason.PREEMPTED
