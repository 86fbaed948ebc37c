"""Seconds per cost unit (GPU-seconds per image token x denoising step, one GPU): what shards and
walltimes are sized from. The default is the model family's figure on one H100 with
FlashAttention-2 (`ModelFamily.seconds_per_token_step`) times a small table of relative times by
GPU and attention kernel; once a run has finished videos, their own seconds refine it for the jobs
submitted later (`retry`, the automatic resubmission of a failed or interrupted shard,
`hvbatch sbatch`).

The table (`RELATIVE_TIME`, against H100 x FlashAttention-2), per GPU (`batch.gpu_type`) and kernel
(`model.attention`; `auto` and `default` mean the kernel `auto` picks there):
- H100 / flash: 1, the family's figure (HunyuanVideo 1.0: the official 1904 s for 720p x 129 frames x
  50 steps on one H100, FlashAttention-2, i.e. 3.2e-4, plus 3%).
- H100 / cudnn and fa3: 1.85 / 3.3, about 1.8x faster: a 720p step of ~21.5 s estimated from the code
  as written with cuDNN attention (issue 19); unmeasured until benchmarks/gpu_check.py runs.
- H200: as H100 (the same compute; attention is compute-bound). B200: half of H100 (about 2.3x the
  dense bf16 throughput, rounded down). A100 and L40S: H100's flash figure scaled by dense bf16
  throughput (989 / 312 and 989 / 362 TFLOP/s); cuDNN is not used there (PyTorch does not prefer it).
- `auto` is cudnn on H100/H200/B200: PyTorch trusts cuDNN above 9.15.0 and the torch 2.11 CUDA 13
  wheels ship 9.17.1 (pytorch#173216); on a node with an older cuDNN the job runs flash, slower than
  assumed, and the refinement below corrects the next submissions.
Every factor but H100/flash is an estimate; `hvbatch retry` and resubmissions use the measured figure.

The measured figure is the median, over the run's done videos, of `seconds x GPUs per video /
(image tokens x steps x CFG branches)`; it includes what the table does not (VAE decode, the mp4
write, step caching's skipped steps), which is what a walltime must hold.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from hvbatch.batch.rundir import RunDir
from hvbatch.batch.videos import sampling_for
from hvbatch.config import Config
from hvbatch.models.family import family_of
from hvbatch.parallel.plan import plan_for_job
from hvbatch.parallel.planner import ParallelPlan

_H100_FLASH = 1.0
_H100_FAST = 1.85 / 3.3
RELATIVE_TIME: dict[tuple[str, str], float] = {
    ("h100", "flash"): _H100_FLASH,
    ("h100", "cudnn"): _H100_FAST,
    ("h100", "fa3"): _H100_FAST,
    ("h100", "efficient"): 1.3 * _H100_FLASH,
    ("h200", "flash"): _H100_FLASH,
    ("h200", "cudnn"): _H100_FAST,
    ("h200", "fa3"): _H100_FAST,
    ("h200", "efficient"): 1.3 * _H100_FLASH,
    ("b200", "flash"): 0.5 * _H100_FLASH,
    ("b200", "cudnn"): 0.5 * _H100_FAST,
    ("b200", "fa4"): 0.5 * _H100_FAST,
    ("b200", "efficient"): 0.5 * 1.3 * _H100_FLASH,
    ("a100", "flash"): 989 / 312 * _H100_FLASH,
    ("a100", "efficient"): 1.3 * 989 / 312 * _H100_FLASH,
    ("l40s", "flash"): 989 / 362 * _H100_FLASH,
    ("l40s", "efficient"): 1.3 * 989 / 362 * _H100_FLASH,
}
"""Time per token-step relative to one H100 with FlashAttention-2, by (GPU, kernel)."""
AUTO_KERNEL = {"h100": "cudnn", "h200": "cudnn", "b200": "cudnn", "a100": "flash", "l40s": "flash"}
"""What `model.attention=auto` (and `default`) runs on each GPU of the table."""
GPU_TYPES = tuple(AUTO_KERNEL)
MIN_MEASURED_VIDEOS = 3
"""Done videos a run needs before its own figure replaces the table's."""
RESUBMIT_SAFETY = 1.5
"""A resubmitted job asks for this many times the time its remaining videos should take."""


@dataclass(frozen=True)
class CostRate:
    seconds_per_cost_unit: float
    source: str
    """Where the figure comes from, in words (shown by `submit --dry-run`, `retry`)."""


def expected_kernel(attention: str, gpu_type: str) -> str:
    """The kernel the table is read for: `auto`/`default` -> the GPU's auto choice; a kernel the table
    has no figure for on that GPU (it would fall back there, or sage/math) -> the auto choice too."""
    auto = AUTO_KERNEL[gpu_type]
    if attention in ("auto", "default"):
        return auto
    return attention if (gpu_type, attention) in RELATIVE_TIME else auto


def configured_rate(config: Config) -> CostRate:
    """`batch.seconds_per_cost_unit` when set, else the model family's figure scaled by the table
    for the GPU and kernel."""
    b = config.batch
    if b.seconds_per_cost_unit is not None:
        return CostRate(b.seconds_per_cost_unit, "batch.seconds_per_cost_unit")
    kernel = expected_kernel(config.model.attention, b.gpu_type)
    figure = family_of(config.model).seconds_per_token_step * RELATIVE_TIME[(b.gpu_type, kernel)]
    return CostRate(figure, f"table: {b.gpu_type} x {kernel} (batch.gpu_type, model.attention)")


def measured_rate(run: RunDir, config: Config) -> CostRate | None:
    """The median of the run's done videos (None below `MIN_MEASURED_VIDEOS`)."""
    gpus_per_video: dict[str, int] = {}
    for row in run.metrics_rows():
        if row.get("world_size") and row.get("dp"):
            gpus_per_video[row["attempt_key"]] = max(1, int(row["world_size"]) // int(row["dp"]))
    geometry = family_of(config.model).geometry
    branches = 2 if config.sampling.cfg_scale > 1 else 1
    rates = []
    for row in run.manifest_rows().to_pylist():
        seconds = row.get("seconds")
        if row["status"] != "done" or not seconds or not math.isfinite(seconds) or seconds <= 0:
            continue
        group = gpus_per_video.get(row["attempt_key"])
        if group is None:
            continue
        tokens = geometry.checked_image_tokens(row["height"], row["width"], row["num_frames"])
        cost = tokens * row["num_inference_steps"]
        rates.append(seconds * group / (cost * branches))
    if len(rates) < MIN_MEASURED_VIDEOS:
        return None
    return CostRate(statistics.median(rates), f"measured: median of {len(rates)} done videos of this run")


def rate_for(config: Config, run: RunDir | None = None) -> CostRate:
    """The run's own figure when it has one (and `batch.seconds_per_cost_unit` is not set), else the
    configured one."""
    if run is not None and config.batch.seconds_per_cost_unit is None:
        measured = measured_rate(run, config)
        if measured is not None:
            return measured
    return configured_rate(config)


def gpu_seconds_per_cost(config: Config, run: RunDir | None = None) -> float:
    """GPU-seconds per cost unit: true CFG (cfg_scale > 1) runs two branches."""
    return rate_for(config, run).seconds_per_cost_unit * (2 if config.sampling.cfg_scale > 1.0 else 1)


def job_plan(config: Config, videos: pa.Table | dict[str, Any]) -> ParallelPlan:
    """The layout a shard job will use: planned for one job's GPUs and the largest video (of a
    videos table, or that video's row itself: `PromptIndex.largest`)."""
    if isinstance(videos, pa.Table):
        largest = pc.index(videos["cost"], pc.max(videos["cost"])).as_py()
        videos = videos.slice(largest, 1).to_pylist()[0]
    sampling = sampling_for(videos, config.sampling)
    return plan_for_job(config, sampling, config.slurm.tasks_per_node, config.slurm.nodes)


def resubmit_walltime_min(
    config: Config, run: RunDir, shards: list[int], plans: dict[int, ParallelPlan]
) -> tuple[float, CostRate]:
    """Walltime (minutes) for jobs resubmitting `shards`: their remaining videos at the run's measured
    rate (`RESUBMIT_SAFETY` x, plus `batch.reserve_s`), never above `slurm.time_min`; `slurm.time_min`
    itself while the run has no measured figure. `plans`: each shard's `ParallelPlan`."""
    rate = rate_for(config, run)
    if not rate.source.startswith("measured"):
        return config.slurm.time_min, rate
    per_cost = gpu_seconds_per_cost(config, run)
    needed_s = 0.0
    for shard in shards:
        done = {r["video_id"] for r in run.manifest_rows(shard).to_pylist() if r["status"] == "done"}
        remaining = [v["cost"] for v in run.read_shard(shard).to_pylist() if v["video_id"] not in done]
        plan = plans[shard]
        # dp groups share the shard's videos: the busiest one holds its share plus one video
        busiest = sum(remaining) / plan.dp + (max(remaining) if remaining else 0.0)
        needed_s = max(needed_s, busiest * per_cost / plan.group)
    minutes = (needed_s * RESUBMIT_SAFETY + config.batch.reserve_s) / 60.0
    return min(config.slurm.time_min, math.ceil(minutes)), rate


def resubmission_config(config: Config, run: RunDir, shards: list[int]) -> tuple[Config, str]:
    """The config for jobs that resubmit `shards`: the walltime sized from the run's own finished
    videos (never above `slurm.time_min`), and the words that say so ("" while nothing is measured)."""
    plans = {shard: job_plan(config, run.read_shard(shard)) for shard in shards}
    minutes, rate = resubmit_walltime_min(config, run, shards, plans)
    if minutes >= config.slurm.time_min:
        return config, ""
    slurm = dataclasses.replace(config.slurm, time_min=minutes)
    note = (
        f" (walltime {minutes:g} min instead of slurm.time_min={config.slurm.time_min:g}: "
        f"{rate.seconds_per_cost_unit:.3g} GPU-s per token-step, {rate.source})"
    )
    return dataclasses.replace(config, slurm=slurm), note
