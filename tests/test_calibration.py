"""Shard sizing from the kernel the job will run: the seconds-per-cost-unit table, and its refinement
from the run's own finished videos for the jobs submitted later (retries, resubmissions, sbatch)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hvbatch.batch.attempt import AttemptKey
from hvbatch.batch.control import calibration
from hvbatch.batch.control.calibration import (
    AUTO_KERNEL,
    GPU_TYPES,
    SECONDS_PER_COST_UNIT,
    configured_rate,
    measured_rate,
    resubmission_config,
)
from hvbatch.batch.control.commands import create_run, plan_shards
from hvbatch.batch.control.prompts import read_prompts
from hvbatch.batch.executors import sbatch as sbatch_jobs
from hvbatch.batch.files import write_parquet_atomic
from hvbatch.batch.ledger import begin
from hvbatch.batch.rundir import MANIFEST_SCHEMA, RunDir
from hvbatch.config import load_config
from hvbatch.config_checks import CHOICES

TOKEN_STEPS_720P = 118_800 * 50


@pytest.mark.parametrize(
    ("overrides", "figure", "kernel"),
    [
        ([], 1.85e-4, "cudnn"),  # H100, auto: cuDNN (trusted by torch 2.11's cuDNN 9.17): 1.8x the FA2 figure
        (["model.attention=flash"], 3.3e-4, "flash"),  # the official FlashAttention-2 figure (1904 s)
        (["model.attention=fa3"], 1.85e-4, "fa3"),
        (["batch.gpu_type=a100"], 989 / 312 * 3.3e-4, "flash"),  # no cuDNN preference on sm80
        (["batch.gpu_type=a100", "model.attention=cudnn"], 989 / 312 * 3.3e-4, "flash"),
        (["batch.gpu_type=b200"], 0.5 * 1.85e-4, "cudnn"),
        (["batch.gpu_type=h200", "model.attention=sage"], 1.85e-4, "cudnn"),  # no figure: auto's
    ],
)
def test_default_comes_from_the_gpu_and_kernel_table(
    overrides: list[str], figure: float, kernel: str
) -> None:
    rate = configured_rate(load_config(overrides=overrides))
    assert rate.seconds_per_cost_unit == pytest.approx(figure)
    assert f"x {kernel} " in rate.source
    explicit = configured_rate(load_config(overrides=[*overrides, "batch.seconds_per_cost_unit=5e-4"]))
    assert explicit.seconds_per_cost_unit == 5e-4 and explicit.source == "batch.seconds_per_cost_unit"


def test_table_covers_every_gpu_and_the_config_lists_them() -> None:
    assert CHOICES["batch.gpu_type"] == GPU_TYPES
    for gpu in GPU_TYPES:
        assert (gpu, AUTO_KERNEL[gpu]) in SECONDS_PER_COST_UNIT and (gpu, "flash") in SECONDS_PER_COST_UNIT
    # 720p x 129 x 50 steps on one H100: the published 1904 s with FA2, ~1100 s with cuDNN
    assert SECONDS_PER_COST_UNIT[("h100", "flash")] * TOKEN_STEPS_720P == pytest.approx(1960, rel=0.01)
    assert SECONDS_PER_COST_UNIT[("h100", "cudnn")] * TOKEN_STEPS_720P == pytest.approx(1099, rel=0.01)


def _run_with_shards(
    tmp_path: Path, videos: int, overrides: list[str]
) -> tuple[RunDir, object, list[pa.Table]]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    prompts = tmp_path / "prompts.parquet"
    pq.write_table(pa.table({"prompt": [f"a fox number {i}" for i in range(videos)]}), prompts)
    config = load_config(overrides=overrides)
    table = read_prompts(prompts, config.sampling)
    plan = calibration.job_plan(config, table)
    shards = plan_shards(config, table, plan)
    run = RunDir(tmp_path / "run")
    create_run(run, config, prompts, shards, "local")
    return run, config, shards


def _finish(run: RunDir, shard: int, videos: list[dict], seconds: float, world: int = 8, dp: int = 8) -> None:
    """An attempt on `world` GPUs (dp groups of world/dp) that made `videos` in `seconds` each."""
    key = AttemptKey.slurm(f"job{shard}", 0)
    begin(run, shard, key, {"world_size": world, "dp": dp, "ulysses": world // dp, "ring": 1})
    rows = [
        {name: video.get(name) for name in MANIFEST_SCHEMA.names}
        | {"shard": shard, "status": "done", "attempt": 1, "final": False, "seconds": seconds}
        | {"attempt_key": str(key), "job_id": key.job_id, "path": "videos/x.mp4"}
        for video in videos
    ]
    write_parquet_atomic(
        run.manifest_part(shard, str(key), 0, 0), pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)
    )


def test_shards_hold_what_the_job_runs_in_its_walltime(tmp_path: Path) -> None:
    """At the cuDNN figure a 240 min job on 8 GPUs holds ~1.8x the videos the FA2 figure allowed."""
    _, _, cudnn = _run_with_shards(tmp_path / "a", 400, [])
    _, _, flash = _run_with_shards(tmp_path / "b", 400, ["model.attention=flash"])
    fits = 8 * (240 * 60 - 600) // 1099, 8 * (240 * 60 - 600) // 1960  # videos a job holds: 100, 56
    assert fits == (100, 56)
    assert max(s.num_rows for s in cudnn) <= 100 and max(s.num_rows for s in flash) <= 56
    assert (len(cudnn), len(flash)) == (4, 8)  # 400 videos: ceil(400 / 100), ceil(400 / 56)


def test_the_runs_own_videos_refine_later_submissions(tmp_path: Path) -> None:
    run, config, shards = _run_with_shards(tmp_path, 200, [])
    assert measured_rate(run, config) is None
    first = shards[0].to_pylist()
    _finish(run, 0, first[:2], seconds=600.0)
    assert measured_rate(run, config) is None  # 2 videos: too few to trust
    _finish(run, 0, first[:5], seconds=600.0)  # 5 videos of 720p x 129 x 50 steps, 600 s each, 1 GPU
    rate = measured_rate(run, config)
    assert rate is not None and rate.seconds_per_cost_unit == pytest.approx(600 / TOKEN_STEPS_720P)
    assert rate.source == "measured: median of 5 done videos of this run"
    # shard 1 retried: all its videos left, 8 dp groups of 1 GPU, at 1.5x the measured time + reserve
    sized, note = resubmission_config(config, run, [1])
    remaining = shards[1].num_rows
    busiest_s = (remaining / 8 + 1) * 600
    assert sized.slurm.time_min == -(-(busiest_s * 1.5 + 600) // 60) < config.slurm.time_min
    assert "measured: median of 5" in note
    script = sbatch_jobs.render(run, "array", [1])  # `hvbatch sbatch` for the later shards too
    assert f"#SBATCH --time={int(sized.slurm.time_min)}" in script
    slow, _ = resubmission_config(load_config(overrides=["batch.seconds_per_cost_unit=2e-4"]), run, [1])
    assert slow.slurm.time_min == config.slurm.time_min  # an explicit figure is kept: nothing refined
