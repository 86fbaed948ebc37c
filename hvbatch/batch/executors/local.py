"""Shard jobs on this machine: submitit's local executor runs one supervisor task for the run.

`LocalShardJob` (the supervisor) starts one process per rank, ends the whole attempt as soon as
one rank fails (like srun --kill-on-bad-exit), records why, and starts the next attempt after the
backoff while attempts are left. It gives each shard `slurm.time_min` of its own: a shard still
running at `time_min - retry.signal_delay_s` is recorded as `walltime` and resumed by a new
attempt, so the limit is per shard, not one shard's walltime for the whole run. Ctrl-C, SIGTERM or
the controller's death stop it and its ranks (PDEATHSIG all the way down), recorded `cancelled`.

A local job is its controller process, known by pid and start time (pids are reused), so
`cancel` never signals a process that is not the run's own job.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import submitit

from hvbatch.batch import ledger
from hvbatch.batch.attempt import EXIT_DISK_FULL, AttemptKey, ExitReason, ShardFate
from hvbatch.batch.executors.base import (
    Executor,
    FoundJob,
    JobRecord,
    RunProbe,
    log_to_stderr,
    record_submission,
)
from hvbatch.batch.files import is_disk_full, read_parquet, write_json_exclusive
from hvbatch.batch.rundir import RunDir
from hvbatch.config import Config, RetryConfig, load_config
from hvbatch.parallel import ports
from hvbatch.process import task_exits_cleanly

logger = logging.getLogger(__name__)
POLL_S = 0.2
RANK_KEY_VAR = "HVBATCH_ATTEMPT_KEY"
T = TypeVar("T")


def die_with_parent() -> None:
    """This process gets SIGKILL when its parent dies, so nothing outlives the job's controller."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _rank_preexec() -> None:
    """A rank dies with its supervisor and leaves Ctrl-C to it (Python keeps an ignored SIGINT)."""
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def process_identity(pid: int) -> str | None:
    """`pid:start time` of a live process (start in clock ticks since boot), or None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if fields[0] in ("Z", "X"):  # a zombie has exited
        return None
    return f"{pid}:{fields[19]}"


def _is_controller_of(pid: int, folder: Path) -> bool:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    if b"submitit.local._local" not in argv[:-1]:
        return False
    controlled = argv[argv.index(b"submitit.local._local") + 1]
    return controlled.startswith(f"{folder}/".encode())


def _children(pid: int) -> list[int]:
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return children


def kill_process_tree(pid: int) -> None:
    """SIGKILL a process and every process below it."""
    tree, frontier = [pid], [pid]
    while frontier:
        frontier = [child for parent in frontier for child in _children(parent)]
        tree += frontier
    for member in reversed(tree):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(member, signal.SIGKILL)


@contextlib.contextmanager
def _controller_detached_from_terminal() -> Iterator[None]:
    """submitit's controller inherits file descriptors 0-2 and outlives `submit`: it would hold
    the caller's pipe open (`out=$(hvbatch submit ...)`, `| tee log` would wait for the whole run).
    It writes its tasks' output to the run's log files, so it gets /dev/null instead; the swap lasts
    only while the controller is started."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    saved = [os.dup(fd) for fd in (0, 1, 2)]
    null = os.open(os.devnull, os.O_RDWR)
    try:
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        yield
    finally:
        for fd, copy in zip((0, 1, 2), saved, strict=True):
            os.dup2(copy, fd)
            os.close(copy)
        os.close(null)


@contextlib.contextmanager
def _controller_ignores_ctrl_c() -> Iterator[None]:
    """submitit's controller inherits an ignored SIGINT: Ctrl-C then reaches the supervisor, which
    records `cancelled` and stops its ranks, and not the controller, which would print a traceback."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


class LocalExecutor(Executor):
    kind = "local"

    def submit(self, shards: list[int], *, delay_s: float = 0.0, manual: bool = True) -> list[JobRecord]:
        s, retry = self.config.slurm, self.config.retry
        local = submitit.LocalExecutor(folder=self.run.root / "submitit" / "%j", max_num_timeout=0)
        gpus = self.config.slurm.gpus_per_node if _local_gpus(self.config) else 0
        # The supervisor enforces each shard's time itself; submitit's limit only bounds the run.
        budget_min = s.time_min * len(shards) * (retry.max_attempts + retry.max_walltime_requeues + 1)
        local.update_parameters(
            timeout_min=budget_min + delay_s / 60.0, tasks_per_node=1, nodes=1, gpus_per_node=gpus
        )
        job_fn = LocalShardJob(s.tasks_per_node, s.time_min, retry.signal_delay_s, delay_s)
        with _controller_ignores_ctrl_c(), _controller_detached_from_terminal():
            job = local.submit(job_fn, str(self.run.root), shards)
        identity = process_identity(int(job.job_id))
        records = [JobRecord(shard, str(job.job_id), self.kind, identity) for shard in shards]
        record_submission(self.run, records, self.kind, manual=manual, delay_s=delay_s)
        return records

    def live(self, records: list[JobRecord]) -> dict[str, str]:
        states = {}
        for record in records:
            current = process_identity(int(record.job_id)) if record.job_id.isdigit() else None
            if current is not None and current == record.identity:
                states[record.job_id] = "RUNNING"
        return states

    def cancel(self, records: list[JobRecord]) -> None:
        for record in records:
            if record.job_id in self.live([record]):  # only the run's own job, never a reused pid
                kill_process_tree(int(record.job_id))

    def find_jobs(self) -> list[FoundJob]:
        """Controllers whose command line is submitit's local controller for this run's folder
        (`submitit/<pid>/` names each one this run started)."""
        folder = self.run.root / "submitit"
        found = []
        for entry in folder.iterdir() if folder.is_dir() else []:
            if entry.name.isdigit() and _is_controller_of(int(entry.name), folder):
                identity = process_identity(int(entry.name))
                if identity is not None:
                    found.append(FoundJob(entry.name, self.kind, "RUNNING", identity))
        return found

    def is_alive(self, job_id: str) -> bool | None:
        records = [
            JobRecord.from_dict(data)
            for submission in self.run.submissions()
            for data in submission["jobs"]
            if str(data["job_id"]) == job_id and data["executor"] == self.kind
        ]
        return bool(records) and job_id in self.live(records[-1:])


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _local_gpus(config: Config) -> bool:
    return config.device != "cpu" and _has_cuda()


class _Interrupted(Exception):
    pass


@dataclass
class LocalShardJob:
    """The supervisor: one submitit task that runs every attempt of the run's shards."""

    nproc: int
    time_min: float
    signal_delay_s: float
    delay_s: float = 0.0
    ranks: list[subprocess.Popen[bytes]] = field(default_factory=list, repr=False)
    key: AttemptKey | None = None
    run_dir: str | None = None
    shards: list[int] = field(default_factory=list)

    def __call__(self, run_dir: str, shards: list[int]) -> dict[str, Any]:
        with task_exits_cleanly():
            return self._supervise(run_dir, shards)

    def _supervise(self, run_dir: str, shards: list[int]) -> dict[str, Any]:
        die_with_parent()
        log_to_stderr()
        self.run_dir, self.shards = run_dir, shards
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self._on_stop_signal)
        run = RunDir(run_dir)
        with contextlib.suppress(OSError):  # submitit's controller makes its folder pattern, unreplaced
            (run.root / "submitit" / "%j").rmdir()
        retry = load_config(run.root / "config.yaml").retry
        job_id = os.environ.get("SUBMITIT_LOCAL_JOB_ID", str(os.getpid()))
        time.sleep(self.delay_s)
        fates: dict[int, ShardFate] = {}
        while True:
            todo = [s for s in shards if s not in run.completed_shards()]
            if not todo:
                return {"shards": shards, "fates": ledger.dumps_fates(fates)}
            self.key = _persist(
                retry, "claim an attempt key", functools.partial(_claim_attempt_key, run, job_id)
            )
            status, cause = self._attempt(run, todo)
            finish = functools.partial(ledger.finish, run, retry, todo, self.key, status, cause=cause)
            fates = _persist(retry, f"record attempt {self.key}", finish)
            if any(fate == ShardFate.REQUEUED for fate in fates.values()):
                continue  # a shard ran out of time: resume it at once
            waiting = [s for s, fate in fates.items() if fate == ShardFate.RETRY]
            if not waiting:
                return {"shards": shards, "fates": ledger.dumps_fates(fates)}
            delay = ledger.retry_delay(run, retry, waiting)
            logger.warning("attempt %s failed; retrying shards %s in %.0f s", self.key, waiting, delay)
            time.sleep(delay)

    def _attempt(self, run: RunDir, shards: list[int]) -> tuple[int | None, tuple[ExitReason, str] | None]:
        """Run one attempt: (the first failing rank's status, None), or (None, the supervisor's own
        reason) when it could not find a rendezvous port or failed itself (the ranks are stopped)."""
        try:
            port = ports.free_local_port()
        except OSError as err:
            logger.error("attempt %s: no free port for the ranks' rendezvous: %s", self.key, err)
            return None, (ExitReason.PORT_FAILED, f"the supervisor found no free rendezvous port: {err}")
        try:
            return self._run_attempt(run, shards, port), None
        except Exception as err:
            logger.exception("attempt %s: the supervisor failed", self.key)
            with contextlib.suppress(Exception):
                self._kill_ranks()
            return None, (ExitReason.SUPERVISOR_ERROR, f"the supervisor failed: {type(err).__name__}: {err}")

    def _start_ranks(self, run: RunDir, shards: list[int], port: int) -> None:
        self.ranks = []
        for rank in range(self.nproc):
            env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(self.nproc), LOCAL_RANK=str(rank))
            env |= {"LOCAL_WORLD_SIZE": str(self.nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
            env[RANK_KEY_VAR] = str(self.key)
            command = [
                sys.executable,
                "-m",
                "hvbatch.batch.executors.local",
                "rank",
                str(run.root),
                json.dumps(shards),
            ]
            self.ranks.append(subprocess.Popen(command, env=env, preexec_fn=_rank_preexec))

    def _run_attempt(self, run: RunDir, shards: list[int], port: int) -> int:
        """Start the ranks; return the first failing rank's status (0 when all succeed)."""
        assert self.key is not None
        what = f"starting {self.nproc} ranks on this machine (each imports torch and loads the model)"
        logger.info("%s: %s", self.key, what)
        ledger.record_phase(run, self.key, what)
        self._start_ranks(run, shards, port)
        deadline = ShardDeadline(run, shards, self.key, self.time_min * 60.0 - self.signal_delay_s)
        while all(p.poll() in (None, 0) for p in self.ranks) and any(p.poll() is None for p in self.ranks):
            time.sleep(POLL_S)
            if deadline.passed():
                break
        time.sleep(POLL_S)  # ranks that die together (a kill and its peers' errors) are all seen
        codes = [p.poll() for p in self.ranks]
        self._kill_ranks()
        # A rank killed by a signal is the cause; its peers only saw the connection drop.
        signalled = [code for code in codes if code is not None and code < 0]
        failed = signalled or [code for code in codes if code]
        return (128 - failed[0] if failed[0] < 0 else failed[0]) if failed else 0

    def _kill_ranks(self) -> None:
        for process in self.ranks:
            if process.poll() is None:
                process.kill()
        for process in self.ranks:
            process.wait()

    def _on_stop_signal(self, signum: int, frame: object) -> None:
        if self.key is not None and self.run_dir is not None:
            detail = f"stopped by {signal.Signals(signum).name} (Ctrl-C or hvbatch cancel)"
            ledger.interrupt(RunDir(self.run_dir), self.shards, self.key, ExitReason.CANCELLED, detail)
        self._kill_ranks()
        os._exit(128 + signum)

    def checkpoint(self, run_dir: str, shards: list[int]) -> Any:
        """USR2 at the end of submitit's budget for the whole run: record it, stop, let submitit requeue."""
        if self.key is not None:
            ledger.interrupt(
                RunDir(run_dir), shards, self.key, ExitReason.WALLTIME, "USR2: checkpointed and requeued"
            )
        self._kill_ranks()
        fresh = LocalShardJob(self.nproc, self.time_min, self.signal_delay_s)
        return submitit.helpers.DelayedSubmission(fresh, run_dir, shards)

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "ranks"} | {"ranks": []}


@dataclass
class ShardDeadline:
    """The running shard's own walltime: when it passes, the shard's attempt ends as `walltime`."""

    run: RunDir
    shards: list[int]
    key: AttemptKey | None
    limit_s: float
    checked: float = 0.0

    def passed(self) -> bool:
        now = time.time()
        if self.key is None or now - self.checked < 1.0:
            return False
        self.checked = now
        for shard in self.shards:
            path = self.run.metrics_part(shard, str(self.key))
            if not path.is_file():
                continue
            with contextlib.suppress(ValueError, OSError):  # being replaced right now: next poll
                row = read_parquet(path, columns=["exit_reason", "started_at"]).to_pylist()[0]
                if row["exit_reason"] == ExitReason.RUNNING and now - row["started_at"] > self.limit_s:
                    detail = (
                        f"the shard ran past slurm.time_min minus retry.signal_delay_s ({self.limit_s:.0f} s)"
                    )
                    ledger.interrupt(self.run, [shard], self.key, ExitReason.WALLTIME, detail)
                    return True
        return False


def _persist(retry: RetryConfig, what: str, write: Callable[[], T]) -> T:
    """`write()`, tried again after the backoff while it fails with an OSError (a full disk): up
    to `retry.max_attempts` times, so the supervisor says why and does not die on the first try."""
    tries = max(1, retry.max_attempts)
    for number in range(1, tries + 1):
        try:
            return write()
        except OSError as err:
            if number == tries:
                logger.error("the supervisor could not %s after %d tries: %s; it stops", what, tries, err)
                raise
            delay = ledger.backoff_seconds(retry, number)
            logger.error("the supervisor could not %s (%s); trying again in %.0f s", what, err, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def _claim_attempt_key(run: RunDir, job_id: str) -> AttemptKey:
    number = 0
    while not write_json_exclusive(
        run.root / "attempts" / f"{AttemptKey.local(job_id, number)}.json",
        {"started_at": time.time(), "pid": os.getpid()},
    ):
        number += 1
    return AttemptKey.local(job_id, number)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    log_to_stderr()
    if len(args) == 3 and args[0] == "rank":
        from hvbatch.batch.runtime.job import run_shards_job

        try:
            run_shards_job(args[1], json.loads(args[2]), RunProbe(RunDir(args[1])))
        except Exception as err:
            if is_disk_full(err):  # logged by run_shards_job; its record may not have fit
                return EXIT_DISK_FULL
            raise
        return 0
    print("usage: python -m hvbatch.batch.executors.local rank RUN_DIR SHARDS_JSON", file=sys.stderr)
    return 2


if __name__ == "__main__":
    from hvbatch.process import run_then_exit

    run_then_exit(main)
