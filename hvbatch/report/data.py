"""What the report shows, read once from the run directory with the readers `hvbatch status` uses."""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from hvbatch.batch.attempt import VideoStatus
from hvbatch.batch.control.status import RunSnapshot, run_status, video_table
from hvbatch.batch.rundir import RunDir

ATTEMPT_FIELDS = (
    "shard", "job_id", "attempt", "attempt_key", "node", "gpu_type", "world_size", "dp", "ulysses",
    "ring", "exit_reason", "exit_detail", "started_at", "finished_at", "wall_seconds", "gpu_seconds",
)  # fmt: skip


@dataclass
class ReportData:
    """A run as the page sees it: one dict per video and per job attempt, plus the run's totals.

    A video's `gpu_seconds` sums, over every manifest row of it (failed tries too), its seconds
    times the ranks of the dp replica that made it (`world_size / dp` of that attempt); model
    loading and waits between videos belong to no video. `href` is the mp4 relative to the page.
    """

    root: str
    created_at: float
    generated_at: float
    num_shards: int
    counts: dict[str, int]
    videos_per_hour: float | None
    videos: list[dict[str, Any]] = field(default_factory=list)
    attempts: list[dict[str, Any]] = field(default_factory=list)

    def done_times(self) -> list[float]:
        return sorted(v["done_at"] for v in self.videos if v["done_at"] is not None)

    def slow_threshold(self) -> float | None:
        """The 90th percentile of the done videos' seconds (the page's default "slow" bar)."""
        seconds = sorted(v["seconds"] for v in self.videos if v["status"] == "done" and v["seconds"])
        if len(seconds) < 2:
            return seconds[0] if seconds else None
        return statistics.quantiles(seconds, n=10, method="inclusive")[-1]

    def summary(self) -> dict[str, Any]:
        gpu = [v["gpu_seconds"] for v in self.videos if v["status"] == "done" and v["gpu_seconds"]]
        total_gpu = sum(a["gpu_seconds"] or 0.0 for a in self.attempts)
        exits: dict[str, int] = {}
        for attempt in self.attempts:
            exits[attempt["exit_reason"]] = exits.get(attempt["exit_reason"], 0) + 1
        return {
            "videos": len(self.videos),
            "counts": self.counts,
            "videos_per_hour": self.videos_per_hour,
            "attempts": len(self.attempts),
            "exit_reasons": exits,
            "gpu_seconds_total": total_gpu,
            "gpu_seconds_per_done_video": statistics.fmean(gpu) if gpu else None,
            "gpu_seconds_median": statistics.median(gpu) if gpu else None,
            "slow_threshold": self.slow_threshold(),
        }


def _ranks_per_replica(attempts: list[dict[str, Any]]) -> dict[tuple[int, str], int]:
    ranks = {}
    for row in attempts:
        world, dp = row.get("world_size") or 1, row.get("dp") or 1
        ranks[(int(row["shard"]), row["attempt_key"])] = max(1, int(world) // max(1, int(dp)))
    return ranks


def _per_video_times(run: RunDir, attempts: list[dict[str, Any]]) -> dict[str, tuple[float, float | None]]:
    """video id -> (GPU-seconds over all its tries, when its done row was written)."""
    ranks = _ranks_per_replica(attempts)
    columns = ["video_id", "shard", "attempt_key", "status", "seconds", "finished_at"]
    found: dict[str, tuple[float, float | None]] = {}
    for row in run.manifest_rows().select(columns).to_pylist():
        gpu, done_at = found.get(row["video_id"], (0.0, None))
        if row["status"] != VideoStatus.STARTED:
            gpu += (row["seconds"] or 0.0) * ranks.get((int(row["shard"]), row["attempt_key"]), 1)
        if row["status"] == VideoStatus.DONE:
            done_at = row["finished_at"]
        found[row["video_id"]] = (gpu, done_at)
    return found


def collect(run: RunDir, page: Path) -> ReportData:
    """Everything the page at `page` shows (thumbnails are added by `thumbnails.add_thumbnails`)."""
    run.require()
    snapshot = RunSnapshot.take(run)
    status = run_status(run)
    attempts = [{key: row.get(key) for key in ATTEMPT_FIELDS} for row in run.metrics_rows()]
    times = _per_video_times(run, attempts)
    videos = []
    for row in video_table(run, snapshot).to_pylist():
        gpu, done_at = times.get(row["video_id"], (0.0, None))
        href = None
        if row["path"]:
            href = quote(Path(os.path.relpath(run.root / row["path"], page.parent)).as_posix())
        videos.append(
            {
                "id": row["video_id"],
                "prompt": row["prompt"],
                "seed": row["seed"],
                "shard": row["shard"],
                "status": row["status"],
                "attempts": row["attempts"],
                "seconds": row["seconds"],
                "gpu_seconds": gpu or None,
                "done_at": done_at if row["status"] == "done" else None,
                "error": row["error"],
                "path": row["path"],
                "href": href,
                "thumb": None,
                "image_source": row.get("image_source"),
                "image_path": row.get("image_path"),
                "input_thumb": None,
            }
        )
    return ReportData(
        root=str(run.root),
        created_at=float(run.read_run()["created_at"]),
        generated_at=time.time(),
        num_shards=run.num_shards(),
        counts=status.counts,
        videos_per_hour=status.videos_per_hour,
        videos=videos,
        attempts=attempts,
    )
