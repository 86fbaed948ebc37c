"""Job attempts: their exit reasons, how many a shard and a video have used, and what happens next.

An attempt is one run of a shard job's ranks: a Slurm job (a requeue starts a new attempt of the
same job id) or one round of the local supervisor. Rank 0 writes the attempt's metrics row with
`exit_reason="running"` when it starts a shard; whoever sees the attempt end (rank 0 itself, the
Slurm job script after srun, the local supervisor, or a later attempt that finds the row still
running) replaces the reason. Counting only looks at rows newer than the shard's last manual
submission (`submit` or `retry`), so `hvbatch retry` gives every shard and failed video a new budget.
"""

from __future__ import annotations

import json
import logging
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from hvbatch.batch.rundir import MANIFEST_SCHEMA, RunDir, write_json_atomic, write_parquet_atomic
from hvbatch.config import RetryConfig

logger = logging.getLogger(__name__)

RUNNING = "running"
COMPLETED = "completed"
# Attempts that ended for reasons outside the videos: their interrupted videos are not charged.
NOT_THE_VIDEOS_FAULT = frozenset({"walltime", "preempted", "cancelled", COMPLETED})
EXIT_STALLED = 124
SACCT_REASONS = {
    "OUT_OF_MEMORY": "oom",
    "TIMEOUT": "walltime",
    "PREEMPTED": "preempted",
    "CANCELLED": "cancelled",
    "NODE_FAIL": "node-failure",
    "BOOT_FAIL": "node-failure",
    "DEADLINE": "walltime",
}
COMMUNICATION_MARKERS = (
    "timed out",
    "timeout",
    "connection closed",
    "connection reset",
    "broken pipe",
    "nccl",
    "gloo",
)


def is_communication_error(err: BaseException) -> bool:
    """A failed or timed-out collective: the group is unusable and the attempt must end."""
    import torch.distributed as dist

    if isinstance(err, dist.DistError):
        return True
    return isinstance(err, RuntimeError) and any(m in str(err).lower() for m in COMMUNICATION_MARKERS)


def error_kind(err: BaseException) -> str:
    text = str(err).lower()
    if is_communication_error(err):
        return "timeout" if "timed out" in text or "timeout" in text else "peer-lost"
    if "out of memory" in text or type(err).__name__ == "OutOfMemoryError":
        return "oom"
    return "failed"


def record_rank_error(run: RunDir, attempt_key: str, rank: int, kind: str, message: str) -> None:
    write_json_atomic(
        run.rank_error_path(attempt_key, rank),
        {"rank": rank, "kind": kind, "error": message[:2000], "at": time.time()},
    )


def rank_errors(run: RunDir, attempt_key: str) -> list[dict[str, Any]]:
    folder = run.root / "attempts"
    if not folder.is_dir():
        return []
    return [json.loads(p.read_text()) for p in sorted(folder.glob(f"{attempt_key}.rank*.json"))]


# What the ranks said wins over how the processes ended: a peer that timed out names the cause
# of a hang, while the hung rank only shows the SIGKILL that srun or the supervisor sent it.
_KIND_PRIORITY = ("resync", "timeout", "stalled", "oom", "failed")


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def classify_exit(
    exit_code: int | None, errors: list[dict[str, Any]], scheduler_state: str | None = None
) -> tuple[str, str]:
    """(exit reason, detail) of an attempt from its exit code, rank errors and Slurm's state.

    `exit_code` is a shell-style status: 128 + N for death by signal N; negative means signal -N.
    """
    if scheduler_state in SACCT_REASONS:
        return SACCT_REASONS[scheduler_state], f"Slurm state {scheduler_state}"
    by_kind = {e["kind"]: e for e in errors}
    for kind in _KIND_PRIORITY:
        if kind in by_kind:
            error = by_kind[kind]
            reason = "failed" if kind == "resync" else kind
            return reason, f"rank {error['rank']}: {error['error']}"
    if exit_code is not None and (exit_code < 0 or exit_code > 128):
        number = -exit_code if exit_code < 0 else exit_code - 128
        if number == signal.SIGKILL and scheduler_state == "OUT_OF_MEMORY":
            return "oom", "killed by the out-of-memory killer"
        return "crash", f"killed by {signal_name(number)}"
    if exit_code == EXIT_STALLED:
        return "stalled", "no progress within retry.stall_timeout_s"
    if exit_code:
        peer = by_kind.get("peer-lost")
        detail = f"exit code {exit_code}" + (f"; rank {peer['rank']}: {peer['error']}" if peer else "")
        return "crash", detail
    if "peer-lost" in by_kind:
        return "crash", f"rank {by_kind['peer-lost']['rank']}: {by_kind['peer-lost']['error']}"
    return "lost", "the attempt ended without a report"


def slurm_final_state(job_id: str) -> str | None:
    """The job's sacct state (first word), or None without accounting."""
    if not shutil.which("sacct"):
        return None
    try:
        out = subprocess.run(
            ["sacct", "-n", "-X", "-P", "-o", "State", "-j", job_id],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return None
    return out[-1].split()[0] if out else None


def manual_reset_times(run: RunDir) -> dict[int, float]:
    """Per shard, when it was last submitted by hand (submit or retry); counting starts there."""
    resets: dict[int, float] = {}
    for submission in run.submissions():
        if submission.get("kind", "manual") == "manual":
            for record in submission["jobs"]:
                shard = int(record["shard"])
                resets[shard] = max(resets.get(shard, 0.0), float(submission["submitted_at"]))
    return resets


def manual_reset_time(run: RunDir, shard: int) -> float:
    return manual_reset_times(run).get(shard, 0.0)


def shard_attempts(run: RunDir, shard: int) -> list[dict[str, Any]]:
    """The shard's attempts (metrics rows) since its last manual submission, oldest first."""
    reset = manual_reset_time(run, shard)
    return [row for row in run.metrics_rows(shard) if (row.get("started_at") or 0.0) >= reset]


@dataclass
class VideoHistory:
    attempts: int = 0
    last_error: str | None = None
    done: bool = False
    final: bool = False


def video_histories(run: RunDir, shard: int, current_attempt_key: str | None) -> dict[str, VideoHistory]:
    """Per video of the shard: attempts used (since the last manual submission), last error, done."""
    reset = manual_reset_time(run, shard)
    reasons = {row["attempt_key"]: row["exit_reason"] for row in run.metrics_rows(shard)}
    histories: dict[str, VideoHistory] = {}
    rows = run.manifest_rows(shard).to_pylist()
    for row in sorted(rows, key=lambda r: r["finished_at"] or 0.0):
        history = histories.setdefault(row["video_id"], VideoHistory())
        if row["status"] == "done":
            history.done = True
            continue
        if (row["finished_at"] or 0.0) < reset or row["attempt_key"] == current_attempt_key:
            continue
        if row["status"] == "started":
            reason = reasons.get(row["attempt_key"], RUNNING)
            if reason in NOT_THE_VIDEOS_FAULT or reason == RUNNING:
                continue
            history.attempts += 1
            history.last_error = f"the job attempt ended during this video ({reason})"
        else:
            history.attempts += 1
            history.last_error = row["error"]
            history.final = history.final or bool(row["final"])
    return histories


def backoff_seconds(retry: RetryConfig, attempts_so_far: int) -> float:
    return min(retry.max_backoff_s, retry.backoff_s * 2 ** max(0, attempts_so_far - 1))


def set_exit_reason(run: RunDir, shard: int, attempt_key: str, reason: str, detail: str) -> None:
    """Replace a running attempt's reason (a reason already set is kept); create the row if missing."""
    path = run.metrics_part(shard, attempt_key)
    if path.is_file():
        row = pq.read_table(path).to_pylist()[0]
        if row["exit_reason"] != RUNNING:
            return
    else:
        row = {"shard": shard, "attempt_key": attempt_key, "job_id": attempt_key.split(".")[0][3:]}
        row["started_at"] = time.time()
    row.update(exit_reason=reason, exit_detail=detail, finished_at=time.time())
    write_parquet_atomic(path, pa.Table.from_pylist([row], schema=METRICS_SCHEMA))


METRICS_SCHEMA = pa.schema(
    [
        ("job_id", pa.string()),
        ("array_index", pa.int64()),
        ("attempt", pa.int64()),
        ("attempt_key", pa.string()),
        ("shard", pa.int64()),
        ("node", pa.string()),
        ("gpu_type", pa.string()),
        ("world_size", pa.int64()),
        ("dp", pa.int64()),
        ("ulysses", pa.int64()),
        ("ring", pa.int64()),
        ("load_seconds", pa.float64()),
        ("seconds_to_first_step", pa.float64()),
        ("prompt_seconds", pa.list_(pa.float64())),
        ("wall_seconds", pa.float64()),
        ("gpu_seconds", pa.float64()),
        ("peak_memory_bytes", pa.list_(pa.int64())),
        ("exit_reason", pa.string()),
        ("exit_detail", pa.string()),
        ("started_at", pa.float64()),
        ("finished_at", pa.float64()),
    ]
)


def mark_done_if_complete(run: RunDir, shard: int, job_id: str) -> bool:
    """Write the completion marker if every video has a done or final failed row."""
    videos = run.read_shard(shard)["video_id"].to_pylist()
    rows = run.manifest_rows(shard)
    done = set(rows.filter(pc.equal(rows["status"], "done"))["video_id"].to_pylist())
    final_failed = pc.and_(pc.equal(rows["status"], "failed"), pc.equal(rows["final"], True))
    current = pc.greater_equal(rows["finished_at"], manual_reset_time(run, shard))  # not before a retry
    final = set(rows.filter(pc.and_(final_failed, current))["video_id"].to_pylist()) - done
    if not set(videos) <= done | final:
        return False
    write_json_atomic(
        run.done_marker(shard),
        {
            "shard": shard,
            "videos": len(videos),
            "done": len(set(videos) & done),
            "failed": len(set(videos) & final),
            "job_id": job_id,
            "finished_at": time.time(),
        },
    )
    return True


def give_up(run: RunDir, shard: int, attempt_key: str, why: str) -> None:
    """Attempts used up: every video without a done or final row gets a final failed row."""
    histories = video_histories(run, shard, None)
    rows = []
    for video in run.read_shard(shard).to_pylist():
        history = histories.get(video["video_id"], VideoHistory())
        if history.done or history.final:
            continue
        row = {name: video.get(name) for name in MANIFEST_SCHEMA.names}
        error = why + (f"; last video error: {history.last_error}" if history.last_error else "")
        row.update(
            shard=shard,
            status="failed",
            final=True,
            attempt=history.attempts,
            error=error,
            job_id=attempt_key.split(".")[0][3:],
            attempt_key=attempt_key,
            finished_at=time.time(),
        )
        rows.append(row)
    if rows:
        path = run.root / "manifest" / f"{run.manifest_part(shard, attempt_key, 0).stem}.gave-up.parquet"
        write_parquet_atomic(path, pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA))
    mark_done_if_complete(run, shard, attempt_key)


def finish_attempt(
    run: RunDir,
    retry: RetryConfig,
    shards: list[int],
    attempt_key: str,
    exit_code: int | None,
    *,
    scheduler_state: str | None = None,
    resubmit: Callable[[list[int], float], None] | None = None,
) -> dict[int, str]:
    """Record how the attempt ended and decide each unfinished shard's fate: retry or give up.

    Returns {shard: "complete" | "retry" | "requeued" | "gave-up" | "left"}. With `resubmit`, the
    shards to retry are passed to it with the backoff delay; without it the caller retries them.
    """
    reason, detail = classify_exit(exit_code, rank_errors(run, attempt_key), scheduler_state)
    unfinished = [shard for shard in shards if not run.done_marker(shard).is_file()]
    fates: dict[int, str] = {shard: "complete" for shard in shards if shard not in unfinished}
    started = [shard for shard in unfinished if run.metrics_part(shard, attempt_key).is_file()]
    # A crash before any shard started (e.g. while loading) is charged to the first unfinished one.
    for shard in started or unfinished[:1]:
        set_exit_reason(run, shard, attempt_key, reason, detail)
    for shard in unfinished:
        attempts = shard_attempts(run, shard)
        last = attempts[-1]["exit_reason"] if attempts else reason
        if last in ("walltime", "preempted"):
            fates[shard] = "requeued"  # submitit requeues these itself
        elif last == "cancelled":
            fates[shard] = "left"
        elif len(attempts) >= retry.max_attempts:
            give_up(
                run, shard, attempt_key, f"gave up after {len(attempts)} attempts (last: {last}: {detail})"
            )
            fates[shard] = "gave-up"
        else:
            fates[shard] = "retry"
    retry_shards = [shard for shard, fate in fates.items() if fate == "retry"]
    if retry_shards and resubmit is not None:
        delay = max(backoff_seconds(retry, len(shard_attempts(run, s))) for s in retry_shards)
        resubmit(retry_shards, delay)
    logger.info("attempt %s ended: %s (%s); shards: %s", attempt_key, reason, detail, fates)
    return fates


def slurm_job_ids(run: RunDir) -> set[str]:
    return {
        str(record["job_id"])
        for submission in run.submissions()
        for record in submission["jobs"]
        if record.get("executor") == "slurm"
    }


def reconcile_stale_attempts(run: RunDir, shard: int, live_job_ids: set[str], current_key: str) -> None:
    """Attempts still `running` whose job is gone (node failure, scancel, SIGKILL of the script)."""
    slurm_ids: set[str] | None = None
    for row in run.metrics_rows(shard):
        if row["exit_reason"] != RUNNING or row["attempt_key"] == current_key:
            continue
        job_id = row["job_id"] or ""
        if job_id in live_job_ids and not current_key.startswith(f"job{job_id}."):
            continue
        slurm_ids = slurm_job_ids(run) if slurm_ids is None else slurm_ids
        state = slurm_final_state(job_id) if job_id in slurm_ids else None
        errors = rank_errors(run, row["attempt_key"])
        reason, detail = classify_exit(None, errors, state)
        set_exit_reason(run, shard, row["attempt_key"], reason, detail)


def mark_cancelled(run: RunDir, job_ids: set[str]) -> None:
    """`hvbatch cancel`: the running attempts of these jobs end as `cancelled`."""
    for row in run.metrics_rows():
        if row["exit_reason"] == RUNNING and str(row["job_id"]) in job_ids:
            set_exit_reason(run, int(row["shard"]), row["attempt_key"], "cancelled", "hvbatch cancel")
