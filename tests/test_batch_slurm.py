"""`hvbatch submit` on a real single-node Slurm cluster (8 fake GPUs, accounting): array jobs of 8 ranks."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from hvbatch.batch.rundir import RunDir
from hvbatch.cli import main
from tests.batch_helpers import EXAMPLE_CONFIG, EXAMPLE_PROMPTS, assert_every_video_done_once
from tests.slurm_cluster import SlurmCluster, wait_for_sacct_state

pytest_plugins = ["tests.slurm_cluster"]


def _submit_argv(run_dir: Path, *extra: str) -> list[str]:
    return ["submit", str(EXAMPLE_PROMPTS), "--config", str(EXAMPLE_CONFIG), "--executor", "slurm",
            "--run-dir", str(run_dir), *extra]  # fmt: skip


def test_slurm_array_runs_every_prompt_once(
    tmp_path: Path, slurm_env: SlurmCluster, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    argv = _submit_argv(run_dir, "--wait")
    assert (
        main([*argv[: argv.index("--executor")], "--executor", "auto", *argv[argv.index("slurm") + 1 :]]) == 0
    )
    error = capsys.readouterr().err
    assert "executor: slurm (--executor=auto: scontrol ping: Slurmctld(primary) at " in error, error
    assert_every_video_done_once(run_dir, capsys)
    run = RunDir(run_dir)
    jobs = run.submissions()[0]["jobs"]
    assert len(jobs) == run.num_shards() >= 2
    assert len({job["job_id"].split("_")[0] for job in jobs}) == 1  # one array
    metrics = [pq.read_table(p).to_pylist()[0] for p in sorted((run_dir / "metrics").glob("*.parquet"))]
    assert sorted(m["array_index"] for m in metrics) == list(range(run.num_shards()))
    for row in metrics:
        assert row["world_size"] == 8 and row["dp"] * row["ulysses"] * row["ring"] == 8
        assert row["job_id"] in {job["job_id"] for job in jobs}
    for job in jobs:  # the jobs end (and accounting catches up) shortly after the last marker
        assert wait_for_sacct_state(job["job_id"], slurm_env.env, timeout=120) == "COMPLETED"
        # Rank 0 says what the job is doing from before torch's import on, in the job's log.
        log = (run_dir / "submitit" / job["job_id"] / f"{job['job_id']}_0_log.err").read_text()
        phases = ["8 ranks started; importing torch", "imports done", "8 ranks up in", "model loaded in",
                  "first denoising step done", f"attempt job{job['job_id']}.r0 ended: completed"]  # fmt: skip
        at = [log.find(phase) for phase in phases]
        assert -1 not in at and at == sorted(at), (at, log)


def test_scancel_mid_shard_then_retry(
    tmp_path: Path, slurm_env: SlurmCluster, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    # One sequence-parallel group of 8 per job, so a shard's videos are made one at a time.
    argv = _submit_argv(run_dir, "sampling.num_inference_steps=20", "parallel.ulysses=4", "parallel.ring=2")
    assert main(argv) == 0
    deadline = time.time() + 300
    while not list((run_dir / "videos").glob("[!.]*.mp4")) and time.time() < deadline:
        time.sleep(0.5)
    time.sleep(1)  # the done row follows the mp4
    assert main(["cancel", str(run_dir)]) == 0
    deadline = time.time() + 60
    while slurm_env.run(["squeue", "-h"]).strip() and time.time() < deadline:
        time.sleep(1)
    capsys.readouterr()
    assert main(["status", str(run_dir), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert 1 <= status["counts"]["done"] < 6 and status["counts"]["running"] == 0
    assert main(["retry", str(run_dir), "--wait"]) == 0
    assert_every_video_done_once(run_dir, capsys)
    assert len(RunDir(run_dir).submissions()) == 2
    # No attempt is left `running`, and the cancelled job was not retried automatically (2 submissions).
    reasons = [row["exit_reason"] for row in RunDir(run_dir).metrics_rows()]
    assert set(reasons) <= {"cancelled", "completed"} and reasons.count("completed") == 2


def test_slurm_runs_tiny_15_every_prompt_once(
    tmp_path: Path, slurm_env: SlurmCluster, capsys: pytest.CaptureFixture[str]
) -> None:
    """HunyuanVideo-1.5's structure (model=tiny-1.5) through a real Slurm array: every video once."""
    run_dir = tmp_path / "run"
    assert main([*_submit_argv(run_dir, "model=tiny-1.5", "sampling.cfg_scale=2", "--wait")]) == 0
    assert_every_video_done_once(run_dir, capsys)
    metrics = RunDir(run_dir).metrics_rows()
    assert metrics and all(row["exit_reason"] == "completed" for row in metrics)
    assert "family: hunyuan-video-1.5" in (run_dir / "config.yaml").read_text()
