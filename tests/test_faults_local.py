"""Fault injection through the local executor: every prompt ends as one video or one clear error.

Each test injects faults with HVBATCH_FAULT (what users rehearse with) and checks the manifest, the
files on disk and the attempts' exit reasons.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from hvbatch.batch.control.commands import wait_for_run
from hvbatch.batch.executors.base import JobRecord
from hvbatch.batch.executors.local import LocalExecutor
from hvbatch.batch.executors.registry import live_states
from hvbatch.batch.rundir import RunDir
from hvbatch.cli import main
from hvbatch.config import load_config
from tests.fault_helpers import (
    FAULT_PROMPTS,
    assert_exactly_once,
    manifest,
    metrics,
    submit_argv,
    write_prompts,
)

FOX, CITY, KITE, PLAIN = (p["id"] for p in FAULT_PROMPTS)


def test_crash_poison_nan_and_write_failure_then_retry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    faults = [
        f"action=kill,rank=all,video={PLAIN},step=2,attempt=1",  # SIGKILL mid-step, first attempt only
        f"action=raise,rank=all,video={FOX}",  # a poison prompt: raises every time
        f"action=nan,rank=all,video={CITY}",  # the model produces NaN every time
        f"action=write-error,rank=all,video={KITE}",  # the mp4 cannot be written
    ]
    monkeypatch.setenv("HVBATCH_FAULT", ";".join(faults))
    prompts = write_prompts(tmp_path / "prompts.parquet")
    run_dir = tmp_path / "run"
    assert main([*submit_argv(prompts, run_dir, "local"), "--wait"]) == 0
    failed = {FOX: "InjectedFault", CITY: "NaN or Inf", KITE: "OSError"}
    assert_exactly_once(run_dir, FAULT_PROMPTS, failed)
    rows = manifest(capsys, run_dir)
    assert {vid: rows[vid]["status"] for vid in rows} == {FOX: "failed", CITY: "failed", KITE: "failed",
                                                          PLAIN: "done"}  # fmt: skip
    for vid in failed:  # failed for good after retry.max_prompt_attempts (2), not retried forever
        assert rows[vid]["attempts"] == 2
    plain_shard = rows[PLAIN]["shard"]
    attempts = metrics(run_dir)[plain_shard]
    assert [a["exit_reason"] for a in attempts] == ["crash", "completed"]
    assert "SIGKILL" in attempts[0]["exit_detail"]
    # A second submit into the run directory is refused; `hvbatch retry` (faults fixed) finishes.
    assert main(submit_argv(prompts, run_dir, "local")) == 2
    monkeypatch.delenv("HVBATCH_FAULT")
    assert main(["retry", str(run_dir), "--wait"]) == 0
    assert_exactly_once(run_dir, FAULT_PROMPTS, {})
    assert all(row["status"] == "done" for row in manifest(capsys, run_dir).values())


def test_rank_hung_in_a_collective_times_out_and_is_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One sequence-parallel group of 2: rank 1 hangs at step 2, rank 0 waits in the next collective.
    monkeypatch.setenv("HVBATCH_FAULT", f"action=hang,rank=1,video={PLAIN},step=2,attempt=1")
    prompts = write_prompts(tmp_path / "prompts.parquet", FAULT_PROMPTS[2:])
    run_dir = tmp_path / "run"
    argv = submit_argv(
        prompts, run_dir, "local", "parallel.ulysses=2", "parallel.ring=1", "batch.min_shards=1"
    )
    started = time.time()
    assert main([*argv, "--wait"]) == 0
    assert time.time() - started < 150  # ended by the 6 s timeout, not by the walltime
    assert_exactly_once(run_dir, FAULT_PROMPTS[2:], {})
    attempts = metrics(run_dir)[0]
    assert [a["exit_reason"] for a in attempts] == ["timeout", "completed"]
    assert attempts[1]["ulysses"] == 2


def test_walltime_checkpoints_requeues_and_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The first attempt's `plain` video is still running (a hang stands in for a slow video) when
    # USR2 comes, 20 s before the 40 s walltime: the attempt records `walltime`, submitit requeues
    # the job, and the next attempt makes only that video.
    monkeypatch.setenv("HVBATCH_FAULT", f"action=hang,rank=all,video={PLAIN},step=1,attempt=1")
    prompts = write_prompts(tmp_path / "prompts.parquet", FAULT_PROMPTS[2:])
    run_dir = tmp_path / "run"
    overrides = [
        "slurm.time_min=0.67",
        "retry.signal_delay_s=20",
        "batch.min_shards=1",
        "batch.reserve_s=1",
        "parallel.timeout_s=120",
    ]  # the hang must outlast the walltime warning, not time out
    assert main([*submit_argv(prompts, run_dir, "local", *overrides), "--wait"]) == 0
    assert_exactly_once(run_dir, FAULT_PROMPTS[2:], {})
    attempts = metrics(run_dir)[0]
    assert [a["exit_reason"] for a in attempts] == ["walltime", "completed"]
    assert len({a["attempt_key"] for a in attempts}) == 2  # each under its own key
    assert len({a["job_id"] for a in attempts}) == 1  # requeued, not resubmitted
    assert manifest_attempts(run_dir, PLAIN) == ["started", "done"]


def manifest_attempts(run_dir: Path, video_id: str) -> list[str]:
    rows = sorted(RunDir(run_dir).manifest_rows().to_pylist(), key=lambda r: r["finished_at"])
    return [r["status"] for r in rows if r["video_id"] == video_id]


def test_overlapping_attempts_commit_each_video_once(tmp_path: Path) -> None:
    prompts = write_prompts(tmp_path / "prompts.parquet")
    run_dir = tmp_path / "run"
    assert main(submit_argv(prompts, run_dir, "local", "batch.min_shards=1")) == 0
    run = RunDir(run_dir)
    # A straggler: a second job for the same shard, racing the first on every video.
    LocalExecutor(run, load_config(run.root / "config.yaml")).submit([0], manual=False)
    assert wait_for_run(run, poll_s=1.0, timeout_s=300)
    records = [JobRecord.from_dict(r) for s in run.submissions() for r in s["jobs"]]
    deadline = time.time() + 120
    while live_states(run, records) and time.time() < deadline:
        time.sleep(1)
    assert_exactly_once(run_dir, FAULT_PROMPTS, {})
    assert not [p for p in (run_dir / "videos").iterdir() if p.name.startswith(".")]  # no temp left
    # Each job found the other alive when it started: neither marked the other's attempt lost.
    reasons = [row["exit_reason"] for row in RunDir(run_dir).metrics_rows()]
    assert reasons == ["completed", "completed"], reasons


def test_leader_killed_during_an_overlapped_write_loses_and_duplicates_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One rank makes `kite`, then `plain`: kite's mp4 is written in the background (slowed by 30 s)
    # while plain denoises, and the rank is SIGKILLed at plain's step 2, in the middle of kite's write.
    faults = [f"action=slow-write,video={KITE},attempt=1", f"action=kill,video={PLAIN},step=2,attempt=1"]
    monkeypatch.setenv("HVBATCH_FAULT", ";".join(faults))
    prompts = write_prompts(tmp_path / "prompts.parquet", FAULT_PROMPTS[2:])
    run_dir = tmp_path / "run"
    overrides = ("slurm.tasks_per_node=1", "batch.min_shards=1", "sampling.num_inference_steps=2")
    assert main([*submit_argv(prompts, run_dir, "local", *overrides), "--wait"]) == 0
    assert_exactly_once(run_dir, FAULT_PROMPTS[2:], {})
    assert [a["exit_reason"] for a in metrics(run_dir)[0]] == ["crash", "completed"]
    # Kite's write was lost with the rank (written to a temporary name, never linked, no row) and
    # made again by the retry; had it been written between the videos, attempt 1 would have done it.
    assert manifest_attempts(run_dir, KITE) == ["started", "done"]
    assert manifest_attempts(run_dir, PLAIN) == ["started", "done"]
