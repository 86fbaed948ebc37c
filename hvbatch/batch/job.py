"""The shard job: every rank of one node job runs `run_shards_job(run_dir, shards)`.

Ranks come from the submitit / Slurm / torchrun environment. The job loads the model once, chooses
its layout with the planner (dp groups x ulysses x ring), and each dp group works through its share
of the shard's videos in file order, skipping those already done. Per video the group's leader
writes a `started` row, then the mp4 (attempt-unique temporary name, hard-linked to its final name),
then the `done` or `failed` row. A video that fails on any rank fails for the whole group (the ranks
agree after every video, within `retry.resync_timeout_s`); a failed video is tried again, in this
job, until `retry.max_prompt_attempts`. A failure of the group itself (a collective that times out,
a rank that dies) ends the attempt: the error is recorded and the process exits non-zero.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
import traceback
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from hvbatch.batch.attempts import (
    COMPLETED,
    RUNNING,
    VideoHistory,
    error_kind,
    is_communication_error,
    mark_done_if_complete,
    reconcile_stale_attempts,
    record_rank_error,
    video_histories,
)
from hvbatch.batch.faults import FaultInjector, VideoFaults
from hvbatch.batch.job_support import (
    JobIdentity,
    ShardProgress,
    Watchdog,
    choose_layout,
    commit_video,
    manifest_row,
    recover_orphans,
    sampling_for,
    write_metrics,
)
from hvbatch.batch.rundir import RunDir, shard_name
from hvbatch.config import Config, load_config
from hvbatch.parallel.dims import ParallelGroups, build_groups
from hvbatch.parallel.launch import setup_rank, teardown_rank
from hvbatch.parallel.runner import SequenceParallelTransformer
from hvbatch.pipeline import Pipeline, Timings

logger = logging.getLogger(__name__)
PROMPT_ERRORS = (ValueError, RuntimeError, FloatingPointError, OSError, torch.cuda.OutOfMemoryError)


class GroupLostError(RuntimeError):
    """The ranks of a group could not agree on a video's outcome in time."""


@dataclasses.dataclass
class ShardContext:
    run: RunDir
    shard: int
    config: Config
    pipeline: Pipeline
    groups: ParallelGroups
    identity: JobIdentity
    attempt: int
    faults: FaultInjector | None
    watchdog: Watchdog


def _export_submitit_environment() -> None:
    """Under submitit (Slurm or local), publish RANK/WORLD_SIZE/MASTER_* for `dist_env_from`."""
    # Only submitit's own job scripts set SUBMITIT_EXECUTOR; under plain srun, `dist_env_from`
    # reads Slurm's variables itself.
    if "RANK" in os.environ or "SUBMITIT_EXECUTOR" not in os.environ:
        return
    import submitit

    submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=torch.cuda.is_available())


def _generate_one(
    ctx: ShardContext, video: dict[str, Any], video_faults: VideoFaults | None
) -> dict[str, Any]:
    """Make (and, on the leader, commit) one video; the manifest fields of the outcome."""
    start = time.perf_counter()
    leader = ctx.groups.is_sp_leader
    progress_first: list[float] = []

    def on_step(step: int, total: int) -> None:
        ctx.watchdog.touch()
        if not progress_first:
            progress_first.append(time.time())
        if video_faults is not None:
            video_faults.at_step(step)

    sampling = sampling_for(video, ctx.config.sampling)
    if video_faults is not None and video_faults.nan:
        sampling = dataclasses.replace(sampling, guidance_scale=float("nan"))
    try:
        generated = ctx.pipeline.generate(
            video["prompt"], sampling, on_step=on_step, decode=leader, timings=Timings()
        )
        status, path = "done", None
        if leader:
            assert generated.frames is not None
            committed = commit_video(
                ctx.run,
                video["video_id"],
                generated.frames,
                ctx.config.video,
                ctx.identity.attempt_key,
                video_faults,
            )
            status = "done" if committed else "committed-elsewhere"
            path = str(ctx.run.video_path(video["video_id"]).relative_to(ctx.run.root))
        result = dict(status=status, path=path, truncated=generated.truncated)
    except PROMPT_ERRORS as err:
        if is_communication_error(err):
            raise
        logger.error("video %s failed:\n%s", video["video_id"], traceback.format_exc())
        result = dict(status="failed", error=f"{type(err).__name__}: {err}")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    result["seconds"] = time.perf_counter() - start
    result["first_step_at"] = progress_first[0] if progress_first else None
    return result


def _agree_on_failure(ctx: ShardContext, result: dict[str, Any]) -> dict[str, Any]:
    """Every rank of the SP group learns whether the video failed anywhere (and the leader why)."""
    groups = ctx.groups
    if groups.dims.sp == 1:
        return result
    failed = result["status"] == "failed"
    device = ctx.pipeline.device if dist.get_backend(groups.sp) == "nccl" else torch.device("cpu")
    flag = torch.tensor([int(failed)], dtype=torch.int32, device=device)
    timeout = timedelta(seconds=ctx.config.retry.resync_timeout_s)
    try:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=groups.sp, async_op=True).wait(timeout=timeout)
    except RuntimeError as err:
        cause = result.get("error") or "none on this rank"
        raise GroupLostError(
            f"ranks of the group did not agree after a video (own error: {cause}): {err}"
        ) from err
    if not int(flag.item()):
        return result
    # Every rank must take the same decision, or their collectives would no longer match.
    outcomes: list[Any] = [None] * groups.dims.sp
    dist.all_gather_object(outcomes, (result["status"], result.get("error")), group=groups.sp)
    leader_status = outcomes[0][0]  # sp index 0 is the leader
    if leader_status in ("done", "committed-elsewhere"):  # the mp4 is committed: the video is done
        return result | dict(status=leader_status, error=None)
    first = next(error for status, error in outcomes if status == "failed")
    suffix = "" if failed else " (on another rank of the group)"
    return result | dict(status="failed", error=f"{first}{suffix}", path=None)


def _run_video(
    ctx: ShardContext, index: int, video: dict[str, Any], history: VideoHistory, progress: ShardProgress
) -> None:
    groups, retry = ctx.groups, ctx.config.retry
    leader = groups.is_sp_leader
    attempt = history.attempts + 1
    row_of = dict(attempt=attempt, final=False)
    if leader:
        progress.put(video["video_id"], manifest_row(video, ctx, status="started", **row_of))
    video_faults = None
    if ctx.faults is not None:
        video_faults = ctx.faults.for_video(
            rank=groups.rank,
            shard=ctx.shard,
            video_index=index,
            video_id=video["video_id"],
            attempt=ctx.attempt,
        )
    result = _agree_on_failure(ctx, _generate_one(ctx, video, video_faults))
    ctx.watchdog.touch()
    progress.seconds.append(result["seconds"])
    first_step_at = result.pop("first_step_at", None)
    progress.first_step_at = progress.first_step_at or first_step_at
    history.attempts = attempt
    if result["status"] == "committed-elsewhere":
        history.done = True
        if leader:
            progress.drop(video["video_id"])
        return
    history.done = result["status"] == "done"
    history.final = not history.done and attempt >= retry.max_prompt_attempts
    history.last_error = result.get("error")
    if leader:
        progress.put(
            video["video_id"], manifest_row(video, ctx, **row_of | result | {"final": history.final})
        )


def _process_videos(ctx: ShardContext) -> ShardProgress:
    run, groups, retry = ctx.run, ctx.groups, ctx.config.retry
    videos = run.read_shard(ctx.shard).to_pylist()
    histories = video_histories(run, ctx.shard, ctx.identity.attempt_key)
    mine = [(i, v) for i, v in enumerate(videos) if i % groups.dims.dp == groups.dp_index]
    part = run.manifest_part(ctx.shard, ctx.identity.attempt_key, groups.dp_index)
    progress = ShardProgress(part if groups.is_sp_leader else None)
    for _ in range(retry.max_prompt_attempts):
        todo = _leader_todo(ctx, mine, histories, progress) if groups.is_sp_leader else []
        todo = _share_from_leader(ctx, todo)
        if not todo:
            break
        for index, video in todo:
            _run_video(ctx, index, video, histories.setdefault(video["video_id"], VideoHistory()), progress)
    return progress


def _share_from_leader(ctx: ShardContext, todo: list[tuple[int, dict[str, Any]]]) -> list[Any]:
    """The group follows its leader's list (ranks reading the manifest could see different states)."""
    groups = ctx.groups
    if groups.dims.sp == 1:
        return todo
    box: list[Any] = [todo]
    dist.broadcast_object_list(box, src=groups.sp_ranks[0], group=groups.sp)
    return list(box[0])


def _leader_todo(
    ctx: ShardContext,
    mine: list[tuple[int, dict[str, Any]]],
    histories: dict[str, VideoHistory],
    progress: ShardProgress,
) -> list[tuple[int, dict[str, Any]]]:
    """The videos to try in this pass; those out of attempts get their final failed row here."""
    run, retry = ctx.run, ctx.config.retry
    todo = []
    for index, video in mine:
        history = histories.setdefault(video["video_id"], VideoHistory())
        if history.done or history.final or run.video_path(video["video_id"]).exists():
            continue
        if history.attempts >= retry.max_prompt_attempts:
            history.final = True
            error = f"failed on {history.attempts} attempts; last: {history.last_error}"
            row = manifest_row(video, ctx, status="failed", final=True, attempt=history.attempts, error=error)
            progress.put(video["video_id"], row)
            continue
        todo.append((index, video))
    return todo


def _run_one_shard(
    run: RunDir,
    shard: int,
    config: Config,
    pipeline: Pipeline,
    setup: Any,
    identity: JobIdentity,
    load_seconds: float,
    faults: FaultInjector | None,
    watchdog: Watchdog,
) -> dict[str, Any]:
    env, rank = setup.env, setup.rank
    dims = choose_layout(config, run.read_shard(shard), env)
    groups = build_groups(dims, rank, timedelta(seconds=config.parallel.timeout_s))
    raw_model = pipeline.transformer
    if isinstance(raw_model, SequenceParallelTransformer):
        raw_model = raw_model.model
    pipeline.transformer = SequenceParallelTransformer(raw_model, groups) if dims.sp > 1 else raw_model
    attempt = len(run.metrics_rows(shard)) + (
        0 if run.metrics_part(shard, identity.attempt_key).is_file() else 1
    )
    ctx = ShardContext(run, shard, config, pipeline, groups, identity, attempt, faults, watchdog)
    if rank == 0:
        reconcile_stale_attempts(run, shard, set(), identity.attempt_key)
        write_metrics(ctx, ShardProgress(None), load_seconds, [], RUNNING)
    if env is not None and env.world_size > 1:
        dist.barrier()  # nobody counts attempts before rank 0 has reconciled them
    logger.info(
        "%s %s (attempt %d): layout dp %d x ulysses %d x ring %d",
        shard_name(shard),
        identity.attempt_key,
        attempt,
        dims.dp,
        dims.ulysses,
        dims.ring,
    )
    progress = _process_videos(ctx)
    peaks = [progress.peak_memory_bytes(pipeline.device)]
    if env is not None and env.world_size > 1:
        gathered: list[Any] = [None] * dims.world_size
        dist.all_gather_object(gathered, peaks[0])  # also the point where every group has finished
        peaks = [int(p) for p in gathered]
    complete = False
    if rank == 0:
        recover_orphans(ctx)
        write_metrics(ctx, progress, load_seconds, peaks, COMPLETED)
        complete = mark_done_if_complete(run, shard, identity.job_id)
    return {"shard": shard, "rank": rank, "videos": len(progress.seconds), "complete": complete}


def run_shards_job(run_dir: str, shards: list[int], on_shard: Any = None) -> list[dict[str, Any]]:
    """Entry point of a job (called on every rank): load once, then work through `shards` in order."""
    _export_submitit_environment()
    run = RunDir(run_dir)
    config = load_config(run.root / "config.yaml")
    identity = JobIdentity.from_environment()
    faults = FaultInjector.from_spec(config.fault)
    setup = setup_rank(config.parallel, config.device)
    watchdog = Watchdog(config.retry.stall_timeout_s, run, identity.attempt_key, setup.rank)
    failed = False
    try:
        timings = Timings()
        pipeline = Pipeline.load(config, timings, device=setup.device)
        load_seconds = timings.seconds.get("load", 0.0)
        watchdog.start()
        results = []
        for shard in shards:
            if run.done_marker(shard).is_file():
                continue
            if on_shard is not None:
                on_shard(run, shard, identity.attempt_key)
            results.append(
                _run_one_shard(run, shard, config, pipeline, setup, identity, load_seconds, faults, watchdog)
            )
        return results
    except Exception as err:
        kind = "resync" if isinstance(err, GroupLostError) else error_kind(err)
        record_rank_error(run, identity.attempt_key, setup.rank, kind, f"{type(err).__name__}: {err}")
        logger.error(
            "rank %d: attempt %s failed:\n%s", setup.rank, identity.attempt_key, traceback.format_exc()
        )
        failed = True
        raise
    finally:
        watchdog.stop()
        if not failed:  # after a failed collective, tearing the group down can block: just exit
            teardown_rank(setup)


@dataclasses.dataclass
class ShardJob:
    """What submitit runs on every rank; on USR2 (walltime or preemption) rank 0 records why, and
    submitit requeues the job, which resumes from the manifest."""

    time_min: float
    signal_delay_s: float
    active: tuple[RunDir, int, str] | None = None

    def __call__(self, run_dir: str, shards: list[int]) -> list[dict[str, Any]]:
        return run_shards_job(run_dir, shards, on_shard=self._set_active)

    def _set_active(self, run: RunDir, shard: int, attempt_key: str) -> None:
        self.active = (run, shard, attempt_key)

    def checkpoint(self, run_dir: str, shards: list[int]) -> Any:
        import submitit

        from hvbatch.batch.attempts import set_exit_reason
        from hvbatch.batch.job_support import PROCESS_START, interruption_reason

        if self.active is not None:
            run, shard, key = self.active
            reason = interruption_reason(time.time() - PROCESS_START, self.time_min, self.signal_delay_s)
            set_exit_reason(run, shard, key, reason, "USR2: checkpointed and requeued")
        return submitit.helpers.DelayedSubmission(
            ShardJob(self.time_min, self.signal_delay_s), run_dir, shards
        )
