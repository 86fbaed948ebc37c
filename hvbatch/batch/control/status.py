"""Run status from the run directory's own files plus `squeue` (never submitit's job state)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from hvbatch.batch.attempt import VideoStatus
from hvbatch.batch.executors.base import LIVE_STATES, JobRecord, SchedulerUnavailable, latest_records
from hvbatch.batch.executors.registry import live_states
from hvbatch.batch.ledger import manual_reset_times
from hvbatch.batch.rundir import RunDir

MAX_TABLE_ROWS = 40


@dataclass
class RunSnapshot:
    """One read of a run: the latest job of each shard, their queue states, and the markers.

    `states` is None when a scheduler could not answer (`unknown` says why): nothing is then
    shown as running, and nothing may be resubmitted on that guess.
    """

    records: dict[int, JobRecord]
    states: dict[str, str] | None
    unknown: str | None
    markers: dict[int, dict[str, Any]]

    @classmethod
    def take(cls, run: RunDir) -> RunSnapshot:
        records = latest_records(run)
        markers = run.markers()
        waiting = [record for shard, record in records.items() if shard not in markers]
        try:
            states: dict[str, str] | None = live_states(run, waiting)
            unknown = None
        except SchedulerUnavailable as err:
            states, unknown = None, str(err)
        return cls(records, states, unknown, markers)

    def live_shards(self) -> set[int]:
        states = self.states or {}
        return {
            shard
            for shard, record in self.records.items()
            if shard not in self.markers and states.get(record.job_id, "") in LIVE_STATES
        }

    def state_of(self, shard: int) -> str:
        if shard in self.markers:
            return "COMPLETE"
        record = self.records.get(shard)
        if record is None:
            return "NOT SUBMITTED"
        if self.states is None:
            return "UNKNOWN"
        return self.states.get(record.job_id, "STOPPED")


def video_table(run: RunDir, snapshot: RunSnapshot | None = None) -> pa.Table:
    """One row per video: id, prompt, seed, status, attempts, path, seconds, error (+ shard).

    done: a done row exists; failed: its failure is final (attempts used up); running: its shard's
    job is queued or running; pending: otherwise (e.g. after a cancel, until `hvbatch retry`).
    """
    snapshot = snapshot or RunSnapshot.take(run)
    rows = run.manifest_rows()
    resets = manual_reset_times(run)
    shard_of = dict(zip(*(c.to_pylist() for c in run.all_videos(["video_id", "shard"]).columns), strict=True))
    done: dict[str, dict[str, Any]] = {}
    last: dict[str, dict[str, Any]] = {}
    final: set[str] = set()
    attempts: dict[str, int] = {}
    for row in sorted(rows.to_pylist(), key=lambda r: r["finished_at"] or 0.0):
        vid = row["video_id"]
        attempts[vid] = attempts.get(vid, 0) + 1
        if row["status"] == "done":
            done.setdefault(vid, row)
            continue
        last[vid] = row
        reset = resets.get(shard_of.get(vid, -1), 0.0)
        if row["status"] == "failed" and row["final"] and (row["finished_at"] or 0.0) >= reset:
            final.add(vid)
    live_shards = snapshot.live_shards()
    out = []
    for video in run.all_videos().to_pylist():
        vid = video["video_id"]
        row = done.get(vid) or last.get(vid) or {}
        if vid in done:
            status = "done"
        elif vid in final:
            status = "failed"
        else:
            status = "running" if video["shard"] in live_shards else "pending"
        error = row.get("error")
        if row.get("status") == "started":
            error = "interrupted: the job attempt ended during this video"
        out.append(
            video
            | {
                "status": status,
                "attempts": attempts.get(vid, 0),
                "path": row.get("path") if status == "done" else None,
                "seconds": row.get("seconds"),
                "error": None if status == "done" else error,
            }
        )
    return pa.Table.from_pylist(out, schema=VIDEO_TABLE_SCHEMA)


VIDEO_TABLE_SCHEMA = pa.schema(
    [
        ("video_id", pa.string()),
        ("prompt", pa.string()),
        ("seed", pa.int64()),
        ("status", pa.string()),
        ("attempts", pa.int32()),
        ("path", pa.string()),
        ("seconds", pa.float64()),
        ("error", pa.string()),
        ("shard", pa.int32()),
    ]
)


@dataclass
class RunStatus:
    counts: dict[str, int]
    videos_per_hour: float | None
    eta_seconds: float | None
    jobs: list[dict[str, Any]] = field(default_factory=list)
    scheduler_error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "counts": self.counts,
            "videos_per_hour": self.videos_per_hour,
            "eta_seconds": self.eta_seconds,
            "jobs": self.jobs,
            "scheduler_error": self.scheduler_error,
        }


def _open_shard_counts(
    run: RunDir, snapshot: RunSnapshot, open_shards: list[int]
) -> tuple[dict[str, int], list[float]]:
    """done / failed / running / pending of the shards without a marker, and their done times."""
    counts = {"done": 0, "failed": 0, "pending": 0, "running": 0}
    if not open_shards:
        return counts, []
    videos = run.all_videos(["video_id", "shard"])
    shard_of = dict(zip(*(c.to_pylist() for c in videos.columns), strict=True))
    wanted = set(open_shards)
    resets = manual_reset_times(run)
    rows = run.manifest_rows(open_shards).select(["video_id", "status", "final", "finished_at"]).to_pylist()
    done: dict[str, float] = {}
    failed: set[str] = set()
    for row in rows:
        if row["status"] == VideoStatus.DONE:
            done[row["video_id"]] = row["finished_at"] or 0.0
        elif row["status"] == VideoStatus.FAILED and row["final"]:
            reset = resets.get(shard_of.get(row["video_id"], -1), 0.0)
            if (row["finished_at"] or 0.0) >= reset:  # a final failure from before a retry is reopened
                failed.add(row["video_id"])
    live = snapshot.live_shards()
    for video_id, shard in shard_of.items():
        if shard not in wanted:
            continue
        if video_id in done:
            counts["done"] += 1
        elif video_id in failed:
            counts["failed"] += 1
        else:
            counts["running" if shard in live else "pending"] += 1
    return counts, list(done.values())


def run_status(run: RunDir) -> RunStatus:
    """Counts, rate, ETA and the per-shard job table: markers for complete shards (one small JSON
    each), manifest and metrics parts only for the shards still open."""
    snapshot = RunSnapshot.take(run)
    num_shards = run.num_shards()
    open_shards = [shard for shard in range(num_shards) if shard not in snapshot.markers]
    counts, done_times = _open_shard_counts(run, snapshot, open_shards)
    for marker in snapshot.markers.values():
        counts["done"] += int(marker.get("done", 0))
        counts["failed"] += int(marker.get("failed", 0))
        if marker.get("last_done_at"):
            done_times.append(float(marker["last_done_at"]))
    started = float(run.read_run()["created_at"])
    rate = (
        counts["done"] / max(1.0, max(done_times) - started) * 3600.0
        if done_times and counts["done"]
        else None
    )
    remaining = counts["pending"] + counts["running"]
    eta = None
    if not remaining:
        eta = 0.0
    elif rate and counts["running"]:  # a stopped run has no ETA
        eta = remaining / rate * 3600.0
    history: dict[int, dict[str, Any]] = {}
    for row in run.metrics_rows(open_shards):
        entry = history.setdefault(int(row["shard"]), {"attempts": 0})
        entry |= {"attempts": entry["attempts"] + 1, "last_exit": row["exit_reason"]}
        entry["last_exit_detail"] = row["exit_detail"]
    for shard, marker in snapshot.markers.items():
        history[shard] = {key: marker.get(key) for key in ("attempts", "last_exit", "last_exit_detail")}
    table = []
    for shard in range(num_shards):
        record = snapshot.records.get(shard)
        entry = history.get(shard, {})
        table.append(
            {
                "shard": shard,
                "job_id": record.job_id if record else None,
                "executor": record.executor if record else None,
                "state": snapshot.state_of(shard),
                "attempts": entry.get("attempts") or 0,
                "last_exit": entry.get("last_exit"),
                "last_exit_detail": entry.get("last_exit_detail"),
            }
        )
    return RunStatus(counts, rate, eta, table, snapshot.unknown)


def format_status(run: RunDir, status: RunStatus) -> str:
    c = status.counts
    total = sum(c.values())
    rate = f"{status.videos_per_hour:.1f} videos/hour" if status.videos_per_hour else "no video done yet"
    eta = (
        ""
        if status.eta_seconds is None
        else f", ETA {time.strftime('%H:%M:%S', time.gmtime(status.eta_seconds))}"
    )
    warning = [f"warning: job states unknown ({status.scheduler_error})"] if status.scheduler_error else []
    lines = [
        *warning,
        f"run {run.root}: {total} videos: {c['done']} done, {c['failed']} failed, {c['running']} running, "
        f"{c['pending']} pending; {rate}{eta}",
        f"{'shard':>6}  {'job':<16} {'executor':<9} {'state':<11} {'tries':>5}  last exit",
    ]
    shown = [j for j in status.jobs if j["state"] != "COMPLETE"][:MAX_TABLE_ROWS] or status.jobs[
        :MAX_TABLE_ROWS
    ]
    lines += [
        f"{j['shard']:>6}  {j['job_id']!s:<16} {j['executor']!s:<9} {j['state']:<11} {j['attempts']:>5}  "
        + (
            f"{j['last_exit']}" + (f": {j['last_exit_detail']}" if j["last_exit_detail"] else "")
            if j["last_exit"]
            else ""
        )
        for j in shown
    ]
    if len(status.jobs) > len(shown):
        by_state: dict[str, int] = {}
        for job in status.jobs:
            by_state[job["state"]] = by_state.get(job["state"], 0) + 1
        lines.append(
            f"({len(status.jobs)} shards: " + ", ".join(f"{n} {s}" for s, n in sorted(by_state.items())) + ")"
        )
    return "\n".join(lines)
