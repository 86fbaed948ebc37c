"""The shard job: every rank of one node job runs `run_shard_job(run_dir, shard)`.

Ranks come from the submitit / Slurm / torchrun environment. The job loads the model once,
chooses its layout with the planner (dp groups x ulysses x ring), and each dp group works through
its share of the shard's videos in file order, skipping those already done. The group's leader
writes each mp4 (temp name, then rename) and then the manifest row; the completion marker is
written last, once every video of the shard has a row.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import resource
import socket
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.distributed as dist

from hvbatch.batch.rundir import MANIFEST_SCHEMA, RunDir, shard_name, write_json_atomic, write_parquet_atomic
from hvbatch.config import Config, SamplingConfig, load_config
from hvbatch.parallel.dims import ParallelDims, ParallelGroups, build_groups
from hvbatch.parallel.launch import DistEnv, setup_rank, teardown_rank
from hvbatch.parallel.runner import SequenceParallelTransformer
from hvbatch.pipeline import Pipeline, Timings
from hvbatch.plan_cli import plan_for_config
from hvbatch.video import write_mp4

logger = logging.getLogger(__name__)
PROCESS_START = time.time()


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
        # A retry gets a new job id; a requeue keeps it and bumps the restart count.
        return cls(job_id, array_index, restart, f"job{job_id}.r{restart}")


@dataclass
class ShardProgress:
    rows: list[dict[str, Any]] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    first_step_at: float | None = None


def _export_submitit_environment() -> None:
    """Under submitit (Slurm or local), publish RANK/WORLD_SIZE/MASTER_* for `dist_env_from`."""
    # Only submitit's own job scripts set SUBMITIT_EXECUTOR; under plain srun, `dist_env_from`
    # reads Slurm's variables itself.
    if "RANK" in os.environ or "SUBMITIT_EXECUTOR" not in os.environ:
        return
    import submitit

    submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=torch.cuda.is_available())


def sampling_for(video: dict[str, Any], defaults: SamplingConfig) -> SamplingConfig:
    overrides = {
        k: video[k]
        for k in (
            "seed",
            "height",
            "width",
            "num_frames",
            "num_inference_steps",
            "guidance_scale",
            "flow_shift",
            "negative_prompt",
        )
        if video.get(k) is not None
    }
    return dataclasses.replace(defaults, **overrides)


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


def _done_video_ids(run: RunDir, shard: int) -> set[str]:
    rows = run.manifest_rows(shard)
    done = rows.filter(pc.equal(rows["status"], "done"))
    return {
        vid
        for vid, path in zip(done["video_id"].to_pylist(), done["path"].to_pylist(), strict=True)
        if path and (run.root / path).is_file()
    }


def _manifest_row(video: dict[str, Any], shard: int, identity: JobIdentity, **result: Any) -> dict[str, Any]:
    row = {name: video.get(name) for name in MANIFEST_SCHEMA.names}
    row.update(shard=shard, job_id=identity.job_id, attempt_key=identity.attempt_key, finished_at=time.time())
    row.update(result)
    return row


def _generate_one(
    pipeline: Pipeline,
    run: RunDir,
    video: dict[str, Any],
    config: Config,
    leader: bool,
    progress: ShardProgress,
) -> dict[str, Any]:
    """Make one video; returns the manifest fields describing the outcome."""
    start = time.perf_counter()

    def on_step(step: int, total: int) -> None:
        if progress.first_step_at is None:
            progress.first_step_at = time.time()

    try:
        generated = pipeline.generate(
            video["prompt"],
            sampling_for(video, config.sampling),
            on_step=on_step,
            decode=leader,
            timings=Timings(),
        )
        path = None
        if leader:
            assert generated.frames is not None
            target = run.video_path(video["video_id"])
            write_mp4(generated.frames, target, config.video)
            path = str(target.relative_to(run.root))
        return dict(
            status="done", path=path, seconds=time.perf_counter() - start, truncated=generated.truncated
        )
    except (ValueError, RuntimeError, FloatingPointError, torch.cuda.OutOfMemoryError) as err:
        logger.error("video %s failed:\n%s", video["video_id"], traceback.format_exc())
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return dict(
            status="failed", seconds=time.perf_counter() - start, error=f"{type(err).__name__}: {err}"
        )


def _peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _write_metrics(
    run: RunDir,
    shard: int,
    identity: JobIdentity,
    dims: ParallelDims,
    progress: ShardProgress,
    load_seconds: float,
    peaks: list[int],
    device: torch.device,
    exit_reason: str,
) -> None:
    wall = time.time() - PROCESS_START
    row = {
        "job_id": identity.job_id,
        "array_index": identity.array_index,
        "attempt": identity.restart,
        "attempt_key": identity.attempt_key,
        "shard": shard,
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
        "finished_at": time.time(),
    }
    write_parquet_atomic(run.metrics_part(shard, identity.attempt_key), pa.Table.from_pylist([row]))


def _maybe_mark_done(run: RunDir, shard: int, identity: JobIdentity) -> bool:
    """Write the completion marker if every video of the shard has a row (done or failed)."""
    videos = set(run.read_shard(shard)["video_id"].to_pylist())
    rows = run.manifest_rows(shard)
    finished = set(rows["video_id"].to_pylist())
    if not videos <= finished:
        return False
    done = len(_done_video_ids(run, shard) & videos)
    write_json_atomic(
        run.done_marker(shard),
        {
            "shard": shard,
            "videos": len(videos),
            "done": done,
            "failed": len(videos) - done,
            "job_id": identity.job_id,
            "finished_at": time.time(),
        },
    )
    return True


def _process_videos(
    run: RunDir, shard: int, config: Config, pipeline: Pipeline, groups: ParallelGroups, identity: JobIdentity
) -> ShardProgress:
    videos = run.read_shard(shard).to_pylist()
    done = _done_video_ids(run, shard)
    mine = [
        v for i, v in enumerate(videos) if i % groups.dims.dp == groups.dp_index and v["video_id"] not in done
    ]
    progress = ShardProgress()
    part = run.manifest_part(shard, identity.attempt_key, groups.dp_index)
    for video in mine:
        result = _generate_one(pipeline, run, video, config, groups.is_sp_leader, progress)
        progress.seconds.append(result["seconds"])
        if groups.is_sp_leader:
            progress.rows.append(_manifest_row(video, shard, identity, **result))
            write_parquet_atomic(part, pa.Table.from_pylist(progress.rows, schema=MANIFEST_SCHEMA))
    return progress


def _run_one_shard(
    run: RunDir,
    shard: int,
    config: Config,
    pipeline: Pipeline,
    env: DistEnv | None,
    identity: JobIdentity,
    load_seconds: float,
) -> dict[str, Any]:
    rank = env.rank if env else 0
    dims = choose_layout(config, run.read_shard(shard), env)
    groups = build_groups(dims, rank)
    raw_model = (
        pipeline.transformer.model
        if isinstance(pipeline.transformer, SequenceParallelTransformer)
        else (pipeline.transformer)
    )
    pipeline.transformer = SequenceParallelTransformer(raw_model, groups) if dims.sp > 1 else raw_model
    logger.info(
        "%s %s: layout dp %d x ulysses %d x ring %d",
        shard_name(shard),
        identity.attempt_key,
        dims.dp,
        dims.ulysses,
        dims.ring,
    )
    progress = _process_videos(run, shard, config, pipeline, groups, identity)
    peaks = [_peak_memory_bytes(pipeline.device)]
    if env is not None and env.world_size > 1:
        gathered: list[Any] = [None] * dims.world_size
        dist.all_gather_object(gathered, peaks[0])  # also the point where every group has finished
        peaks = [int(p) for p in gathered]
    complete = False
    if rank == 0:
        _write_metrics(
            run, shard, identity, dims, progress, load_seconds, peaks, pipeline.device, "completed"
        )
        complete = _maybe_mark_done(run, shard, identity)
    return {"shard": shard, "rank": rank, "videos": len(progress.seconds), "complete": complete}


def run_shards_job(run_dir: str, shards: list[int]) -> list[dict[str, Any]]:
    """Entry point of a job (called on every rank): load once, then work through `shards` in order."""
    _export_submitit_environment()
    run = RunDir(run_dir)
    config = load_config(run.root / "config.yaml")
    identity = JobIdentity.from_environment()
    setup = setup_rank(config.parallel, config.device)
    env, device = setup.env, setup.device
    try:
        timings = Timings()
        pipeline = Pipeline.load(config, timings, device=device)
        load_seconds = timings.seconds.get("load", 0.0)
        return [
            _run_one_shard(run, shard, config, pipeline, env, identity, load_seconds)
            for shard in shards
            if not run.done_marker(shard).is_file()
        ]
    finally:
        teardown_rank(setup)
