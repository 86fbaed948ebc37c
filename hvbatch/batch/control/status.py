"""Run status from the run directory's own files plus `squeue` (never submitit's job state)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from hvbatch.batch.attempt import ExitReason
from hvbatch.batch.executors.base import (
    LIVE_STATES,
    JobRecord,
    RunProbe,
    SchedulerUnavailable,
    latest_records,
)
from hvbatch.batch.executors.registry import live_states
from hvbatch.batch.files import read_parquet, read_parquet_parts
from hvbatch.batch.ledger import manual_reset_times
from hvbatch.batch.rundir import (
    MANIFEST_SCHEMA,
    METRICS_SCHEMA,
    SHARD_PATTERN,
    RunDir,
    checked_marker,
    read_marker,
)
from hvbatch.batch.summaries import PartTally, read_metrics_row, read_part_tally, shard_index, stamp_of
from hvbatch.config import Config, load_config

MAX_TABLE_ROWS = 40
MAX_STOP_LINES = 3


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
    def take(cls, run: RunDir, every_job: bool = False) -> RunSnapshot:
        """`every_job`: also ask about the jobs of complete shards (are they still exiting?)."""
        return RunReader(run).snapshot(every_job)

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
    videos = run.all_videos().to_pylist()
    sizes = _untried_sizes(
        run, [v for v in videos if v["video_id"] not in done and v["video_id"] not in last]
    )
    out = []
    for video in videos:
        vid = video["video_id"]
        row = done.get(vid) or last.get(vid) or {}
        size = {key: row.get(key) for key in SIZE_COLUMNS} if row else sizes.get(vid, {})
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
            | size
            | {
                "status": status,
                "attempts": attempts.get(vid, 0),
                "path": row.get("path") if status == "done" else None,
                "seconds": row.get("seconds"),
                "error": None if status == "done" else error,
                "steps_computed": row.get("steps_computed") if status == "done" else None,
                "steps_skipped": row.get("steps_skipped") if status == "done" else None,
            }
        )
    return pa.Table.from_pylist(out, schema=VIDEO_TABLE_SCHEMA)


SIZE_COLUMNS = ("height", "width", "num_frames")


def _untried_sizes(run: RunDir, videos: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Sizes of videos no manifest row names yet, from their frozen shard files (only theirs)."""
    sizes: dict[str, dict[str, Any]] = {}
    for shard in sorted({int(video["shard"]) for video in videos}):
        table = read_parquet(run.shard_path(shard), columns=["video_id", *SIZE_COLUMNS])
        sizes |= {row.pop("video_id"): row for row in table.to_pylist()}
    return sizes


VIDEO_TABLE_SCHEMA = pa.schema(
    [
        ("video_id", pa.string()),
        ("prompt", pa.string()),
        ("seed", pa.int64()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("num_frames", pa.int32()),
        ("status", pa.string()),
        ("attempts", pa.int32()),
        ("path", pa.string()),
        ("seconds", pa.float64()),
        ("error", pa.string()),
        ("shard", pa.int32()),
        ("steps_computed", pa.int32()),  # with step caching: denoising steps run / reused (null otherwise)
        ("steps_skipped", pa.int32()),
        ("image_source", pa.string()),  # image-to-video: the input image as the prompts file names it,
        ("image_sha256", pa.string()),  # its sha256 and its frozen file in the run (null otherwise)
        ("image_path", pa.string()),
    ]
)


@dataclass
class RunStatus:
    counts: dict[str, int]
    videos_per_hour: float | None
    eta_seconds: float | None
    jobs: list[dict[str, Any]] = field(default_factory=list)
    scheduler_error: str | None = None
    stopped: list[str] = field(default_factory=list)
    """When no job is alive and the run is not complete: why it stopped and what to do (lines)."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "counts": self.counts,
            "videos_per_hour": self.videos_per_hour,
            "eta_seconds": self.eta_seconds,
            "jobs": self.jobs,
            "scheduler_error": self.scheduler_error,
            "stopped": self.stopped,
        }

    def to_json(self) -> str:
        """`status --json`: indented, with a line per shard of the job table (json's C encoder
        writes each; an indented dump of 100,000 shards would take seconds)."""
        head = json.dumps(self.to_dict() | {"jobs": None}, indent=2)
        jobs = ",\n".join(f"    {json.dumps(job)}" for job in self.jobs)
        return head.replace('"jobs": null', f'"jobs": [\n{jobs}\n  ]' if jobs else '"jobs": []', 1)


def format_duration(seconds: float) -> str:
    """`45s`, `12m 5s`, `2h 10m`, `3d 4h`: two units at most."""
    total = max(0, round(seconds))
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    return f"{minutes}m {secs}s" if minutes else f"{secs}s"


def _read_manifest_part(path: Path) -> pa.Table:
    parts = read_parquet_parts([path], MANIFEST_SCHEMA)
    if not parts:
        raise FileNotFoundError(path)
    return parts[0][1].select(["video_id", "status", "final", "finished_at"])


Stamp = tuple[int, int, int]


def _read_marker(path: str) -> Any:
    """A completion marker (os-level reads: a complete run has one per shard); an unreadable one is
    named by `read_marker`'s error, one of the wrong shape by `checked_marker`'s."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            data = os.read(fd, 1 << 20)
        finally:
            os.close(fd)
        marker = json.loads(data)
    except (OSError, ValueError):
        return read_marker(Path(path))
    return checked_marker(Path(path), marker)


class RunReader:
    """Reads a run again and again (`--wait` polls every few seconds) and re-reads only what
    changed: completion markers and manifest / metrics parts new or replaced since the last read
    (by inode, size and mtime). A part is read through its summary (`hvbatch.batch.summaries`)
    when that names the part's stamp, else itself. The config and the shard sizes are read once:
    they never change after submit.
    """

    def __init__(self, run: RunDir) -> None:
        self.run = run
        self._config: Config | None = None
        self._num_shards: int | None = None
        self._shard_sizes: np.ndarray | None = None
        self._shard_index: dict[int, dict[str, int]] = {}
        self._files: dict[str, dict[str, tuple[Stamp, Any]]] = {}
        """Per folder, per file name: its stamp when read and what `read` made of it."""

    def _read_changed(
        self, folder: str, ext: str, shards: set[int] | None, read: Callable[[int, str, Stamp], Any]
    ) -> dict[int, list[Any]]:
        """Per shard, `read(shard, path, stamp)` of `folder`'s files of `shards` (all if None),
        each in name order; a file unchanged since the last call is not read again. (Paths are
        strings: a poll of thousands of files is mostly the cost of handling their names.)"""
        found: dict[int, list[Any]] = {}
        if shards is not None and not shards:
            return found
        directory = os.path.join(self.run.root, folder)
        try:
            names = sorted(name for name in os.listdir(directory) if name.endswith(ext))  # (no stats)
        except (FileNotFoundError, NotADirectoryError):
            return found
        cache = self._files.setdefault(folder, {})
        prefix = directory + os.sep
        for name in names:
            match = SHARD_PATTERN.match(name)
            if match is None:
                continue
            shard = int(match[1])
            if shards is not None and shard not in shards:
                continue
            path = prefix + name
            try:
                stamp = stamp_of(os.stat(path))
                cached = cache.get(name)
                if cached is None or cached[0] != stamp:
                    cached = cache[name] = (stamp, read(shard, path, stamp))
            except FileNotFoundError:
                continue  # replaced or moved aside since the listing
            found.setdefault(shard, []).append(cached[1])
        return found

    def num_shards(self) -> int:
        self._num_shards = self._num_shards or self.run.num_shards()
        return self._num_shards

    def shard_sizes(self) -> np.ndarray:
        """Videos of each shard (from `videos.parquet`'s shard column)."""
        if self._shard_sizes is None:
            sizes = np.zeros(self.num_shards(), np.int64)
            counted = pc.value_counts(self.run.all_videos(["shard"])["shard"])  # (to_numpy imports pandas)
            values, counts = (counted.field(name).to_pylist() for name in ("values", "counts"))
            for shard, count in zip(values, counts, strict=True):
                if 0 <= shard < len(sizes):
                    sizes[shard] = count
            self._shard_sizes = sizes
        return self._shard_sizes

    def _tally(self, shard: int, path: str, stamp: Stamp) -> PartTally:
        tally = read_part_tally(path, stamp)
        if tally is not None:
            return tally
        if shard not in self._shard_index:
            self._shard_index[shard] = shard_index(self.run.read_shard(shard)["video_id"].to_pylist())
        return PartTally.of_table(_read_manifest_part(Path(path)), self._shard_index[shard])

    def _metrics_row(self, shard: int, path: str, stamp: Stamp) -> dict[str, Any]:
        row = read_metrics_row(path, stamp)
        if row is None:
            return self.run.read_metrics_part(Path(path))
        return {name: row.get(name) for name in METRICS_SCHEMA.names}

    def metrics_rows(self, shards: set[int]) -> list[dict[str, Any]]:
        """`RunDir.metrics_rows` of these shards: one dict per (shard, attempt), oldest first."""
        found = self._read_changed("metrics", ".parquet", shards, self._metrics_row)
        rows = [row for shard_rows in found.values() for row in shard_rows]
        return sorted(rows, key=lambda r: r.get("started_at") or 0.0)

    def snapshot(self, every_job: bool = False) -> RunSnapshot:
        records = latest_records(self.run)
        read_marker = lambda shard, path, stamp: _read_marker(path)
        markers = {
            shard: found[0] for shard, found in self._read_changed("done", ".json", None, read_marker).items()
        }
        waiting = {r.job_id: r for s, r in records.items() if every_job or s not in markers}  # one per job
        self._config = self._config or load_config(self.run.root / "config.yaml")
        try:
            states: dict[str, str] | None = live_states(self.run, list(waiting.values()), self._config)
            unknown = None
        except SchedulerUnavailable as err:
            states, unknown = None, str(err)
        return RunSnapshot(records, states, unknown, markers)

    def counts(self, snapshot: RunSnapshot) -> tuple[dict[str, int], list[float]]:
        """done / failed / running / pending videos of the whole run, and the done times known:
        markers for complete shards, manifest parts only for the shards still open."""
        open_shards = {shard for shard in range(self.num_shards()) if shard not in snapshot.markers}
        counts, done_times = self._open_shard_counts(snapshot, open_shards)
        for marker in snapshot.markers.values():
            counts["done"] += int(marker.get("done", 0))
            counts["failed"] += int(marker.get("failed", 0))
            if marker.get("last_done_at"):
                done_times.append(float(marker["last_done_at"]))
        return counts, done_times

    def _open_shard_counts(
        self, snapshot: RunSnapshot, open_shards: set[int]
    ) -> tuple[dict[str, int], list[float]]:
        """Per open shard, its parts' tallies merged: a video is done if any part says so, failed
        if a part since the shard's last manual submission says so for good and none says done."""
        counts = {"done": 0, "failed": 0, "pending": 0, "running": 0}
        if not open_shards:
            return counts, []
        sizes = self.shard_sizes()
        resets = manual_reset_times(self.run)
        tallies = self._read_changed("manifest", ".parquet", open_shards, self._tally)
        live = snapshot.live_shards()
        done_times = []
        for shard in sorted(open_shards):
            done_bits, failed, reset = 0, set(), resets.get(shard, 0.0)
            for tally in tallies.get(shard, ()):
                done_bits |= tally.done
                failed.update(index for index, at in tally.failed if at >= reset)
                if tally.last_done_at is not None:
                    done_times.append(tally.last_done_at)
            done = done_bits.bit_count()
            gave_up = sum(1 for index in failed if not done_bits >> index & 1)
            counts["done"] += done
            counts["failed"] += gave_up
            counts["running" if shard in live else "pending"] += int(sizes[shard]) - done - gave_up
        return counts, done_times


def run_status(run: RunDir) -> RunStatus:
    """Counts, rate, ETA, the per-shard job table, and why the run stopped if it did."""
    reader = RunReader(run)
    snapshot = reader.snapshot()
    num_shards = reader.num_shards()
    open_shards = [shard for shard in range(num_shards) if shard not in snapshot.markers]
    counts, done_times = reader.counts(snapshot)
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
    for row in reader.metrics_rows(set(open_shards)):
        entry = history.setdefault(int(row["shard"]), {"attempts": 0})
        entry |= {"attempts": entry["attempts"] + 1, "last_exit": row["exit_reason"]}
        entry |= {"last_exit_detail": row["exit_detail"], "last_exit_at": row["finished_at"]}
    for shard, marker in snapshot.markers.items():
        history[shard] = {key: marker.get(key) for key in ("attempts", "last_exit", "last_exit_detail")}
        history[shard]["failed"] = int(marker.get("failed", 0))
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
    stopped = why_stopped(run, snapshot, history, counts["failed"])
    return RunStatus(counts, rate, eta, table, snapshot.unknown, stopped)


def _shard_stop(
    shard: int,
    marker: dict[str, Any] | None,
    record: JobRecord | None,
    entry: dict[str, Any],
    final_state: Callable[[str], str | None] = lambda job_id: None,
) -> str:
    """Why one unfinished shard (no marker, or one that counts failed videos) is not running."""
    last, detail = entry.get("last_exit"), entry.get("last_exit_detail")
    last_text = f"{last}: {detail}" if detail else f"{last}"
    if marker is not None:
        failed = entry.get("failed", 0)
        if last not in (None, str(ExitReason.COMPLETED)):
            return f"shard {shard} gave up after {_attempts(entry)} (last: {last_text})"
        return f"shard {shard}: {failed} videos failed on every try (retry.max_prompt_attempts)"
    if record is None:
        return f"shard {shard} was never submitted"
    if last is None:  # no attempt: ask the scheduler how the job ended (cancelled outside hvbatch, ...)
        state = final_state(record.job_id)
        if state == "CANCELLED":
            return (
                f"shard {shard}: job {record.job_id} was cancelled before the shard started (the scheduler "
                "says CANCELLED: scancel or an administrator, not `hvbatch cancel`)"
            )
        said = f"; the scheduler says {state}" if state else ""
        return f"shard {shard}: job {record.job_id} ended before the shard started{said} (see its log)"
    if last == ExitReason.CANCELLED:
        at = entry.get("last_exit_at")
        when = time.strftime(" at %Y-%m-%d %H:%M:%S %Z", time.localtime(at)) if at else ""
        return f"shard {shard} cancelled by the user{when} ({detail})"
    if last == ExitReason.RUNNING:
        return f"shard {shard}: job {record.job_id} ended without a report (lost; see its log)"
    if _outside_the_videos(last):
        return (
            f"shard {shard} stopped after {_attempts(entry)}, its videos not charged (last: {last_text}); "
            "fix that, then retry"
        )
    return f"shard {shard} stopped after {_attempts(entry)} (last: {last_text})"


def _outside_the_videos(reason: str | None) -> bool:
    try:
        return ExitReason(reason).outside_the_videos
    except ValueError:
        return False


def _attempts(entry: dict[str, Any]) -> str:
    n = int(entry.get("attempts") or 0)
    return f"{n} attempt{'s' if n != 1 else ''}"


def why_stopped(
    run: RunDir, snapshot: RunSnapshot, history: dict[int, dict[str, Any]], failed_videos: int
) -> list[str]:
    """Lines saying why a run with no live job is not complete, and what to do; [] otherwise."""
    if snapshot.states is None or snapshot.live_shards():
        return []
    probe, asked = RunProbe(run), [0]

    def final_state(job_id: str) -> str | None:  # the scheduler is asked for the lines shown only
        asked[0] += 1
        return probe.final_state(job_id) if asked[0] <= MAX_STOP_LINES else None

    causes = [
        _shard_stop(shard, snapshot.markers.get(shard), record, history.get(shard, {}), final_state)
        for shard in range(run.num_shards())
        if shard not in snapshot.markers or snapshot.markers[shard].get("failed", 0)
        for record in (snapshot.records.get(shard),)
    ]
    if not causes:
        return []
    lines = [f"stopped: {cause}" for cause in causes[:MAX_STOP_LINES]]
    if len(causes) > MAX_STOP_LINES:
        lines.append(f"stopped: ... and {len(causes) - MAX_STOP_LINES} more shards (`hvbatch status --json`)")
    hint = f"waiting for retry: run `hvbatch retry {run.root}`"
    if failed_videos:
        hint += f" (`hvbatch manifest {run.root} --failed` lists the {failed_videos} failed videos)"
    return [*lines, hint]


def format_status(run: RunDir, status: RunStatus) -> str:
    c = status.counts
    total = sum(c.values())
    rate = f"{status.videos_per_hour:.1f} videos/hour" if status.videos_per_hour else "no video done yet"
    left = c["pending"] + c["running"]
    eta = "" if status.eta_seconds is None or not left else f", ETA {format_duration(status.eta_seconds)}"
    warning = [f"warning: job states unknown ({status.scheduler_error})"] if status.scheduler_error else []
    lines = [
        *warning,
        f"run {run.root}: {total} videos: {c['done']} done, {c['failed']} failed, {c['running']} running, "
        f"{c['pending']} pending; {rate}{eta}",
        *status.stopped,
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
