"""The shard job: every rank of one node job runs `run_shards_job(run_dir, shards)`.

Ranks come from the submitit / Slurm / torchrun environment. The job loads the model once; per
shard it chooses the planner's layout (dp groups x ulysses x ring), parallelizes the model for it,
and each dp group works through its share of the shard's videos in file order, skipping those
already done. The group encodes its videos' prompts a window at a time (`batch.encode_window`),
the text encoders off the GPU in between. Per video the group's leader writes a `started` row,
then its background writer (`writer.py`) the mp4 (attempt-unique temporary name, hard-linked to
its final name) while the next video denoises, then the `done` or `failed` row. A video that fails
on any rank fails for the whole group; a failed video is tried again, in this job, until
`retry.max_prompt_attempts`.

Process groups are made once per member set for the whole job (`ProcessGroups`): a shard whose
layout an earlier shard had reuses its groups. With `model.compile`, each shard first compiles
its blocks with no collective (`runner.warm_up`) and the ranks meet through the heartbeat store,
so uneven compile times never land inside a collective's timeout.

The video's ranks share its VAE decode (`hvbatch.parallel.vae_decode`; the leader gets the frames).
Every wait between ranks outside the denoising loop and that decode (the group agreeing after a
video, the leader draining its writer, dp replicas meeting at the end of a shard) goes through
`hvbatch.parallel.liveness`: no deadline while the peers' heartbeats come, an error as soon as one
stops. A failure of the group itself (a collective that times out, a rank that dies) ends the
attempt: the error is recorded and the process exits non-zero.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import socket
import time
import traceback
from datetime import timedelta
from typing import Any

import torch

from hvbatch.batch import ledger
from hvbatch.batch.attempt import AttemptKey, ExitReason, RankErrorKind, VideoStatus
from hvbatch.batch.files import is_disk_full
from hvbatch.batch.ledger import VideoHistory, record_rank_error, video_histories
from hvbatch.batch.rundir import RunDir, shard_name
from hvbatch.batch.runtime.faults import FaultInjector, VideoFaults
from hvbatch.batch.runtime.inputs import encode_apart, take_image, window_images
from hvbatch.batch.runtime.support import (
    PROCESS_START,
    JobIdentity,
    ShardProgress,
    Watchdog,
    accept_final,
    choose_layout,
    commit_video,
    manifest_row,
    peak_memory_bytes,
    recover_orphans,
    remove_dead_temporaries,
    take_attention_fallbacks,
    warm_up_inputs,
)
from hvbatch.batch.runtime.writer import COMMITTED_ELSEWHERE, VideoWriter, WriteOutcome, WriteRequest
from hvbatch.batch.videos import sampling_for
from hvbatch.config import Config, load_config
from hvbatch.models.encoding import PromptStore
from hvbatch.parallel.dims import ParallelDims, ParallelGroups, ProcessGroups
from hvbatch.parallel.launch import DistEnv, RankSetup, dist_env_from, setup_rank, teardown_rank
from hvbatch.parallel.liveness import Liveness, PeerLostError, StoreLostError
from hvbatch.parallel.runner import warm_up
from hvbatch.pipeline import Pipeline, Timings
from hvbatch.process import process_age_s
from hvbatch.text import printable

logger = logging.getLogger(__name__)
PROMPT_ERRORS = (ValueError, RuntimeError, FloatingPointError, OSError, torch.cuda.OutOfMemoryError)
COMMUNICATION_MARKERS = ("timed out", "timeout", "connection closed", "connection reset", "broken pipe")


def is_communication_error(err: BaseException) -> bool:
    """A failed or timed-out collective: the group is unusable and the attempt must end."""
    import torch.distributed as dist

    if isinstance(err, (dist.DistError, PeerLostError)):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and any(m in text for m in (*COMMUNICATION_MARKERS, "nccl", "gloo"))


class ModelLoadError(RuntimeError):
    """The model could not be loaded (weights missing, corrupt or too large): no video's fault."""


PORT_FAILURE_MARKERS = ("eaddrinuse", "address already in use", "eaddrnotavail", "failed to bind")


def is_port_failure(err: BaseException) -> bool:
    """The job's rendezvous port could not be bound (another process holds it)."""
    if isinstance(err, OSError) and err.errno in (errno.EADDRINUSE, errno.EADDRNOTAVAIL):
        return True
    return any(marker in str(err).lower() for marker in PORT_FAILURE_MARKERS)


def error_kind(err: BaseException) -> RankErrorKind:
    text = str(err).lower()
    if is_disk_full(err):
        return RankErrorKind.DISK_FULL
    if isinstance(err, ModelLoadError):
        return RankErrorKind.LOAD_FAILED
    if isinstance(err, StoreLostError):  # rank 0, the store's host, is stopped or hung
        return RankErrorKind.TIMEOUT
    if isinstance(err, PeerLostError):
        return RankErrorKind.PEER_LOST
    if is_communication_error(err):
        return RankErrorKind.TIMEOUT if "timed out" in text or "timeout" in text else RankErrorKind.PEER_LOST
    if "out of memory" in text or type(err).__name__ == "OutOfMemoryError":
        return RankErrorKind.OOM
    return RankErrorKind.FAILED


@dataclasses.dataclass
class JobContext:
    """What stays the same for every shard of the job."""

    run: RunDir
    config: Config
    pipeline: Pipeline
    setup: RankSetup
    identity: JobIdentity
    faults: FaultInjector | None
    watchdog: Watchdog
    liveness: Liveness | None
    load_seconds: float
    groups: ProcessGroups
    """The job's process groups, shared by every shard (one communicator per member set)."""
    prompts: PromptStore = dataclasses.field(default_factory=PromptStore)
    """Encoded prompts, kept for the job's lifetime (`Pipeline.encode_prompts`)."""
    stepped: bool = False
    """This rank has made a denoising step (its first one is said once, as a start-up phase)."""

    def phase(self, what: str, starting: bool = True) -> None:
        """Rank 0 says what the job is doing while it starts up (log line and `--wait`)."""
        say_phase(self.run, self.identity, self.rank, what, starting)

    @property
    def rank(self) -> int:
        return self.setup.rank

    @property
    def world_ranks(self) -> list[int]:
        return list(range(self.setup.env.world_size if self.setup.env else 1))

    def exchange(self, scope: str, ranks: list[int], value: Any = None) -> dict[int, Any]:
        """Every rank of `ranks` publishes a value and gets them all, however long peers are busy."""
        if len(ranks) == 1 or self.liveness is None:
            return {self.rank: value}
        return self.liveness.exchange(scope, ranks, value)

    def doing(self, what: str) -> None:
        self.watchdog.touch()
        if self.liveness is not None:
            self.liveness.doing = what


@dataclasses.dataclass
class ShardContext:
    job: JobContext
    shard: int
    groups: ParallelGroups
    attempt: int
    writer: VideoWriter | None = None
    """The leader's mp4 writer (None on the other ranks of the group)."""
    images: dict[str, Any] = dataclasses.field(default_factory=dict)
    """The encoding window's input images by video id (`InputImage`, or the error that stops one)."""

    @property
    def scope(self) -> str:
        return f"{shard_name(self.shard)}.dp{self.groups.dp_index}"


def _generate_one(ctx: ShardContext, video: dict[str, Any], faults: VideoFaults | None) -> dict[str, Any]:
    """Make one video (decoded on the leader: `frames`); the manifest fields of the outcome."""
    job = ctx.job
    start = time.perf_counter()
    first_step: list[float] = []

    def on_step(step: int, total: int) -> None:
        job.doing(f"video {video['video_id']} step {step}/{total}")
        if not first_step:
            first_step.append(time.time())
            if not job.stepped:
                job.stepped = True
                age = process_age_s()
                after = f", {age:.0f} s after rank 0 started" if age else ""
                job.phase(f"first denoising step done{after}", starting=False)
        if faults is not None:
            faults.at_step(step)

    sampling = sampling_for(video, job.config.sampling)
    if faults is not None and faults.nan:
        sampling = dataclasses.replace(sampling, guidance_scale=float("nan"))
    try:
        image = take_image(ctx.images, job.run, video, job.pipeline.family, job.config.sampling)
        conditioning = job.pipeline.conditioning(video["prompt"], sampling, job.prompts, image=image)
        # Every rank of the video calls the shard's decoder: the leader's alone, or the parallel
        # decoder, which returns the frames on the leader only.
        generated = job.pipeline.generate(
            video["prompt"], sampling, on_step=on_step, timings=Timings(), conditioning=conditioning,
            image=image,
        )
        result = dict(status=VideoStatus.DONE, truncated=generated.truncated, frames=generated.frames)
        result |= dict(steps_computed=generated.steps_computed, steps_skipped=generated.steps_skipped)
    except PROMPT_ERRORS as err:
        if is_communication_error(err) or is_disk_full(err):
            raise
        logger.error("video %s failed:\n%s", printable(video["video_id"]), traceback.format_exc())
        result = dict(status=VideoStatus.FAILED, error=f"{type(err).__name__}: {err}")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    result["seconds"] = time.perf_counter() - start
    result["first_step_at"] = first_step[0] if first_step else None
    return result


def _agree_on_outcome(ctx: ShardContext, result: dict[str, Any]) -> dict[str, Any]:
    """Every rank of the SP group learns whether the video failed anywhere (and the leader why)."""
    groups = ctx.groups
    own = (str(result["status"]), result.get("error"))
    outcomes = ctx.job.exchange(f"{ctx.scope}.outcome", groups.video_ranks, own)
    leader_status = outcomes[groups.video_ranks[0]][0]
    if leader_status == VideoStatus.DONE:  # decoded: the leader's writer commits the mp4
        return result | dict(status=leader_status, error=None)
    failures = [error for rank, (status, error) in sorted(outcomes.items()) if status == VideoStatus.FAILED]
    if not failures:
        return result
    suffix = "" if result["status"] == VideoStatus.FAILED else " (on another rank of the group)"
    return result | dict(status=VideoStatus.FAILED, error=f"{failures[0]}{suffix}", path=None)


def _run_video(
    ctx: ShardContext, index: int, video: dict[str, Any], history: VideoHistory, progress: ShardProgress
) -> None:
    job, groups = ctx.job, ctx.groups
    key = job.identity.key
    attempt = history.attempts + 1
    row_of = dict(attempt=attempt, final=False)
    progress.put(video["video_id"], manifest_row(video, ctx.shard, key, status=VideoStatus.STARTED, **row_of))
    faults = None
    if job.faults is not None:
        faults = job.faults.for_video(
            rank=groups.rank,
            shard=ctx.shard,
            video_index=index,
            video_id=video["video_id"],
            attempt=ctx.attempt,
        )
    result = _agree_on_outcome(ctx, _generate_one(ctx, video, faults))
    job.watchdog.touch()
    first_step_at = result.pop("first_step_at", None)
    progress.first_step_at = progress.first_step_at or first_step_at
    history.attempts = attempt
    frames = result.pop("frames", None)
    if ctx.writer is None or result["status"] != VideoStatus.DONE:
        _finish_video(ctx, video, history, progress, row_of | result)
        return
    job.doing(f"queueing the mp4 of {video['video_id']}")

    def on_written(outcome: WriteOutcome) -> None:  # in the writer's thread, right after the link
        if outcome.status == COMMITTED_ELSEWHERE:
            history.done = True
            progress.drop(video["video_id"])
            return
        path = str(job.run.video_path(video["video_id"]).relative_to(job.run.root))
        seconds = result["seconds"] + outcome.seconds
        written = dict(status=outcome.status, error=outcome.error, seconds=seconds)
        written |= dict(path=path) if outcome.status == VideoStatus.DONE else {}
        _finish_video(ctx, video, history, progress, row_of | result | written)

    ctx.writer.submit(WriteRequest(video["video_id"], frames, faults, on_written))


def _finish_video(
    ctx: ShardContext, video: dict[str, Any], history: VideoHistory, progress: ShardProgress,
    result: dict[str, Any],
) -> None:  # fmt: skip
    """Record a video's outcome: its history in this attempt and (on the leader) its manifest row."""
    job, key, attempt = ctx.job, ctx.job.identity.key, result["attempt"]
    progress.seconds.append(result["seconds"])
    history.done = result["status"] == VideoStatus.DONE
    history.final = not history.done and attempt >= job.config.retry.max_prompt_attempts
    history.last_error = result.get("error")
    row = manifest_row(video, ctx.shard, key, **result | {"final": history.final})
    progress.put(video["video_id"], row)
    if ctx.groups.is_sp_leader:
        steps = sampling_for(video, job.config.sampling).num_inference_steps
        logger.info(
            "video %s: %s in %.1f s (%.2f steps/s), peak memory %.2f GiB",
            printable(video["video_id"]),
            row["status"],
            result["seconds"],
            steps / max(result["seconds"], 1e-9),
            peak_memory_bytes(job.pipeline.device) / 2**30,
        )


def _leader_todo(
    ctx: ShardContext, videos: list[dict[str, Any]], mine: list[int], histories: dict[str, VideoHistory],
    progress: ShardProgress,
) -> list[int]:  # fmt: skip
    """The videos to try in this pass; those out of attempts get their final failed row here."""
    retry, key = ctx.job.config.retry, ctx.job.identity.key
    todo = []
    for index in mine:
        video = videos[index]
        history = histories.setdefault(video["video_id"], VideoHistory())
        if history.done or history.final or _has_whole_final(ctx, video):
            continue
        if history.attempts >= retry.max_prompt_attempts:
            history.final = True
            error = f"failed on {history.attempts} attempts; last: {history.last_error}"
            row = manifest_row(
                video,
                ctx.shard,
                key,
                status=VideoStatus.FAILED,
                final=True,
                attempt=history.attempts,
                error=error,
            )
            progress.put(video["video_id"], row)
            continue
        todo.append(index)
    return todo


def _has_whole_final(ctx: ShardContext, video: dict[str, Any]) -> bool:
    """A final mp4 without a done row counts only if it is whole (else it goes to quarantine/)."""
    job = ctx.job
    if not os.path.lexists(job.run.video_path(video["video_id"])):
        return False
    return accept_final(job.run, video, sampling_for(video, job.config.sampling), job.identity.key)


def _process_videos(ctx: ShardContext) -> ShardProgress:
    job, groups = ctx.job, ctx.groups
    videos = job.run.read_shard(ctx.shard).to_pylist()
    histories = video_histories(job.run, ctx.shard, job.identity.key)
    mine = [i for i in range(len(videos)) if i % groups.dims.dp == groups.dp_index]
    leader = groups.is_sp_leader
    progress = ShardProgress(job.run, ctx.shard, job.identity.key, groups.dp_index, leader)
    ctx.writer = _writer(job) if leader else None
    try:
        for _ in range(job.config.retry.max_prompt_attempts):
            todo = _leader_todo(ctx, videos, mine, histories, progress) if leader else None
            # The group follows its leader's list (ranks reading the manifest could see different states).
            todo = ctx.job.exchange(f"{ctx.scope}.todo", groups.video_ranks, todo)[groups.video_ranks[0]]
            if not todo:
                break
            window = job.config.batch.encode_window
            for start in range(0, len(todo), window):
                _encode_window(ctx, [videos[i] for i in todo[start : start + window]])
                for index in todo[start : start + window]:
                    video = videos[index]
                    history = histories.setdefault(video["video_id"], VideoHistory())
                    _run_video(ctx, index, video, history, progress)
            if ctx.writer is not None:
                job.doing("waiting for the last mp4 write")
                ctx.writer.drain()  # this pass's outcomes are in `histories` before the next pass
    finally:
        if ctx.writer is not None:
            ctx.writer.close()  # also when the attempt ends early: a linked video gets its row
            _log_writes(ctx.writer)
    return progress


def _writer(job: JobContext) -> VideoWriter:
    def commit(video_id: str, frames: Any, faults: VideoFaults | None) -> bool:
        return commit_video(job.run, video_id, frames, job.config.video, job.identity.key, faults)

    # Waiting for the writer is no progress: a write that hangs must still trip the watchdog.
    return VideoWriter(commit, background=job.config.batch.overlap_writes)


def _log_writes(writer: VideoWriter) -> None:
    hidden = writer.hidden_share
    if hidden is None:  # this leader's dp group had no video to write in the shard
        return
    logger.info(
        "mp4 writes: %.2f s writing, %.2f s waited for, %s hidden (batch.overlap_writes=%s)",
        writer.write_seconds,
        writer.waited_seconds,
        f"{hidden:.0%}",
        writer.background,
    )


def _encode_window(ctx: ShardContext, videos: list[dict[str, Any]]) -> None:
    """Encode the prompts these videos need that the job has not encoded yet (text encoders on the
    device only meanwhile; a prompt that fails to encode fails its video in `_generate_one`)."""
    job = ctx.job
    job.doing(f"encoding the prompts of {len(videos)} videos")
    ctx.images = window_images(job.run, videos, job.pipeline.family, job.config.sampling)
    encoded = encode_apart(job.pipeline, videos, ctx.images, job.prompts, job.config.sampling)
    logger.debug("encoded %d prompts for %d videos", encoded, len(videos))


def _attempt_number(run: RunDir, shard: int, identity: JobIdentity) -> int:
    """This attempt's number for the shard, 1-based (what fault specs match `attempt=` against)."""
    rows = run.metrics_rows(shard)
    return len(rows) + (0 if any(r["attempt_key"] == str(identity.key) for r in rows) else 1)


def _remove_dead_temporaries(run: RunDir, shard: int, key: AttemptKey) -> None:
    """Temporary files of the shard's attempts that have ended (a write killed half-way)."""
    live = {str(key)} | {
        row["attempt_key"] for row in run.metrics_rows(shard) if row["exit_reason"] == ExitReason.RUNNING
    }
    videos = run.read_shard(shard)["video_id"].to_pylist()
    removed = remove_dead_temporaries(run, shard, videos, live)
    if removed:
        logger.info("%s: removed %d temporary files of ended attempts", shard_name(shard), len(removed))


def _begin_row(job: JobContext, groups: ParallelGroups, attempt: int) -> dict[str, Any]:
    device = job.pipeline.device
    return {
        "array_index": job.identity.array_index,
        "attempt": attempt,
        "node": os.uname().nodename,
        "gpu_type": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "world_size": groups.dims.world_size,
        "dp": groups.dims.dp,
        "ulysses": groups.dims.ulysses,
        "ring": groups.dims.ring,
        "attention_backend": getattr(job.pipeline, "attention_backend", None) or None,
        "load_seconds": job.load_seconds,
    }


def _warm_up_compiled(job: JobContext, shard: int, dims: ParallelDims, videos: list[dict[str, Any]]) -> None:
    """`model.compile` with collectives: compile every rank's blocks before the first collective
    (for the shard's largest video), then meet through the heartbeat store (no deadline while
    peers are alive), so that no collective's timeout has to cover a compile."""
    if not job.config.model.compile or dims.video == 1:
        return
    job.doing(f"{shard_name(shard)}: compiling the blocks")
    largest = max(videos, key=lambda video: video["cost"])
    sampling = sampling_for(largest, job.config.sampling)
    batch = 2 if sampling.cfg_scale > 1 else 1
    pipeline = job.pipeline
    inputs = warm_up_inputs(pipeline.transformer, pipeline.family, sampling, batch, pipeline.device)
    start = time.perf_counter()
    warm_up(job.pipeline.transformer, *inputs)
    logger.info("%s: blocks compiled in %.1f s", shard_name(shard), time.perf_counter() - start)
    job.exchange(f"{shard_name(shard)}.compiled", job.world_ranks)


def _run_one_shard(job: JobContext, shard: int, probe: ledger.JobProbe) -> dict[str, Any]:
    run, key, rank = job.run, job.identity.key, job.rank
    shard_start = time.time()
    videos = run.read_shard(shard)
    dims = choose_layout(job.config, videos, job.setup.env)
    groups = job.groups.for_layout(dims)  # made by the first shard with these member sets, then reused
    local = job.setup.env.local_world_size if job.setup.env else 1
    job.pipeline.parallelize(groups, local)  # the video's ranks share its denoising and its decode
    if job.pipeline.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(job.pipeline.device)  # the shard's own peak
    try:
        _warm_up_compiled(job, shard, dims, videos.to_pylist())
        attempt = _attempt_number(run, shard, job.identity)
        ctx = ShardContext(job, shard, groups, attempt)
        if rank == 0:
            ledger.reconcile(run, [shard], probe, key)
            _remove_dead_temporaries(run, shard, key)
            ledger.begin(run, shard, key, _begin_row(job, groups, attempt) | {"started_at": shard_start})
            logger.info(
                "%s %s (attempt %d): layout dp %d x cfg %d x ulysses %d x ring %d, attention %s",
                shard_name(shard), key, attempt, dims.dp, dims.cfg, dims.ulysses, dims.ring,
                job.pipeline.attention_backend,
            )  # fmt: skip
        job.exchange(f"{shard_name(shard)}.begin", job.world_ranks)  # the ledger is up to date
        progress = _process_videos(ctx)
        job.doing(f"{shard_name(shard)} done, waiting for the other dp groups")
        own = (peak_memory_bytes(job.pipeline.device), take_attention_fallbacks(job.pipeline.transformer))
        ends = job.exchange(f"{shard_name(shard)}.end", job.world_ranks, own)
    finally:
        job.pipeline.unparallelize()
    complete = False
    if rank == 0:
        recover_orphans(run, shard, key, job.config.sampling)
        wall = time.time() - shard_start
        measured = {
            "seconds_to_first_step": progress.first_step_at - shard_start if progress.first_step_at else None,
            "prompt_seconds": progress.seconds,
            "wall_seconds": wall,
            "gpu_seconds": wall * dims.world_size,
            "peak_memory_bytes": [int(ends[r][0]) for r in sorted(ends)],
            "attention_fallbacks": _merged_fallbacks([ends[r][1] for r in sorted(ends)]),
        }
        complete = ledger.complete(run, shard, key, measured)
    return {"shard": shard, "rank": rank, "videos": len(progress.seconds), "complete": complete}


def _merged_fallbacks(per_rank: list[dict[str, int]]) -> str | None:
    """Kernel fallbacks summed over the ranks, as JSON (None when no call fell back)."""
    total: dict[str, int] = {}
    for fallbacks in per_rank:
        for reason, count in (fallbacks or {}).items():
            total[reason] = total.get(reason, 0) + int(count)
    return json.dumps(total, sort_keys=True) if total else None


def _liveness(setup: RankSetup, config: Config, watchdog: Watchdog) -> Liveness | None:
    env = setup.env
    if env is None or env.world_size == 1:
        return None
    r = config.retry
    return Liveness.for_job(
        env.master_addr,
        env.master_port,
        env.rank,
        interval_s=r.heartbeat_interval_s,
        peer_timeout_s=r.peer_timeout_s,
        on_wait=watchdog.touch,
    ).start()


def run_shards_job(
    run_dir: str, shards: list[int], probe: ledger.JobProbe, on_shard: Any = None
) -> list[dict[str, Any]]:
    """Entry point of a job (called on every rank): load once, then work through `shards` in order.

    Failures that are not a video's (the rendezvous port taken, the model not loading, a full
    disk) are reported with their own kind, so the attempt ends with its own exit reason and
    charges no video (see `ExitReason.charges_videos`).
    """
    run = RunDir(run_dir)
    config = load_config(run.root / "config.yaml")
    identity = JobIdentity.from_environment()
    env = dist_env_from(os.environ)
    rank = env.rank if env is not None else 0
    watchdog = Watchdog(config.retry.stall_timeout_s, run, identity.key, rank)
    setup = liveness = None
    failed = False
    try:
        faults = FaultInjector.from_spec(config.fault)
        held_port = _port_fault(faults, run, shards, identity, env)
        world = env.world_size if env else 1
        started = time.time()
        age = process_age_s()
        imported = f"imports done {age:.0f} s after rank 0 started" if age is not None else "imports done"
        say_phase(run, identity, rank, f"{imported}; {world} ranks meeting")
        try:
            setup = setup_rank(config.parallel, config.device)
        finally:
            if held_port is not None:
                held_port.close()
        liveness = _liveness(setup, config, watchdog)
        say_phase(
            run, identity, rank, f"{world} ranks up in {time.time() - started:.0f} s; loading the model"
        )
        timings = Timings()
        try:
            pipeline = Pipeline.load(config, timings, device=setup.device)
        except Exception as err:
            raise ModelLoadError(f"loading the model failed: {type(err).__name__}: {err}") from err
        say_phase(
            run,
            identity,
            rank,
            f"model loaded in {timings.seconds.get('load', 0.0):.0f} s; starting the first shard",
        )
        groups = ProcessGroups(world, setup.rank, timedelta(seconds=config.parallel.timeout_s))
        job = JobContext(
            run, config, pipeline, setup, identity, faults, watchdog, liveness,
            timings.seconds.get("load", 0.0), groups,
        )  # fmt: skip
        watchdog.start()
        results = []
        complete = run.completed_shards()
        for shard in shards:
            if shard in complete:
                continue
            if on_shard is not None:
                on_shard(run, shard, identity.key)
            results.append(_run_one_shard(job, shard, probe))
        return results
    except Exception as err:
        failed = True
        _report_failure(run, identity, rank, liveness, err, setup is None)
        raise
    finally:
        watchdog.stop()
        if liveness is not None:
            liveness.stop()
        if setup is not None and not failed:  # after a failed collective, tearing down can block
            teardown_rank(setup)
        logger.debug("rank %d left after %.0f s", rank, time.time() - PROCESS_START)


def say_phase(run: RunDir, identity: JobIdentity, rank: int, what: str, starting: bool = True) -> None:
    """Rank 0's start-up phases: a log line and the attempt's phase record (`ledger.record_phase`)."""
    if rank != 0:
        return
    logger.info("%s: %s", identity.key, what)
    ledger.record_phase(run, identity.key, what, starting)


def _report_failure(
    run: RunDir, identity: JobIdentity, rank: int, liveness: Liveness | None, err: Exception, in_setup: bool
) -> None:
    """Tell the peers and record the rank's error; a record that cannot be written (a full disk)
    is logged: the exit status still says `disk-full` (`EXIT_DISK_FULL`)."""
    message = f"{type(err).__name__}: {err}"
    kind = error_kind(err)
    if in_setup and is_port_failure(err):
        kind = RankErrorKind.PORT_FAILED
    if liveness is not None:
        liveness.report_failure(message)
    logger.error("rank %d: attempt %s failed (%s):\n%s", rank, identity.key, kind, traceback.format_exc())
    try:
        record_rank_error(run, identity.key, rank, kind, message)
    except OSError as record_err:
        logger.error("rank %d: could not record its error in %s: %s", rank, run.root, record_err)


def _port_fault(
    faults: FaultInjector | None, run: RunDir, shards: list[int], identity: JobIdentity, env: DistEnv | None
) -> socket.socket | None:
    """The `port-busy` fault: this rank holds the rendezvous port, as another process would."""
    if faults is None or env is None:
        return None
    todo = [shard for shard in shards if shard not in run.completed_shards()]
    shard = todo[0] if todo else -1
    attempt = _attempt_number(run, shard, identity) if todo else 1
    return faults.hold_port(env.master_addr, env.master_port, rank=env.rank, shard=shard, attempt=attempt)
