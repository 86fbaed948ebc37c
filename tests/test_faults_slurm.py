"""Fault injection on a real single-node Slurm cluster: crashes and hangs are retried as new jobs by
the job script's last step; USR2 (preemption) checkpoints and requeues through submitit."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from hvbatch.batch.control.commands import wait_for_run
from hvbatch.batch.rundir import RunDir
from hvbatch.cli import main
from tests.fault_helpers import (
    BUSY_PEER_FAULTS,
    BUSY_PEER_OVERRIDES,
    FAULT_PROMPTS,
    assert_exactly_once,
    metrics,
    submit_argv,
    write_prompts,
)
from tests.slurm_cluster import SlurmCluster

pytest_plugins = ["tests.slurm_cluster"]


def test_killed_rank_and_hung_collective_are_retried_as_new_jobs(
    tmp_path: Path, slurm_env: SlurmCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two shards, one sequence-parallel group of 2 ranks each: shard 0 loses rank 1 to SIGKILL, and
    # rank 1 of shard 1 hangs, so rank 0 times out in the next collective (6 s).
    faults = "action=kill,rank=1,shard=0,step=2,attempt=1;action=hang,rank=1,shard=1,step=2,attempt=1"
    monkeypatch.setenv("HVBATCH_FAULT", faults)
    prompts = write_prompts(tmp_path / "prompts.parquet")
    run_dir = tmp_path / "run"
    argv = submit_argv(prompts, run_dir, "slurm", "parallel.ulysses=2", "parallel.ring=1")
    assert main([*argv, "--wait"]) == 0
    assert_exactly_once(run_dir, FAULT_PROMPTS, {})
    by_shard = metrics(run_dir)
    assert [a["exit_reason"] for a in by_shard[0]] == ["crash", "completed"]
    assert "SIGKILL" in by_shard[0][0]["exit_detail"]
    assert [a["exit_reason"] for a in by_shard[1]] == ["timeout", "completed"]
    submissions = RunDir(run_dir).submissions()
    assert [s["kind"] for s in submissions] == ["manual", "auto", "auto"]
    assert all(s["delay_s"] >= 1 for s in submissions[1:])  # the backoff


def _first_job(run_dir: Path) -> str:
    return str(RunDir(run_dir).submissions()[0]["jobs"][0]["job_id"])


def _wait_for_first_video(run_dir: Path, timeout_s: float = 300) -> None:
    deadline = time.time() + timeout_s
    while not list((run_dir / "videos").glob("[!.]*.mp4")):
        assert time.time() < deadline, "no video was committed"
        time.sleep(0.5)


def test_usr2_preemption_requeues_and_resumes(tmp_path: Path, slurm_env: SlurmCluster) -> None:
    prompts = write_prompts(tmp_path / "prompts.parquet")
    run_dir = tmp_path / "run"
    argv = submit_argv(prompts, run_dir, "slurm", "parallel.ulysses=2", "parallel.ring=1",
                       "batch.min_shards=1", "sampling.num_inference_steps=12")  # fmt: skip
    assert main(argv) == 0
    _wait_for_first_video(run_dir)
    job_id = _first_job(run_dir)
    slurm_env.run(["scancel", "--signal=USR2", job_id])  # what a preempting scheduler sends
    assert wait_for_run(RunDir(run_dir), poll_s=2.0, timeout_s=400)
    assert_exactly_once(run_dir, FAULT_PROMPTS, {})
    attempts = metrics(run_dir)[0]
    assert [a["exit_reason"] for a in attempts] == ["preempted", "completed"]
    assert [a["attempt_key"] for a in attempts] == [f"job{job_id}.r0", f"job{job_id}.r1"]  # same job
    assert len(RunDir(run_dir).submissions()) == 1


def test_busy_peers_are_waited_for_on_slurm(
    tmp_path: Path, slurm_env: SlurmCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As tests/test_runtime_waits.py on the local executor, under srun (see BUSY_PEER_FAULTS).
    monkeypatch.setenv("HVBATCH_FAULT", BUSY_PEER_FAULTS)
    # A login shell's leftovers (sbatch exports the environment) must not reach the job.
    monkeypatch.setenv("MASTER_ADDR", "no-such-host.invalid")
    monkeypatch.setenv("MASTER_PORT", "1")
    prompts = write_prompts(tmp_path / "prompts.parquet")
    run_dir = tmp_path / "run"
    assert main([*submit_argv(prompts, run_dir, "slurm", *BUSY_PEER_OVERRIDES), "--wait"]) == 0
    assert_exactly_once(run_dir, FAULT_PROMPTS, {})
    (attempts,) = metrics(run_dir).values()
    assert [a["exit_reason"] for a in attempts] == ["completed"], attempts
    assert (attempts[0]["dp"], attempts[0]["ulysses"], attempts[0]["world_size"]) == (2, 2, 4)
    assert attempts[0]["wall_seconds"] > 20
    assert len(RunDir(run_dir).submissions()) == 1  # no retry was needed
