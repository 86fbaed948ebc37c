"""Pieces of the shard job: identity, layout, the video commit and its checks, manifest rows, watchdog."""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import os
import re
import resource
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pyarrow as pa
import torch

from hvbatch.batch.attempt import EXIT_STALLED, AttemptKey, RankErrorKind, VideoStatus
from hvbatch.batch.files import (
    PRIVATE_DIR_MODE,
    TMP_SUFFIX,
    make_dirs,
    write_exclusive,
    write_json_atomic,
    write_parquet_atomic,
)
from hvbatch.batch.ledger import record_rank_error
from hvbatch.batch.rundir import MANIFEST_SCHEMA, RunDir, shard_name
from hvbatch.batch.runtime.faults import VideoFaults
from hvbatch.batch.summaries import shard_index, write_part_summary
from hvbatch.batch.videos import sampling_for
from hvbatch.config import Config, SamplingConfig, VideoConfig
from hvbatch.models.family import ModelFamily
from hvbatch.mp4_check import InvalidVideo, check_mp4, check_mp4_file
from hvbatch.parallel.dims import ParallelDims
from hvbatch.parallel.launch import DistEnv
from hvbatch.parallel.plan import layout_for_job
from hvbatch.text import printable
from hvbatch.video import encode_mp4

logger = logging.getLogger(__name__)
PROCESS_START = time.time()
ATTEMPT_KEY_VAR = "HVBATCH_ATTEMPT_KEY"
SEGMENT_ROWS = 64
DEFAULT_WARM_UP_TEXT_TOKENS = 77
"""Text tokens of the compile warm-up: any length (the text length is a dynamic dimension)."""


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


def warm_up_inputs(
    transformer: Any, family: ModelFamily, sampling: SamplingConfig, batch: int, device: torch.device
) -> tuple[Any, ...]:
    """The model's call for a video of `sampling` (values meaningless): what the compile warm-up runs
    before the first collective. Shapes from the family: its latent geometry and an example
    conditioning (`ModelFamily.example_conditioning`), with the video's settings."""
    shape = family.geometry.latent_shape(sampling.height, sampling.width, sampling.num_frames)
    x = torch.zeros(batch, *shape, device=device, dtype=transformer.compute_dtype)
    t = torch.full((batch,), 900.0, device=device)
    cond = family.example_conditioning(transformer.config, batch, DEFAULT_WARM_UP_TEXT_TOKENS, device)
    return x, t, cond.for_sampling(sampling), torch.full((batch,), 800.0, device=device)


def take_attention_fallbacks(transformer: Any) -> dict[str, int]:
    """Calls whose attention kernel fell back since the last call, by reason, over the kernels this
    rank's model used (the counts are reset: each shard reports its own)."""
    model = getattr(transformer, "model", transformer)
    inner = getattr(transformer, "inner", None)
    candidates = [getattr(model.attention_fn, "backend", None), getattr(transformer, "attention", None)]
    candidates += [getattr(inner, "attention", None)]
    backends = {id(b): b for b in (getattr(c, "backend", c) for c in candidates) if b is not None}
    total: dict[str, int] = {}
    for backend in backends.values():
        for reason, count in getattr(backend, "fallbacks", {}).items():
            total[reason] = total.get(reason, 0) + count
        if hasattr(backend, "fallbacks"):
            backend.fallbacks.clear()
    return total


def choose_layout(config: Config, videos: pa.Table, env: DistEnv | None) -> ParallelDims:
    """The planner's layout for this job's GPUs, sized for the shard's largest video."""
    largest = max(range(videos.num_rows), key=lambda i: videos["cost"][i].as_py())
    sampling = sampling_for(videos.slice(largest, 1).to_pylist()[0], config.sampling)
    world = env.world_size if env else 1
    return layout_for_job(config, sampling, world, env.local_world_size if env else 1)


def commit_video(
    run: RunDir,
    video_id: str,
    frames: np.ndarray,
    video: VideoConfig,
    key: AttemptKey,
    faults: VideoFaults | None,
) -> bool:
    """Encode to an attempt-unique temporary file, fsync it, read it back whole (`check_mp4`: every
    frame, the size), then hard-link it to the final name. A failed, killed or short encode raises
    (the video fails and is retried) and leaves no final name; a full disk raises OSError(ENOSPC).

    False when another attempt committed the video first (the link refuses to replace a file).
    """
    num_frames, height, width = frames.shape[:3]

    def encode(handle: BinaryIO) -> None:
        if faults is not None:
            faults.at_write()
        encode_mp4(frames, handle, video)

    def check(handle: BinaryIO) -> None:
        check_mp4(handle, frames=num_frames, width=width, height=height)

    committed = write_exclusive(run.video_path(video_id), encode, tag=str(key), check=check)
    if not committed:
        logger.warning("video %s was committed by another attempt; keeping that one", printable(video_id))
    return committed


def accept_final(run: RunDir, video: dict[str, Any], sampling: SamplingConfig, key: AttemptKey) -> bool:
    """Whether the video's final mp4 exists and is whole; one that is not is moved to quarantine/."""
    path = run.video_path(video["video_id"])
    try:
        check_mp4_file(path, frames=sampling.num_frames, width=sampling.width, height=sampling.height)
        return True
    except FileNotFoundError:
        return False
    except (InvalidVideo, OSError) as err:
        if not os.path.lexists(path):
            return False
        moved = quarantine(run, path, f"{type(err).__name__}: {err}", key)
        logger.warning(
            "video %s: its mp4 is not whole (%s); moved to %s", printable(video["video_id"]), err, moved
        )
        return False


def remove_dead_temporaries(run: RunDir, shard: int, videos: list[str], live_keys: set[str]) -> list[Path]:
    """Temporary files of the shard left by attempts that have ended (killed mid-write): hidden
    temporary mp4s in videos/ and the ledger's temporaries in manifest/ and metrics/. Those of
    attempts in `live_keys` (this one, a straggler still running) are kept."""
    removed = []
    names = {run.video_path(video_id).name for video_id in videos}
    for folder in ("videos", "manifest", "metrics"):
        for path in _hidden_temporaries(run.root / folder):
            owner = _temporary_owner(path.name, names if folder == "videos" else None, shard)
            if owner is not None and owner not in live_keys:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                    removed.append(path)
    return removed


def _hidden_temporaries(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return [
        folder / e.name for e in os.scandir(folder) if e.name.startswith(".") and e.name.endswith(TMP_SUFFIX)
    ]


_KEY_IN_NAME = re.compile(r"(job[^.\s]+\.[ra]\d+)\.")


def _temporary_owner(name: str, videos: set[str] | None, shard: int) -> str | None:
    """The attempt key a temporary file of this shard belongs to, or None (another shard's, or unknown)."""
    if videos is not None:  # `.<video file>.<key>.<host>.<pid>.<random>.tmp`
        video = next((v for v in videos if name.startswith(f".{v}.")), None)
        match = _KEY_IN_NAME.match(name, len(video) + 2) if video else None
    else:  # `.shard-NNNNN.<key>.<rest of the part's name>.<host>.<pid>.<random>.tmp`
        prefix = f".{shard_name(shard)}."
        match = _KEY_IN_NAME.match(name, len(prefix)) if name.startswith(prefix) else None
    return match.group(1) if match else None


def quarantine(run: RunDir, path: Path, reason: str, key: AttemptKey) -> Path:
    """Move a run file that must not count (an mp4 that is not whole) to quarantine/, with a
    `<name>.json` record of where it was and why."""
    target = run.root / "quarantine" / f"{path.name}.{key}.{int(time.time())}{path.suffix}"
    make_dirs(target.parent, PRIVATE_DIR_MODE)
    os.replace(path, target)
    record = {"file": str(path.relative_to(run.root)), "reason": reason, "attempt_key": str(key)}
    write_json_atomic(target.with_name(f"{target.name}.json"), record | {"at": time.time()})
    return target


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


def recover_orphans(run: RunDir, shard: int, key: AttemptKey, defaults: SamplingConfig) -> None:
    """A final mp4 without a done row (its attempt died between the link and the row): record it
    if it is whole, else move it to quarantine/ (the video is made again)."""
    rows = run.manifest_rows(shard)
    done = {r["video_id"] for r in rows.to_pylist() if r["status"] == VideoStatus.DONE}
    videos = run.read_shard(shard).to_pylist()
    orphans = [
        video
        for video in videos
        if video["video_id"] not in done
        and os.path.lexists(run.video_path(video["video_id"]))
        and accept_final(run, video, sampling_for(video, defaults), key)
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
