"""The attempt ledger: the one module that writes an attempt's life into the run directory.

    begin      rank 0 writes the shard's metrics row with `exit_reason=running`
    end        whoever sees the attempt end replaces the reason (rank 0 on success, the local
               supervisor, the Slurm job script after srun, a USR2 handler, `hvbatch cancel`, or a
               later reader that finds the attempt's job gone); a reason once set is kept
    finish     after a failed attempt: record why, then retry each unfinished shard after a backoff
               or give up on it (its unfinished videos get a final failed row), or, when the
               last attempt failed for a reason outside the videos (load, port, supervisor,
               disk full), stop it with its videos left pending
    complete   the completion marker, written after the shard's last manifest row

Budgets count only what happened since the shard's last manual submission (`submit`, `retry`, a
plain `sbatch` job's first start), so a manual retry gives every shard and failed video a new
budget. Everything is read once per call through `LedgerView`, so no operation is quadratic in
the number of shards.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import pyarrow as pa
import pyarrow.compute as pc

from hvbatch.batch.attempt import (
    AttemptKey,
    ExitReason,
    RankErrorKind,
    ShardFate,
    VideoStatus,
    classify_exit,
)
from hvbatch.batch.files import is_disk_full, write_json_atomic, write_parquet_atomic
from hvbatch.batch.rundir import (
    MANIFEST_SCHEMA,
    METRICS_SCHEMA,
    RANK_ERROR_FIELDS,
    RunDir,
    json_object,
    read_marker,
    shard_name,
)
from hvbatch.batch.summaries import shard_index, write_metrics_summary, write_part_summary
from hvbatch.config import RetryConfig

logger = logging.getLogger(__name__)
CHARGING = tuple(reason for reason in ExitReason if reason.charges_shard)


class JobProbe(Protocol):
    """What an executor can say about one of its jobs."""

    def is_alive(self, job_id: str) -> bool | None:
        """Whether the job is still queued or running; None when the scheduler cannot say."""
        ...

    def final_state(self, job_id: str) -> str | None:
        """The scheduler's final state word of an ended job (sacct), or None."""
        ...


def record_rank_error(run: RunDir, key: AttemptKey, rank: int, kind: RankErrorKind, message: str) -> None:
    write_json_atomic(
        run.rank_error_path(str(key), rank),
        {"rank": rank, "kind": str(kind), "error": message[:2000], "at": time.time()},
    )


def rank_errors(run: RunDir, key: AttemptKey) -> list[dict[str, Any]]:
    folder = run.root / "attempts"
    if not folder.is_dir():
        return []
    paths = sorted(folder.glob(f"{key}.rank*.json"))
    return [
        json_object(p, run.read_json(p), RANK_ERROR_FIELDS, tuple(RANK_ERROR_FIELDS), "a rank's error")
        for p in paths
    ]


def record_phase(run: RunDir, key: AttemptKey, phase: str, starting: bool = True) -> None:
    """What the job's attempt is doing now, in words, for `--wait` while it starts up (`starting
    8 ranks`, `loading the model`; `starting=False` once it denoises). Best effort: a record that
    cannot be written is logged, never fatal (the next real write says why)."""
    payload = {"job_id": key.job_id, "attempt_key": str(key), "phase": phase, "at": time.time()}
    try:
        write_json_atomic(run.phase_path(key.job_id), payload | {"starting": starting})
    except OSError as err:
        logger.warning("could not record the attempt's phase (%s): %s", phase, err)


def job_phases(run: RunDir, job_ids: list[str]) -> list[dict[str, Any]]:
    """The phase records of these jobs (one file read each), the most recent first."""
    found = []
    for job_id in job_ids:
        with contextlib.suppress(OSError, ValueError):  # none yet, or half-read: the next poll sees it
            record = json.loads(run.phase_path(job_id).read_text())
            if isinstance(record, dict) and isinstance(record.get("phase"), str):
                found.append(record)
    return sorted(found, key=lambda record: -float(record.get("at") or 0.0))


def backoff_seconds(retry: RetryConfig, attempts_so_far: int) -> float:
    return min(retry.max_backoff_s, retry.backoff_s * 2 ** max(0, attempts_so_far - 1))


# --- reading -------------------------------------------------------------------------------------


@dataclass
class VideoHistory:
    attempts: int = 0
    last_error: str | None = None
    done: bool = False
    final: bool = False


@dataclass
class LedgerView:
    """One read of the run's attempts: metrics rows, manual submission times and markers."""

    run: RunDir
    metrics: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    resets: dict[int, float] = field(default_factory=dict)
    complete: set[int] = field(default_factory=set)

    @classmethod
    def read(cls, run: RunDir, shards: list[int] | None = None) -> LedgerView:
        view = cls(run, resets=manual_reset_times(run), complete=run.completed_shards())
        for row in run.metrics_rows(shards):
            view.metrics.setdefault(int(row["shard"]), []).append(row)
        return view

    def attempts(self, shard: int) -> list[dict[str, Any]]:
        """The shard's attempts (metrics rows) since its last manual submission, oldest first."""
        reset = self.resets.get(shard, 0.0)
        return [row for row in self.metrics.get(shard, []) if (row.get("started_at") or 0.0) >= reset]

    def reason_of(self, shard: int, key: str) -> ExitReason:
        for row in self.metrics.get(shard, []):
            if row["attempt_key"] == key:
                return ExitReason(row["exit_reason"])
        return ExitReason.RUNNING


def manual_reset_times(run: RunDir) -> dict[int, float]:
    """Per shard, when it was last submitted by hand (submit or retry); counting starts there."""
    resets: dict[int, float] = {}
    for submission in run.submissions():
        if submission.get("kind", "manual") == "manual":
            for record in submission["jobs"]:
                shard = int(record["shard"])
                resets[shard] = max(resets.get(shard, 0.0), float(submission["submitted_at"]))
    return resets


def video_histories(run: RunDir, shard: int, current: AttemptKey | None) -> dict[str, VideoHistory]:
    """Per video of the shard: attempts used (since the last manual submission), last error, done."""
    view = LedgerView.read(run, [shard])
    reset = view.resets.get(shard, 0.0)
    histories: dict[str, VideoHistory] = {}
    rows = run.manifest_rows(shard).to_pylist()
    for row in sorted(rows, key=lambda r: r["finished_at"] or 0.0):
        history = histories.setdefault(row["video_id"], VideoHistory())
        if row["status"] == VideoStatus.DONE:
            history.done = True
            continue
        if (row["finished_at"] or 0.0) < reset or (
            current is not None and row["attempt_key"] == str(current)
        ):
            continue
        if row["status"] == VideoStatus.STARTED:
            reason = view.reason_of(shard, row["attempt_key"])
            if not reason.charges_videos:
                continue
            history.attempts += 1
            history.last_error = f"the job attempt ended during this video ({reason})"
        else:
            history.attempts += 1
            history.last_error = row["error"]
            history.final = history.final or bool(row["final"])
    return histories


# --- writing -------------------------------------------------------------------------------------


def begin(run: RunDir, shard: int, key: AttemptKey, row: dict[str, Any]) -> None:
    """The attempt starts the shard: its metrics row, `running`."""
    fields = row | {"shard": shard, "attempt_key": str(key), "job_id": key.job_id}
    fields |= {"exit_reason": str(ExitReason.RUNNING), "exit_detail": None}
    fields.setdefault("started_at", time.time())
    _write_metrics(run.metrics_part(shard, str(key)), fields)


def _write_metrics(path: Path, row: dict[str, Any]) -> None:
    table = pa.Table.from_pylist([row], schema=METRICS_SCHEMA)
    write_parquet_atomic(path, table)
    write_metrics_summary(path, table)


def end(
    run: RunDir,
    shard: int,
    key: AttemptKey,
    reason: ExitReason,
    detail: str | None,
    measured: dict[str, Any] | None = None,
) -> None:
    """The attempt ended for `reason`. A reason already set is kept, except that the attempt's own
    rank 0 reporting completion (with `measured`) always wins."""
    path = run.metrics_part(shard, str(key))
    if path.is_file():
        row = run.read_metrics_part(path)
        if row["exit_reason"] != ExitReason.RUNNING and measured is None:
            return
    else:
        row = {"shard": shard, "attempt_key": str(key), "job_id": key.job_id, "started_at": time.time()}
    row |= measured or {}
    row |= {"exit_reason": str(reason), "exit_detail": detail, "finished_at": time.time()}
    _write_metrics(path, row)


def interrupt(run: RunDir, shards: list[int], key: AttemptKey, reason: ExitReason, detail: str) -> None:
    """USR2, SIGINT or a local walltime: the attempt's shards that had started end for `reason`."""
    for shard in shards:
        if run.metrics_part(shard, str(key)).is_file():
            end(run, shard, key, reason, detail)


def cancel(run: RunDir, job_ids: set[str], detail: str = "hvbatch cancel") -> None:
    """The running attempts of these jobs end as `cancelled` (before they are killed)."""
    for row in run.metrics_rows():
        if row["exit_reason"] == ExitReason.RUNNING and str(row["job_id"]) in job_ids:
            end(run, int(row["shard"]), AttemptKey.parse(row["attempt_key"]), ExitReason.CANCELLED, detail)


def cancel_unstarted(run: RunDir, jobs: list[tuple[int, str, str]], detail: str = "hvbatch cancel") -> None:
    """Jobs `(shard, job_id, executor)` cancelled before their shard started get one ended attempt
    saying so, so that `status` and the report tell why the shard stopped (call it once the jobs
    are cancelled: none of them can start any more)."""
    started = {(int(row["shard"]), str(row["job_id"])) for row in run.metrics_rows()}
    for shard, job_id, executor in jobs:
        if (shard, job_id) in started:
            continue
        key = AttemptKey.slurm(job_id, 0) if executor == "slurm" else AttemptKey.local(job_id, 0)
        end(run, shard, key, ExitReason.CANCELLED, f"{detail}, before the shard started")


def reconcile(run: RunDir, shards: list[int], probe: JobProbe, current: AttemptKey | None = None) -> None:
    """Attempts still `running` whose job is gone (node failure, scancel, a killed job script).

    A job that is alive, or whose state the scheduler cannot tell, is left alone: a concurrent
    job of the same shard is never marked `lost`.
    """
    for row in run.metrics_rows(shards):
        if row["exit_reason"] != ExitReason.RUNNING or row["attempt_key"] == str(current):
            continue
        key = AttemptKey.parse(row["attempt_key"])
        if current is not None and key.job_id == current.job_id:
            alive: bool | None = False  # an earlier attempt of this very job has ended
        else:
            alive = probe.is_alive(key.job_id)
        if alive is False:
            state = probe.final_state(key.job_id)
            reason, detail = classify_exit(None, rank_errors(run, key), state)
            end(run, int(row["shard"]), key, reason, detail)


def mark_complete_if_done(run: RunDir, shard: int, key: AttemptKey) -> bool:
    """Write the completion marker if every video has a done or (current) final failed row."""
    videos = run.read_shard(shard)["video_id"].to_pylist()
    rows = run.manifest_rows(shard)
    done_rows = rows.filter(pc.equal(rows["status"], str(VideoStatus.DONE)))
    done = set(done_rows["video_id"].to_pylist())
    view = LedgerView.read(run, [shard])
    final_failed = pc.and_(pc.equal(rows["status"], str(VideoStatus.FAILED)), pc.equal(rows["final"], True))
    current = pc.greater_equal(rows["finished_at"], view.resets.get(shard, 0.0))  # not before a retry
    failed_rows = rows.filter(pc.and_(final_failed, current))
    final = set(failed_rows["video_id"].to_pylist()) - done
    if not set(videos) <= done | final:
        return False
    attempts = view.attempts(shard)
    finished = [t for t in done_rows["finished_at"].to_pylist() if t]
    write_json_atomic(
        run.done_marker(shard),
        {
            "shard": shard,
            "videos": len(videos),
            "done": len(set(videos) & done),
            "failed": len(set(videos) & final),
            "job_id": key.job_id,
            "attempt_key": str(key),
            "attempts": len(attempts),
            "last_exit": attempts[-1]["exit_reason"] if attempts else None,
            "last_exit_detail": attempts[-1]["exit_detail"] if attempts else None,
            "last_done_at": max(finished) if finished else None,
            "finished_at": time.time(),
        },
    )
    return True


def complete(run: RunDir, shard: int, key: AttemptKey, measured: dict[str, Any]) -> bool:
    """Rank 0 finished the shard: its attempt `completed`, then the marker if every video is done.
    A marker that finds no space turns the attempt into `disk-full` (when that still fits)."""
    end(run, shard, key, ExitReason.COMPLETED, None, measured)
    try:
        return mark_complete_if_done(run, shard, key)
    except OSError as err:
        if is_disk_full(err):
            with contextlib.suppress(OSError):
                end(run, shard, key, ExitReason.DISK_FULL, f"rank 0: {type(err).__name__}: {err}", measured)
        raise


def give_up(run: RunDir, shard: int, key: AttemptKey, why: str) -> None:
    """Attempts used up: every video without a done or final row gets a final failed row."""
    histories = video_histories(run, shard, None)
    rows = []
    videos = run.read_shard(shard).to_pylist()
    for video in videos:
        history = histories.get(video["video_id"], VideoHistory())
        if history.done or history.final:
            continue
        row = {name: video.get(name) for name in MANIFEST_SCHEMA.names}
        error = why + (f"; last video error: {history.last_error}" if history.last_error else "")
        row |= {"shard": shard, "status": str(VideoStatus.FAILED), "final": True}
        row |= {"attempt": history.attempts, "error": error, "job_id": key.job_id}
        row |= {"attempt_key": str(key), "finished_at": time.time()}
        rows.append(row)
    if rows:
        path = run.manifest_part(shard, str(key), 0, suffix="gave-up")
        table = pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)
        write_parquet_atomic(path, table)
        write_part_summary(path, table, shard_index([video["video_id"] for video in videos]))
    mark_complete_if_done(run, shard, key)


def _fate(run: RunDir, retry: RetryConfig, shard: int, key: AttemptKey, view: LedgerView) -> ShardFate:
    attempts = view.attempts(shard)
    last = ExitReason(attempts[-1]["exit_reason"]) if attempts else ExitReason.LOST
    detail = attempts[-1]["exit_detail"] if attempts else None
    if last in (ExitReason.WALLTIME, ExitReason.PREEMPTED):
        walltimes = sum(1 for a in attempts if a["exit_reason"] in ("walltime", "preempted"))
        if walltimes <= retry.max_walltime_requeues:
            return ShardFate.REQUEUED
    if last == ExitReason.CANCELLED:
        return ShardFate.LEFT
    # A `completed` attempt that left the shard unfinished counts too, so that nothing loops.
    charged = [a for a in attempts if ExitReason(a["exit_reason"]) in (ExitReason.COMPLETED, *CHARGING)]
    if len(charged) < retry.max_attempts and last not in (ExitReason.WALLTIME, ExitReason.PREEMPTED):
        return ShardFate.RETRY
    if last.outside_the_videos:  # not the videos' fault: they stay pending for `hvbatch retry`
        logger.error(
            "%s stopped after %d attempts (last: %s: %s); its videos are not marked failed: fix the "
            "cause and run `hvbatch retry %s`", shard_name(shard), len(attempts), last, detail, run.root,
        )  # fmt: skip
        return ShardFate.STOPPED
    give_up(run, shard, key, f"gave up after {len(attempts)} attempts (last: {last}: {detail})")
    return ShardFate.GAVE_UP


def finish(
    run: RunDir,
    retry: RetryConfig,
    shards: list[int],
    key: AttemptKey,
    exit_code: int | None,
    *,
    scheduler_state: str | None = None,
    resubmit: Callable[[list[int], float], None] | None = None,
    cause: tuple[ExitReason, str] | None = None,
) -> dict[int, ShardFate]:
    """Record how the attempt ended and decide each unfinished shard's fate.

    `cause` is a reason the caller knows itself (the local supervisor's own failure); otherwise
    it comes from the exit status, the ranks' reports and the scheduler. With `resubmit`, the
    shards to retry are passed to it with the backoff delay; without it the caller retries them
    (the local supervisor's loop).
    """
    if cause is not None:
        reason, detail = cause
    else:
        reason, detail = classify_exit(exit_code, rank_errors(run, key), scheduler_state)
    complete = run.completed_shards()
    unfinished = [shard for shard in shards if shard not in complete]
    if not unfinished and cause is None and not exit_code:  # nothing to say but that it worked
        reason, detail = ExitReason.COMPLETED, "every shard complete"
    fates = {shard: ShardFate.COMPLETE for shard in shards if shard not in unfinished}
    started = [shard for shard in unfinished if run.metrics_part(shard, str(key)).is_file()]
    # A crash before any shard started (e.g. while loading) is charged to the first unfinished one.
    for shard in started or unfinished[:1]:
        end(run, shard, key, reason, detail)
    view = LedgerView.read(run, unfinished)
    for shard in unfinished:
        fates[shard] = _fate(run, retry, shard, key, view)
    retry_shards = [shard for shard, fate in fates.items() if fate == ShardFate.RETRY]
    if retry_shards and resubmit is not None:
        resubmit(retry_shards, retry_delay(run, retry, retry_shards))
    logger.info(
        "attempt %s ended: %s (%s); shards: %s", key, reason, detail, {s: str(f) for s, f in fates.items()}
    )
    return fates


def retry_delay(run: RunDir, retry: RetryConfig, shards: list[int]) -> float:
    view = LedgerView.read(run, shards)
    return max(backoff_seconds(retry, len(view.attempts(s))) for s in shards)


def marker_failed_count(run: RunDir, shard: int) -> int:
    """Failed videos counted by the shard's completion marker (0 without a marker)."""
    path = run.done_marker(shard)
    return int(read_marker(path).get("failed", 0)) if path.is_file() else 0


def reopen_failed_shards(run: RunDir, shards: list[int]) -> list[int]:
    """Before a manual retry: shards whose marker counts failed videos lose it (they run again)."""
    reopened = []
    for shard in shards:
        if marker_failed_count(run, shard):
            run.done_marker(shard).unlink(missing_ok=True)
            reopened.append(shard)
    return reopened


def dumps_fates(fates: dict[int, ShardFate]) -> str:
    return json.dumps({str(s): str(f) for s, f in fates.items()}, sort_keys=True)
