"""The local executor's processes: what Ctrl-C, a killed controller and a long run do to them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hvbatch.batch.rundir import RunDir
from hvbatch.cli import main
from tests.fault_helpers import FAULT_PROMPTS, assert_exactly_once, metrics, submit_argv, write_prompts

REPO = Path(__file__).resolve().parents[1]


def _processes_of(run_dir: Path) -> list[int]:
    """Pids of processes whose command line names the run directory (ranks, supervisor)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(run_dir) in text and int(cmdline.parent.name) != os.getpid():
            found.append(int(cmdline.parent.name))
    return found


def _wait_for(condition: object, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not condition():  # type: ignore[operator]
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def _running_shard(run_dir: Path) -> bool:
    return any(row["exit_reason"] == "running" for row in RunDir(run_dir).metrics_rows())


def test_ctrl_c_on_wait_stops_the_local_job_as_cancelled(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prompts = write_prompts(tmp_path / "prompts.parquet")
    run_dir = tmp_path / "run"
    argv = submit_argv(prompts, run_dir, "local")
    env = dict(os.environ, HVBATCH_FAULT="action=slow,rank=all,step=1,seconds=4")
    # A terminal's Ctrl-C reaches the whole foreground process group: submit and all it started.
    process = subprocess.Popen(
        [sys.executable, "-m", "hvbatch", *argv, "--wait"],
        cwd=REPO,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        _wait_for(lambda: (run_dir / "metrics").is_dir() and _running_shard(run_dir), 180, "a running shard")
        os.killpg(process.pid, signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 130, stderr
    assert "stopped waiting" in stderr and "local job was stopped" in stderr, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    _wait_for(lambda: not _processes_of(run_dir), 30, "the job's processes to exit")
    reasons = [row["exit_reason"] for row in RunDir(run_dir).metrics_rows()]
    assert reasons and set(reasons) <= {"cancelled", "completed"} and "cancelled" in reasons, reasons
    capsys.readouterr()
    assert main(["status", str(run_dir), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["counts"]["running"] == 0 and status["eta_seconds"] is None, status
    assert main(["retry", str(run_dir), "--wait"]) == 0  # resumes; each video once
    assert_exactly_once(run_dir, FAULT_PROMPTS, {})


def test_killing_the_local_controller_takes_its_ranks_with_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HVBATCH_FAULT", "action=slow,rank=all,step=1,seconds=30")
    prompts = write_prompts(tmp_path / "prompts.parquet")
    run_dir = tmp_path / "run"
    assert main(submit_argv(prompts, run_dir, "local")) == 0
    (submission,) = RunDir(run_dir).submissions()
    controller = int(submission["jobs"][0]["job_id"])
    _wait_for(lambda: (run_dir / "metrics").is_dir() and _running_shard(run_dir), 180, "a running shard")
    assert len(_processes_of(run_dir)) >= 3  # the supervisor and two ranks
    os.kill(controller, signal.SIGKILL)
    _wait_for(lambda: not _processes_of(run_dir), 30, "the ranks to die with their controller")


def test_the_local_time_limit_is_per_shard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Every video is 5 s slower than usual. time_min 0.25 (15 s) minus the 3 s signal delay gives
    # each shard 12 s of its own; a shard (its videos on 2 dp replicas) takes about 6 s, while the
    # run as a whole, with the model load and every shard, takes longer than 15 s and must not be
    # cut short.
    monkeypatch.setenv("HVBATCH_FAULT", "action=slow,rank=all,step=1,seconds=5")
    prompts = write_prompts(tmp_path / "prompts.parquet")
    run_dir = tmp_path / "run"
    overrides = ["slurm.time_min=0.25", "retry.signal_delay_s=3", "batch.reserve_s=1", "batch.min_shards=2"]
    started = time.time()
    assert main([*submit_argv(prompts, run_dir, "local", *overrides), "--wait"]) == 0
    assert time.time() - started > 15
    assert_exactly_once(run_dir, FAULT_PROMPTS, {})
    by_shard = metrics(run_dir)
    assert len(by_shard) >= 2
    assert all([a["exit_reason"] for a in attempts] == ["completed"] for attempts in by_shard.values()), (
        by_shard
    )
    assert len({a["job_id"] for attempts in by_shard.values() for a in attempts}) == 1  # one job for all
    for attempts in by_shard.values():  # each shard's own time, not the job's since it started
        assert attempts[0]["wall_seconds"] < 12


def test_captured_submit_returns_while_the_local_job_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`out=$(hvbatch submit ...)` / `| tee log`: the local job does not hold the caller's pipe."""
    prompts = write_prompts(tmp_path / "p.parquet", FAULT_PROMPTS[:1])
    run_dir = tmp_path / "run"
    argv = submit_argv(prompts, run_dir, "local", "sampling.num_inference_steps=40", "slurm.tasks_per_node=1")
    done = subprocess.run(  # returns when the pipes close, not when the process exits
        [sys.executable, "-m", "hvbatch", *argv], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert done.returncode == 0 and f"run {run_dir}:" in done.stdout
    try:
        assert not RunDir(run_dir).completed_shards()  # still running: it would be done had it held them
    finally:
        assert main(["cancel", str(run_dir)]) == 0
        capsys.readouterr()
