"""Pieces of the shard job: identity, layout, the video commit, manifest rows, metrics, watchdog."""

from __future__ import annotations

import dataclasses
import faulthandler
import logging
import os
import resource
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from hvbatch.batch.attempts import EXIT_STALLED, METRICS_SCHEMA, record_rank_error
from hvbatch.batch.faults import VideoFaults
from hvbatch.batch.rundir import MANIFEST_SCHEMA, RunDir, write_parquet_atomic
from hvbatch.config import Config, SamplingConfig, VideoConfig
from hvbatch.parallel.dims import ParallelDims
from hvbatch.parallel.launch import DistEnv
from hvbatch.plan_cli import plan_for_config
from hvbatch.video import encode_mp4

if TYPE_CHECKING:
    from hvbatch.batch.job import ShardContext

logger = logging.getLogger(__name__)
PROCESS_START = time.time()
ATTEMPT_KEY_VAR = "HVBATCH_ATTEMPT_KEY"


@dataclass
class JobIdentity:
    job_id: str
    array_index: int | None
    restart: int
    attempt_key: str

    @classmethod
    def from_environment(cls) -> JobIdentity:
        env = os.environ
        if "SLURM_ARRAY_JOB_ID" in env:
            job_id = f"{env['SLURM_ARRAY_JOB_ID']}_{env.get('SLURM_ARRAY_TASK_ID', '0')}"
        else:
            job_id = env.get("SLURM_JOB_ID") or env.get("SUBMITIT_LOCAL_JOB_ID") or f"pid{os.getpid()}"
        restart = int(env.get("SLURM_RESTART_COUNT", "0"))
        array_index = int(env["SLURM_ARRAY_TASK_ID"]) if "SLURM_ARRAY_TASK_ID" in env else None
        # A retry gets a new job id; a Slurm requeue keeps it and bumps the restart count; the local
        # supervisor names each of its attempts itself.
        key = env.get(ATTEMPT_KEY_VAR) or f"job{job_id}.r{restart}"
        return cls(job_id, array_index, restart, key)


@dataclass
class ShardProgress:
    """The leader's rows of this attempt (rewritten as one part after every change) and timings."""

    part: Path | None
    rows: dict[str, dict[str, Any]] = field(default_factory=dict)
    seconds: list[float] = field(default_factory=list)
    first_step_at: float | None = None

    def put(self, video_id: str, row: dict[str, Any]) -> None:
        # A video tried twice in one attempt keeps both rows: the earlier one under a suffixed key.
        if video_id in self.rows and self.rows[video_id]["status"] != "started":
            self.rows[f"{video_id}\0{len(self.rows)}"] = self.rows.pop(video_id)
        self.rows[video_id] = row
        self._write()

    def drop(self, video_id: str) -> None:
        self.rows.pop(video_id, None)
        self._write()

    def _write(self) -> None:
        if self.part is not None:
            table = pa.Table.from_pylist(list(self.rows.values()), schema=MANIFEST_SCHEMA)
            write_parquet_atomic(self.part, table)

    def peak_memory_bytes(self, device: torch.device) -> int:
        if device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(device))
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def sampling_for(video: dict[str, Any], defaults: SamplingConfig) -> SamplingConfig:
    keys = (
        "seed",
        "height",
        "width",
        "num_frames",
        "num_inference_steps",
        "guidance_scale",
        "flow_shift",
        "negative_prompt",
    )
    return dataclasses.replace(defaults, **{k: video[k] for k in keys if video.get(k) is not None})


def choose_layout(config: Config, videos: pa.Table, env: DistEnv | None) -> ParallelDims:
    """The planner's layout for this job's GPUs, sized for the shard's largest video."""
    world = env.world_size if env else 1
    local = env.local_world_size if env else 1
    config = dataclasses.replace(
        config,
        parallel=dataclasses.replace(config.parallel, gpus_per_node=local, num_nodes=max(1, world // local)),
    )
    largest = max(range(videos.num_rows), key=lambda i: videos["cost"][i].as_py())
    plan = plan_for_config(config, sampling_for(videos.slice(largest, 1).to_pylist()[0], config.sampling))
    dims = plan.dims(world)
    dims.validate(config.model.transformer.num_heads)
    return dims


def commit_video(
    run: RunDir,
    video_id: str,
    frames: np.ndarray,
    video: VideoConfig,
    attempt_key: str,
    faults: VideoFaults | None,
) -> bool:
    """Encode to an attempt-unique temporary file, then hard-link it to the final name.

    False when another attempt committed the video first (the link refuses to replace a file).
    """
    final = run.video_path(video_id)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.stem}.{attempt_key}.{os.getpid()}.tmp.mp4")
    try:
        encode_mp4(frames, tmp, video)
        if faults is not None:
            faults.at_write()
        try:
            os.link(tmp, final)
        except FileExistsError:
            logger.warning("video %s was committed by another attempt; keeping that one", video_id)
            return False
        except OSError:  # no hard links on this filesystem: rename, unless the final name exists
            if final.exists():
                return False
            os.replace(tmp, final)
        return True
    finally:
        tmp.unlink(missing_ok=True)


def manifest_row(video: dict[str, Any], ctx: ShardContext, **result: Any) -> dict[str, Any]:
    row = {name: video.get(name) for name in MANIFEST_SCHEMA.names}
    row.update(shard=ctx.shard, job_id=ctx.identity.job_id, attempt_key=ctx.identity.attempt_key)
    row.update(finished_at=time.time(), path=None, error=None)
    row.update({k: v for k, v in result.items() if k in MANIFEST_SCHEMA.names})
    return row


def recover_orphans(ctx: ShardContext) -> None:
    """A final mp4 without a done row (its attempt died between the link and the row): record it."""
    rows = ctx.run.manifest_rows(ctx.shard)
    done = set(rows.filter(pc.equal(rows["status"], "done"))["video_id"].to_pylist())
    orphans = [
        video
        for video in ctx.run.read_shard(ctx.shard).to_pylist()
        if video["video_id"] not in done and ctx.run.video_path(video["video_id"]).is_file()
    ]
    if not orphans:
        return
    recovered = [
        manifest_row(
            video,
            ctx,
            status="done",
            attempt=1,
            final=False,
            seconds=None,
            path=str(ctx.run.video_path(video["video_id"]).relative_to(ctx.run.root)),
        )
        for video in orphans
    ]
    path = ctx.run.root / "manifest" / f"{ctx.run.manifest_part(ctx.shard, ctx.identity.attempt_key, 0).stem}"
    write_parquet_atomic(
        path.with_name(path.name + ".recovered.parquet"),
        pa.Table.from_pylist(recovered, schema=MANIFEST_SCHEMA),
    )


def write_metrics(
    ctx: ShardContext, progress: ShardProgress, load_seconds: float, peaks: list[int], exit_reason: str
) -> None:
    dims, identity, device = ctx.groups.dims, ctx.identity, ctx.pipeline.device
    wall = time.time() - PROCESS_START
    row = {
        "job_id": identity.job_id,
        "array_index": identity.array_index,
        "attempt": ctx.attempt,
        "attempt_key": identity.attempt_key,
        "shard": ctx.shard,
        "node": socket.gethostname(),
        "gpu_type": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "world_size": dims.world_size,
        "dp": dims.dp,
        "ulysses": dims.ulysses,
        "ring": dims.ring,
        "load_seconds": load_seconds,
        "seconds_to_first_step": (progress.first_step_at - PROCESS_START) if progress.first_step_at else None,
        "prompt_seconds": progress.seconds,
        "wall_seconds": wall,
        "gpu_seconds": wall * dims.world_size,
        "peak_memory_bytes": peaks,
        "exit_reason": exit_reason,
        "exit_detail": None,
        "started_at": _started_at(ctx),
        "finished_at": time.time(),
    }
    write_parquet_atomic(
        ctx.run.metrics_part(ctx.shard, identity.attempt_key),
        pa.Table.from_pylist([row], schema=METRICS_SCHEMA),
    )


def _started_at(ctx: ShardContext) -> float:
    path = ctx.run.metrics_part(ctx.shard, ctx.identity.attempt_key)
    if path.is_file():
        import pyarrow.parquet as pq

        started = pq.read_table(path, columns=["started_at"])["started_at"][0].as_py()
        if started:
            return float(started)
    return time.time()


def interruption_reason(elapsed_s: float, time_min: float, signal_delay_s: float) -> str:
    """USR2 near the walltime is the walltime warning; earlier it is preemption."""
    # Slurm may send the signal up to a minute before the requested lead time.
    return "walltime" if elapsed_s >= time_min * 60.0 - signal_delay_s - 90.0 else "preempted"


class Watchdog:
    """Ends the process if no progress is reported for `timeout_s` (a hang outside collectives)."""

    def __init__(self, timeout_s: float, run: RunDir, attempt_key: str, rank: int) -> None:
        self.timeout_s = timeout_s
        self.run, self.attempt_key, self.rank = run, attempt_key, rank
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
                record_rank_error(self.run, self.attempt_key, self.rank, "stalled", message)
                print(f"hvbatch: rank {self.rank}: {message}; stacks follow", file=sys.stderr, flush=True)
                faulthandler.dump_traceback(all_threads=True)
                os._exit(EXIT_STALLED)
