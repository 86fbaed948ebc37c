"""After an attempt: the local supervisor and the Slurm job script's last step.

Local executor: submitit runs one `LocalShardJob` task, which starts the ranks as child processes,
ends the whole attempt as soon as one rank fails (like srun --kill-on-bad-exit), records why, and
starts the next attempt after the backoff while attempts are left.

Slurm: submitit's job script runs `python -m hvbatch.batch.supervisor finish RUN_DIR $? OFFSET` after
srun (OFFSET: the size of the job's stderr before srun, where srun names the first task to fail). It
records the attempt's exit reason and resubmits the shard (a new job, `--begin` delayed by the
backoff) while attempts are left; otherwise the unfinished videos are marked failed for good.
Walltime and preemption are not handled here: USR2 makes submitit requeue the job itself.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hvbatch.batch.attempts import backoff_seconds, finish_attempt, set_exit_reason, shard_attempts
from hvbatch.batch.job_support import ATTEMPT_KEY_VAR, PROCESS_START, interruption_reason
from hvbatch.batch.rundir import RunDir, write_json_exclusive
from hvbatch.config import load_config
from hvbatch.parallel.launch import free_local_port

logger = logging.getLogger(__name__)
POLL_S = 0.2


def _die_with_parent() -> None:
    """Ranks get SIGKILL when their supervisor dies, so no rank outlives its attempt."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _shell_status(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


@dataclass
class LocalShardJob:
    nproc: int
    time_min: float
    signal_delay_s: float
    use_gpus: bool = False
    ranks: list[subprocess.Popen[bytes]] = field(default_factory=list, repr=False)
    attempt_key: str | None = None
    run_dir: str | None = None

    def __call__(self, run_dir: str, shards: list[int]) -> dict[str, Any]:
        self.run_dir = run_dir
        run = RunDir(run_dir)
        retry = load_config(run.root / "config.yaml").retry
        job_id = os.environ.get("SUBMITIT_LOCAL_JOB_ID", str(os.getpid()))
        fates: dict[int, str] = {}
        while True:
            todo = [s for s in shards if not run.done_marker(s).is_file()]
            if not todo:
                return {"shards": shards, "fates": fates}
            self.attempt_key = _claim_attempt_key(run, job_id)
            status = self._run_attempt(run_dir, todo)
            fates = finish_attempt(run, retry, todo, self.attempt_key, status)
            waiting = [s for s, fate in fates.items() if fate == "retry"]
            if not waiting:
                return {"shards": shards, "fates": fates}
            delay = max(backoff_seconds(retry, len(shard_attempts(run, s))) for s in waiting)
            logger.warning(
                "attempt %s failed; retrying shards %s in %.0f s", self.attempt_key, waiting, delay
            )
            time.sleep(delay)

    def _run_attempt(self, run_dir: str, shards: list[int]) -> int:
        """Start the ranks; return the first failing rank's status (0 when all succeed)."""
        port = free_local_port()
        self.ranks = []
        for rank in range(self.nproc):
            env = dict(
                os.environ,
                RANK=str(rank),
                WORLD_SIZE=str(self.nproc),
                LOCAL_RANK=str(rank),
                LOCAL_WORLD_SIZE=str(self.nproc),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port),
            )
            env[ATTEMPT_KEY_VAR] = self.attempt_key or ""
            if self.use_gpus:
                env["CUDA_VISIBLE_DEVICES"] = str(rank)
            command = [sys.executable, "-m", "hvbatch.batch.supervisor", "rank", run_dir, json.dumps(shards)]
            self.ranks.append(subprocess.Popen(command, env=env, preexec_fn=_die_with_parent))
        while all(p.poll() in (None, 0) for p in self.ranks) and any(p.poll() is None for p in self.ranks):
            time.sleep(POLL_S)
        time.sleep(POLL_S)  # ranks that die together (a kill and its peers' errors) are all seen
        codes = [p.poll() for p in self.ranks]
        self._kill_ranks()
        # A rank killed by a signal is the cause; its peers only saw the connection drop.
        signalled = [code for code in codes if code is not None and code < 0]
        failed = signalled or [code for code in codes if code]
        return _shell_status(failed[0]) if failed else 0

    def _kill_ranks(self) -> None:
        for process in self.ranks:
            if process.poll() is None:
                process.kill()
        for process in self.ranks:
            process.wait()

    def checkpoint(self, run_dir: str, shards: list[int]) -> Any:
        """USR2 from the local executor (walltime): record it, stop the ranks, let submitit requeue."""
        import submitit

        if self.attempt_key is not None:
            run = RunDir(run_dir)
            reason = interruption_reason(time.time() - PROCESS_START, self.time_min, self.signal_delay_s)
            for shard in shards:
                if run.metrics_part(shard, self.attempt_key).is_file():
                    set_exit_reason(run, shard, self.attempt_key, reason, "USR2: checkpointed and requeued")
        self._kill_ranks()
        fresh = LocalShardJob(self.nproc, self.time_min, self.signal_delay_s, self.use_gpus)
        return submitit.helpers.DelayedSubmission(fresh, run_dir, shards)

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "ranks"} | {"ranks": []}


def _claim_attempt_key(run: RunDir, job_id: str) -> str:
    number = 0
    while not write_json_exclusive(
        run.root / "attempts" / f"job{job_id}.a{number}.json", {"started_at": time.time(), "pid": os.getpid()}
    ):
        number += 1
    return f"job{job_id}.a{number}"


def finish_slurm_attempt(
    run_dir: str, exit_code: int, shards: list[int] | None = None, log_offset: int = 0
) -> dict[int, str]:
    """The Slurm job script's last step: record how the attempt ended, resubmit or give up.

    Jobs from submitit are found in the run's submission records and retried as new jobs; jobs
    from the plain sbatch templates name their `shards` and are retried by requeueing themselves.
    """
    from hvbatch.batch.launcher import resubmit_after_failure

    run = RunDir(run_dir)
    config = load_config(run.root / "config.yaml")
    env = os.environ
    job_id = (
        f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
        if "SLURM_ARRAY_JOB_ID" in env
        else env["SLURM_JOB_ID"]
    )
    attempt_key = f"job{job_id}.r{env.get('SLURM_RESTART_COUNT', '0')}"
    state = None
    if exit_code:
        # srun's status is that of the last task it stopped; its log names the first task to fail.
        first = first_failed_task(Path(f"/proc/{os.getpid()}/fd/2"), log_offset)
        if first == "oom":
            state = "OUT_OF_MEMORY"
        elif first is not None:
            exit_code = first

    def resubmit(todo: list[int], delay_s: float) -> None:
        if requeue_self:
            # Slurm holds a requeued job for a while before it starts again: that is the backoff.
            subprocess.run(["scontrol", "requeue", env["SLURM_JOB_ID"]], check=False, timeout=60)
        else:
            resubmit_after_failure(run, config, todo, delay_s)

    requeue_self = shards is not None
    shards = shards if shards is not None else _shards_of_job(run, job_id)

    return finish_attempt(
        run, config.retry, shards, attempt_key, exit_code, scheduler_state=state, resubmit=resubmit
    )


SRUN_TASK_FAILURE = re.compile(r"^srun: error: \S+: task \d+: (.+)$", re.M)
SRUN_SIGNAL_WORDS = {
    "Killed": signal.SIGKILL,
    "Aborted": signal.SIGABRT,
    "Segmentation fault": signal.SIGSEGV,
    "Bus error": signal.SIGBUS,
    "Terminated": signal.SIGTERM,
}


def first_failed_task(log: Path, offset: int) -> int | str | None:
    """How the first failing task of this attempt's srun ended, from srun's messages in the job's
    stderr after `offset`: a shell-style status (128 + signal, or the exit code), "oom", or None."""
    try:
        with log.open("rb") as handle:
            handle.seek(offset)
            text = handle.read(1 << 20).decode("utf-8", "replace")
    except OSError:
        return None
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


def _shards_of_job(run: RunDir, job_id: str, wait_s: float = 60.0) -> list[int]:
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
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    if len(args) == 3 and args[0] == "rank":
        from hvbatch.batch.job import run_shards_job

        run_shards_job(args[1], json.loads(args[2]))
        return 0
    if len(args) >= 4 and args[0] == "finish":
        # finish RUN_DIR STATUS LOG_OFFSET [SHARD ...]
        shards = [int(a) for a in args[4:]] or None
        fates = finish_slurm_attempt(args[1], int(args[2]), shards, int(args[3] or 0))
        print(f"hvbatch: attempt finished: {fates}", flush=True)
        return 0
    usage = "rank RUN_DIR SHARDS_JSON | finish RUN_DIR STATUS LOG_OFFSET [SHARD ...]"
    print(f"usage: python -m hvbatch.batch.supervisor {usage}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
