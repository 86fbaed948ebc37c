"""`retry`, `cancel` and `retry --repair` on a real single-node Slurm cluster, racing the queue."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hvbatch.batch.control.commands import wait_for_run
from hvbatch.batch.rundir import RunDir
from hvbatch.cli import main
from tests.fault_helpers import FAULT_PROMPTS, assert_exactly_once, metrics, submit_argv, write_prompts
from tests.slurm_cluster import SlurmCluster, wait_until

pytest_plugins = ["tests.slurm_cluster"]
TWELVE = [{"id": f"p{i:02d}", "prompt": f"A small scene number {i}.", "seed": i} for i in range(12)]


def _job_ids(run_dir: Path) -> list[str]:
    return sorted({str(job["job_id"]) for s in RunDir(run_dir).submissions() for job in s["jobs"]})


def _queued(cluster: SlurmCluster, job_ids: list[str]) -> list[str]:
    return cluster.run(["squeue", "-h", "-r", "-o", "%i %T", "--jobs", ",".join(job_ids)]).split("\n")[:-1]


def test_retry_wait_right_after_scancel_makes_every_video_once(
    tmp_path: Path,
    slurm_env: SlurmCluster,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Before: 5 s after a scancel the jobs were still COMPLETING, and `retry --wait` printed
    # "still have a queued or running job" and "nothing to retry", exited 0, and 0 of 12 videos
    # were ever made. Here the retry starts while squeue still shows a cancelled job COMPLETING
    # (its ranks ignore SIGTERM until KillWait): within 5 s of the scancel, however fast the
    # cluster clears it. The first job is busy in its third video when it is cancelled.
    monkeypatch.setenv("HVBATCH_FAULT", "action=slow,rank=all,video=2,seconds=15,attempt=1")
    prompts = write_prompts(tmp_path / "prompts.parquet", TWELVE)
    run_dir = tmp_path / "run"
    assert main(submit_argv(prompts, run_dir, "slurm")) == 0
    jobs = _job_ids(run_dir)
    assert len(jobs) == 2  # two shards of six
    wait_until(lambda: len(list((run_dir / "videos").glob("[!.]*.mp4"))) >= 4, 400, "two videos a shard")
    slurm_env.run(["scancel", *jobs])
    queue = _queued(slurm_env, jobs)
    assert any(line.endswith(" COMPLETING") for line in queue), queue
    capsys.readouterr()
    assert main(["retry", str(run_dir), "--wait"]) == 0, queue
    out = capsys.readouterr().out
    assert "resubmitted shards [0, 1]" in out, (queue, out)
    assert_exactly_once(run_dir, TWELVE, {})
    submissions = RunDir(run_dir).submissions()
    assert [s["kind"] for s in submissions] == ["manual", "manual"]  # no automatic retry of a scancel
    for attempts in metrics(run_dir).values():
        assert [a["exit_reason"] for a in attempts] in (["cancelled", "completed"], ["completed"])


def _cancel(run_dir: Path) -> subprocess.CompletedProcess[str]:
    """`hvbatch cancel` as the executable a user runs."""
    command = [sys.executable, "-m", "hvbatch", "cancel", str(run_dir)]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=dict(os.environ))


def test_cancel_racing_the_end_of_a_job_never_aborts(
    tmp_path: Path, slurm_env: SlurmCluster, capsys: pytest.CaptureFixture[str]
) -> None:
    # Before: one `hvbatch cancel` racing a job's end died with `terminate called without an
    # active exception` (exit 134). Here cancels run while the job writes its last rows, its
    # marker and its metrics, and exits.
    prompts = write_prompts(tmp_path / "prompts.parquet")
    run_dir = tmp_path / "run"
    assert main(submit_argv(prompts, run_dir, "slurm", "batch.min_shards=1")) == 0
    jobs = _job_ids(run_dir)
    run = RunDir(run_dir)
    wait_until(lambda: len(list((run_dir / "videos").glob("[!.]*.mp4"))) >= 3, 400, "three videos")
    results = []
    deadline = time.monotonic() + 300
    while _queued(slurm_env, jobs) and time.monotonic() < deadline:
        results.append(_cancel(run_dir))
    results.append(_cancel(run_dir))  # and once the job has gone
    for result in results:
        assert "terminate called" not in result.stderr, result.stderr[-2000:]
        assert result.returncode in (0, 1), (result.returncode, result.stderr[-2000:])
        assert "Traceback" not in result.stderr, result.stderr[-2000:]
    assert len(results) >= 2
    if not run.completed_shards():  # a cancel won the race: the rest is made by a retry
        assert main(["retry", str(run_dir), "--wait"]) == 0
    assert_exactly_once(run_dir, FAULT_PROMPTS, {})


def test_repair_with_live_jobs_and_an_empty_record_resubmits_nothing_alive(
    tmp_path: Path,
    slurm_env: SlurmCluster,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Before: with the submission record empty, `retry --repair` moved it aside and submitted both
    # shards again next to their jobs (exactly once held only by luck of the commit). Each job
    # takes the node's 8 CPUs (2 tasks x 4), so one shard runs (slowly) while the other's job is queued.
    monkeypatch.setenv("HVBATCH_FAULT", "action=slow,rank=all,video=1,seconds=15,attempt=1")
    prompts = write_prompts(tmp_path / "prompts.parquet")
    run_dir = tmp_path / "run"
    run = RunDir(run_dir)
    assert main(submit_argv(prompts, run_dir, "slurm", "slurm.cpus_per_task=4")) == 0
    jobs = _job_ids(run_dir)
    (begun,) = wait_until(lambda: {int(m["shard"]) for m in run.metrics_rows()}, 400, "a shard to begin")
    queued = 1 - begun
    (run_dir / "jobs" / "submission-0001.json").write_bytes(b"")  # lost in a crash
    capsys.readouterr()
    assert main(["retry", str(run_dir), "--repair"]) == 1
    captured = capsys.readouterr()
    assert "moved corrupt file to" in captured.out and "resubmitted shards" not in captured.out
    assert f"shards [{begun}] still have a queued or running job ({jobs[begun]} (RUNNING))" in captured.out
    assert f"jobs {jobs[queued]} (PENDING) of this run are in the queue but in no readable" in captured.err
    # The running job is known again (a `recovered` record); no job was submitted.
    (recovered,) = run.submissions()
    assert recovered["kind"] == "recovered" and _job_ids(run_dir) == [jobs[begun]]
    # Once the queued job has begun its shard, a retry places it too, and still submits nothing.
    wait_until(lambda: len(run.metrics_rows()) == 2, 400, "the second shard to begin")
    assert main(["retry", str(run_dir)]) == 0
    assert _job_ids(run_dir) == jobs
    assert wait_for_run(run, poll_s=2.0, timeout_s=400)
    assert_exactly_once(run_dir, FAULT_PROMPTS, {})
    assert [[a["exit_reason"] for a in attempts] for attempts in metrics(run_dir).values()] == [
        ["completed"], ["completed"]
    ]  # fmt: skip
    assert [s["kind"] for s in run.submissions()] == ["recovered", "recovered"]
