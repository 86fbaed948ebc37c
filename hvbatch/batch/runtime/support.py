"""Pieces of the shard job: identity, layout, the video commit, manifest rows, metrics, watchdog."""

from __future__ import annotations

import faulthandler
import logging
import os
import resource
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from hvbatch.batch.attempt import EXIT_STALLED, AttemptKey, RankErrorKind, VideoStatus
from hvbatch.batch.files import fsync_dir, fsync_file, write_parquet_atomic
from hvbatch.batch.ledger import record_rank_error
from hvbatch.batch.rundir import MANIFEST_SCHEMA, RunDir
from hvbatch.batch.runtime.faults import VideoFaults
from hvbatch.batch.summaries import shard_index, write_part_summary
from hvbatch.batch.videos import sampling_for
from hvbatch.config import Config, VideoConfig
from hvbatch.parallel.dims import ParallelDims
from hvbatch.parallel.launch import DistEnv
from hvbatch.parallel.plan import plan_for_job
from hvbatch.text import printable
from hvbatch.video import encode_mp4

logger = logging.getLogger(__name__)
PROCESS_START = time.time()
ATTEMPT_KEY_VAR = "HVBATCH_ATTEMPT_KEY"
SEGMENT_ROWS = 64


@dataclass(frozen=True)
class JobIdentity:
    job_id: str
    array_index: int | None
    key: AttemptKey

    @classmethod
    def from_environment(cls) -> JobIdentity:
        env = os.environ
        if "SLURM_ARRAY_JOB_ID" in env:
            job_id = f"{env['SLURM_ARRAY_JOB_ID']}_{env.get('SLURM_ARRAY_TASK_ID', '0')}"
        else:
            job_id = env.get("SLURM_JOB_ID") or env.get("SUBMITIT_LOCAL_JOB_ID") or f"pid{os.getpid()}"
        array_index = int(env["SLURM_ARRAY_TASK_ID"]) if "SLURM_ARRAY_TASK_ID" in env else None
        # A retry gets a new job id; a Slurm requeue keeps it and bumps the restart count; the local
        # supervisor names each of its attempts itself.
        if env.get(ATTEMPT_KEY_VAR):
            key = AttemptKey.parse(env[ATTEMPT_KEY_VAR])
        else:
            key = AttemptKey.slurm(job_id, int(env.get("SLURM_RESTART_COUNT", "0")))
        return cls(key.job_id, array_index, key)


@dataclass
class ShardProgress:
    """The leader's manifest rows of this attempt, in segments of `SEGMENT_ROWS` videos.

    Each change rewrites only the current segment, so a dp group of thousands of videos writes
    O(videos) rows in all, not O(videos^2). Thread-safe: the background mp4 writer records the
    videos it wrote while the job's thread records the next ones.
    """

    run: RunDir
    shard: int
    key: AttemptKey
    dp_index: int
    leader: bool
    segment: int = 0
    rows: dict[str, dict[str, Any]] = field(default_factory=dict)
    seconds: list[float] = field(default_factory=list)
    first_step_at: float | None = None
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    index_of: dict[str, int] | None = field(default=None, repr=False)
    """Each video's index in the shard file (for the parts' summaries), read at the first write."""

    def put(self, video_id: str, row: dict[str, Any]) -> None:
        with self.lock:
            self._put(video_id, row)

    def _put(self, video_id: str, row: dict[str, Any]) -> None:
        if video_id not in self.rows and len(self.rows) >= SEGMENT_ROWS:
            self.segment, self.rows = self.segment + 1, {}
        # A video tried twice in one attempt keeps both rows: the earlier one under a suffixed key.
        if video_id in self.rows and self.rows[video_id]["status"] != VideoStatus.STARTED:
            self.rows[f"{video_id}\0{len(self.rows)}"] = self.rows.pop(video_id)
        self.rows[video_id] = row
        self._write()

    def drop(self, video_id: str) -> None:
        with self.lock:
            self.rows.pop(video_id, None)
            self._write()

    def _write(self) -> None:
        if self.leader:
            path = self.run.manifest_part(self.shard, str(self.key), self.dp_index, self.segment)
            table = pa.Table.from_pylist(list(self.rows.values()), schema=MANIFEST_SCHEMA)
            write_parquet_atomic(path, table)
            if self.index_of is None:
                self.index_of = shard_index(self.run.read_shard(self.shard)["video_id"].to_pylist())
            write_part_summary(path, table, self.index_of)


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def choose_layout(config: Config, videos: pa.Table, env: DistEnv | None) -> ParallelDims:
    """The planner's layout for this job's GPUs, sized for the shard's largest video."""
    world = env.world_size if env else 1
    local = env.local_world_size if env else 1
    largest = max(range(videos.num_rows), key=lambda i: videos["cost"][i].as_py())
    sampling = sampling_for(videos.slice(largest, 1).to_pylist()[0], config.sampling)
    dims = plan_for_job(config, sampling, local, max(1, world // local)).dims(world)
    dims.validate(config.model.transformer.num_heads)
    return dims


def commit_video(
    run: RunDir,
    video_id: str,
    frames: np.ndarray,
    video: VideoConfig,
    key: AttemptKey,
    faults: VideoFaults | None,
) -> bool:
    """Encode to an attempt-unique temporary file, fsync it, then hard-link it to the final name.

    False when another attempt committed the video first (the link refuses to replace a file).
    """
    final = run.video_path(video_id)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.stem}.{key}.{os.getpid()}.tmp.mp4")
    try:
        encode_mp4(frames, tmp, video)
        if faults is not None:
            faults.at_write()
        fsync_file(tmp)  # a node crash must never leave a short file under the final name
        try:
            os.link(tmp, final)
        except FileExistsError:
            logger.warning("video %s was committed by another attempt; keeping that one", printable(video_id))
            return False
        except OSError:  # no hard links on this filesystem: rename, unless the final name exists
            if final.exists():
                return False
            os.replace(tmp, final)
        fsync_dir(final.parent)
        return True
    finally:
        tmp.unlink(missing_ok=True)


def manifest_row(video: dict[str, Any], shard: int, key: AttemptKey, **result: Any) -> dict[str, Any]:
    row = {name: video.get(name) for name in MANIFEST_SCHEMA.names}
    row |= {"shard": shard, "job_id": key.job_id, "attempt_key": str(key)}
    row |= {"finished_at": time.time(), "path": None, "error": None}
    row |= {
        k: (str(v) if isinstance(v, VideoStatus) else v)
        for k, v in result.items()
        if k in MANIFEST_SCHEMA.names
    }
    return row


def recover_orphans(run: RunDir, shard: int, key: AttemptKey) -> None:
    """A final mp4 without a done row (its attempt died between the link and the row): record it."""
    rows = run.manifest_rows(shard)
    done = {r["video_id"] for r in rows.to_pylist() if r["status"] == VideoStatus.DONE}
    videos = run.read_shard(shard).to_pylist()
    orphans = [
        video
        for video in videos
        if video["video_id"] not in done and run.video_path(video["video_id"]).is_file()
    ]
    if not orphans:
        return
    recovered = [
        manifest_row(
            video,
            shard,
            key,
            status=VideoStatus.DONE,
            attempt=1,
            final=False,
            seconds=None,
            path=str(run.video_path(video["video_id"]).relative_to(run.root)),
        )
        for video in orphans
    ]
    path = run.manifest_part(shard, str(key), 0, suffix="recovered")
    table = pa.Table.from_pylist(recovered, schema=MANIFEST_SCHEMA)
    write_parquet_atomic(path, table)
    write_part_summary(path, table, shard_index([video["video_id"] for video in videos]))


class Watchdog:
    """Ends the process if no progress is reported for `timeout_s` (a hang outside collectives)."""

    def __init__(self, timeout_s: float, run: RunDir, key: AttemptKey, rank: int) -> None:
        self.timeout_s = timeout_s
        self.run, self.key, self.rank = run, key, rank
        self.last = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="hvbatch-watchdog", daemon=True)

    def touch(self) -> None:
        self.last = time.monotonic()

    def start(self) -> None:
        self.touch()
        if self.timeout_s > 0:
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(min(10.0, self.timeout_s / 4)):
            idle = time.monotonic() - self.last
            if idle > self.timeout_s:
                message = f"no progress for {idle:.0f} s (retry.stall_timeout_s={self.timeout_s:g})"
                record_rank_error(self.run, self.key, self.rank, RankErrorKind.STALLED, message)
                print(f"hvbatch: rank {self.rank}: {message}; stacks follow", file=sys.stderr, flush=True)
                faulthandler.dump_traceback(all_threads=True)
                os._exit(EXIT_STALLED)
