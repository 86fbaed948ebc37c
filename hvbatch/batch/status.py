"""Run status from the run directory's own files plus `squeue` (never submitit's job state)."""

from __future__ import annotations

import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from hvbatch.batch.attempts import METRICS_SCHEMA, manual_reset_times
from hvbatch.batch.rundir import RunDir

MAX_TABLE_ROWS = 40
LIVE_STATES = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "RESIZING", "SUSPENDED"}


def slurm_job_states(job_ids: list[str]) -> dict[str, str]:
    """`squeue` states of the given jobs (array elements expanded); absent ids are no longer queued."""
    if not job_ids or not shutil.which("squeue"):
        return {}
    try:
        out = subprocess.run(
            ["squeue", "-h", "-r", "-o", "%i %T", "--jobs", ",".join(sorted(set(job_ids)))],
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    states = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 2:
            states[parts[0]] = parts[1]
    return states


def local_job_states(job_ids: list[str]) -> dict[str, str]:
    """The local executor's job id is its controller's pid."""
    states = {}
    for job_id in set(job_ids):
        try:
            stat = Path(f"/proc/{int(job_id)}/stat").read_text()
        except (ValueError, OSError):
            continue
        if stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X"):  # a zombie has exited
            states[job_id] = "RUNNING"
    return states


def latest_jobs(run: RunDir) -> dict[int, dict[str, Any]]:
    """The most recent submission record of each shard."""
    latest: dict[int, dict[str, Any]] = {}
    for submission in run.submissions():
        for record in submission["jobs"]:
            latest[int(record["shard"])] = record | {"submitted_at": submission["submitted_at"]}
    return latest


def live_states(records: list[dict[str, Any]]) -> dict[str, str]:
    slurm = [r["job_id"] for r in records if r["executor"] == "slurm"]
    local = [r["job_id"] for r in records if r["executor"] == "local"]
    return slurm_job_states(slurm) | local_job_states(local)


@dataclass
class RunSnapshot:
    """One read of a run: its manifest rows, the latest job of each shard, and their queue states."""

    rows: pa.Table
    jobs: dict[int, dict[str, Any]]
    states: dict[str, str]

    @classmethod
    def take(cls, run: RunDir) -> RunSnapshot:
        jobs = latest_jobs(run)
        return cls(run.manifest_rows(), jobs, live_states(list(jobs.values())))


def video_table(run: RunDir, snapshot: RunSnapshot | None = None) -> pa.Table:
    """One row per video: id, prompt, seed, status, attempts, path, seconds, error (+ shard).

    done: a done row exists; failed: its failure is final (attempts used up); running: its shard's
    job is queued or running; pending: otherwise (e.g. after a cancel, until `hvbatch retry`).
    """
    snapshot = snapshot or RunSnapshot.take(run)
    resets = manual_reset_times(run)
    shard_of = dict(zip(*run.all_videos(["video_id", "shard"]).columns, strict=True))
    done: dict[str, dict[str, Any]] = {}
    last: dict[str, dict[str, Any]] = {}
    final: set[str] = set()
    attempts: dict[str, int] = {}
    for row in sorted(snapshot.rows.to_pylist(), key=lambda r: r["finished_at"] or 0.0):
        vid = row["video_id"]
        attempts[vid] = attempts.get(vid, 0) + 1
        if row["status"] == "done":
            done.setdefault(vid, row)
            continue
        last[vid] = row
        reset = resets.get(shard_of.get(vid, -1), 0.0)
        if row["status"] == "failed" and row["final"] and (row["finished_at"] or 0.0) >= reset:
            final.add(vid)
    jobs, states = snapshot.jobs, snapshot.states
    live_shards = {shard for shard, record in jobs.items() if states.get(record["job_id"], "") in LIVE_STATES}
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


def shard_attempt_summary(run: RunDir) -> dict[int, dict[str, Any]]:
    """Per shard: number of job attempts and how the latest one ended (from the metrics parts)."""
    import pyarrow.dataset as ds

    folder = run.root / "metrics"
    parts = sorted(str(p) for p in folder.glob("shard-*.parquet")) if folder.is_dir() else []
    if not parts:
        return {}
    columns = ["shard", "exit_reason", "exit_detail", "started_at"]
    rows = ds.dataset(parts, schema=METRICS_SCHEMA, format="parquet").to_table(columns=columns).to_pylist()
    summary: dict[int, dict[str, Any]] = {}
    for row in sorted(rows, key=lambda r: r["started_at"] or 0.0):
        entry = summary.setdefault(int(row["shard"]), {"attempts": 0})
        entry["attempts"] += 1
        entry["last_exit"] = row["exit_reason"]
        entry["last_exit_detail"] = row["exit_detail"]
    return summary


@dataclass
class RunStatus:
    counts: dict[str, int]
    videos_per_hour: float | None
    eta_seconds: float | None
    jobs: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "counts": self.counts,
            "videos_per_hour": self.videos_per_hour,
            "eta_seconds": self.eta_seconds,
            "jobs": self.jobs,
        }


def run_status(run: RunDir) -> RunStatus:
    snapshot = RunSnapshot.take(run)
    statuses = video_table(run, snapshot)["status"].to_pylist()
    counts = {name: statuses.count(name) for name in ("done", "failed", "pending", "running")}
    rows = snapshot.rows
    finished = [
        t
        for t, s in zip(rows["finished_at"].to_pylist(), rows["status"].to_pylist(), strict=True)
        if s == "done" and t
    ]
    started = float(run.read_run()["created_at"])
    rate = None
    if finished:
        rate = len(finished) / max(1.0, max(finished) - started) * 3600.0
    remaining = counts["pending"] + counts["running"]
    eta = remaining / rate * 3600.0 if rate and remaining else (0.0 if not remaining else None)
    jobs, states = snapshot.jobs, snapshot.states
    done_shards = run.completed_shards()
    attempts = shard_attempt_summary(run)
    table = []
    for shard in range(run.num_shards()):
        record = jobs.get(shard, {})
        state = "COMPLETE" if shard in done_shards else states.get(record.get("job_id", ""), "STOPPED")
        history = attempts.get(shard, {})
        table.append(
            {
                "shard": shard,
                "job_id": record.get("job_id"),
                "executor": record.get("executor"),
                "state": state,
                "attempts": history.get("attempts", 0),
                "last_exit": history.get("last_exit"),
                "last_exit_detail": history.get("last_exit_detail"),
            }
        )
    return RunStatus(counts, rate, eta, table)


def format_status(run: RunDir, status: RunStatus) -> str:
    c = status.counts
    total = sum(c.values())
    rate = f"{status.videos_per_hour:.1f} videos/hour" if status.videos_per_hour else "no video done yet"
    eta = (
        ""
        if status.eta_seconds is None
        else f", ETA {time.strftime('%H:%M:%S', time.gmtime(status.eta_seconds))}"
    )
    lines = [
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
