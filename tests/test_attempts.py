"""Attempt bookkeeping without running jobs: fault specs, exit reasons, budgets, commits."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from hvbatch.batch import ledger
from hvbatch.batch.attempt import (
    EXIT_STALLED,
    AttemptKey,
    ExitReason,
    classify_exit,
    interruption_reason,
    parse_sacct_state,
    parse_srun_failure,
)
from hvbatch.batch.files import write_json_atomic, write_parquet_atomic
from hvbatch.batch.ledger import backoff_seconds, video_histories
from hvbatch.batch.rundir import MANIFEST_SCHEMA, METRICS_SCHEMA, RunDir
from hvbatch.batch.runtime.faults import FaultInjector, InjectedFault, parse_faults
from hvbatch.batch.runtime.support import commit_video
from hvbatch.config import RetryConfig, VideoConfig


def test_fault_specs_parse_and_select() -> None:
    faults = parse_faults("action=kill,rank=1,shard=0,video=fox,step=3,attempt=1; action=nan,rank=all")
    assert faults[0].action == "kill" and faults[0].rank == 1 and faults[0].step == 3
    assert faults[1].rank is None and faults[1].video is None
    injector = FaultInjector(tuple(faults))
    chosen = injector.for_video(rank=1, shard=0, video_index=2, video_id="fox", attempt=1)
    assert chosen is not None and chosen.nan and len(chosen.faults) == 2
    assert injector.for_video(rank=1, shard=0, video_index=2, video_id="fox", attempt=2).faults == tuple(
        faults[1:]
    )
    assert injector.for_video(rank=0, shard=5, video_index=0, video_id="x", attempt=1).faults == tuple(
        faults[1:]
    )
    raising = FaultInjector(tuple(parse_faults("action=raise,video=0,step=2")))
    video = raising.for_video(rank=0, shard=0, video_index=0, video_id="a", attempt=1)
    assert video is not None
    video.at_step(1)  # not yet
    with pytest.raises(InjectedFault):
        video.at_step(2)
    with pytest.raises(OSError, match="injected write failure"):
        FaultInjector(tuple(parse_faults("action=write-error"))).for_video(
            rank=0, shard=0, video_index=0, video_id="a", attempt=1
        ).at_write()  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("action=explode", "action must be one of"),
        ("action=kill,when=now", "unknown keys ['when']"),
        ("action=kill,rank=one", "are integers"),
        ("kill", "is not key=value"),
    ],
)
def test_bad_fault_specs_say_what_is_wrong(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_faults(spec)


def test_fault_injection_is_off_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HVBATCH_FAULT", raising=False)
    assert FaultInjector.from_spec("") is None
    monkeypatch.setenv("HVBATCH_FAULT", "action=hang")
    injector = FaultInjector.from_spec("action=kill")
    assert injector is not None and injector.faults[0].action == "hang"  # the environment wins


def _error(kind: str, rank: int = 0) -> dict[str, Any]:
    return {"kind": kind, "rank": rank, "error": f"{kind} on rank {rank}"}


def test_exit_reasons() -> None:
    assert classify_exit(137, []) == ("crash", "killed by SIGKILL")
    assert classify_exit(-int(signal.SIGABRT), [_error("peer-lost")])[1] == "killed by SIGABRT"
    # A peer's timeout names the cause of a hang; the hung rank only shows the kill it got.
    assert classify_exit(137, [_error("timeout", 0)])[0] == "timeout"
    timed_out = ("timeout", "rank 0: timeout on rank 0")
    assert classify_exit(1, [_error("failed", 2), _error("timeout")]) == timed_out
    assert classify_exit(1, [_error("failed", 2)]) == ("failed", "rank 2: failed on rank 2")
    assert classify_exit(124, [])[0] == "stalled"
    assert classify_exit(1, [], "OUT_OF_MEMORY")[0] == "oom"
    assert classify_exit(None, [], "CANCELLED")[0] == "cancelled"
    assert classify_exit(None, [], "NODE_FAIL")[0] == "node-failure"
    assert classify_exit(None, [])[0] == "lost"
    assert classify_exit(1, [_error("peer-lost", 3)]) == ("crash", "exit code 1; rank 3: peer-lost on rank 3")


def test_backoff_doubles_up_to_a_cap() -> None:
    retry = RetryConfig(backoff_s=30, max_backoff_s=100)
    assert [backoff_seconds(retry, n) for n in (1, 2, 3, 4)] == [30, 60, 100, 100]


def test_walltime_or_preemption_from_when_usr2_came() -> None:
    assert interruption_reason(elapsed_s=590, time_min=10, signal_delay_s=30) == "walltime"
    assert interruption_reason(elapsed_s=60, time_min=240, signal_delay_s=120) == "preempted"


def test_srun_failures_and_sacct_states_are_parsed() -> None:
    log = "traceback...\nsrun: error: node2: task 1: Aborted\nsrun: error: node2: task 0: Terminated\n"
    assert parse_srun_failure(log) == 128 + signal.SIGABRT
    assert parse_srun_failure("srun: error: node1: task 3: Killed\n") == 128 + signal.SIGKILL
    # srun names several tasks at once when they fail together.
    assert parse_srun_failure("srun: error: node1: tasks 0-3: Killed\n") == 128 + signal.SIGKILL
    assert parse_srun_failure("srun: error: n: tasks 1,5: Exited with exit code 3\n") == 3
    assert parse_srun_failure("srun: error: n: task 2: Out Of Memory\n") == "oom"
    assert parse_srun_failure("nothing here") is None
    assert parse_sacct_state("CANCELLED by 1000\n") == "CANCELLED"
    assert parse_sacct_state("NODE_FAIL\n") == "NODE_FAIL"
    assert parse_sacct_state("") is None
    assert classify_exit(None, [], parse_sacct_state("CANCELLED by 1000"))[0] == "cancelled"


def test_attempt_keys_format_and_parse_in_one_place() -> None:
    assert str(AttemptKey.slurm("123_4", 2)) == "job123_4.r2"
    assert str(AttemptKey.local("9876", 0)) == "job9876.a0"
    for text in ("job123_4.r2", "job9876.a0", "jobpid55.r0"):
        assert str(AttemptKey.parse(text)) == text
    assert AttemptKey.parse("job123_4.r2").job_id == "123_4"
    for bad in ("k1", "job.r1", "job12.x1", "job12.r"):
        with pytest.raises(ValueError, match="is not an attempt key"):
            AttemptKey.parse(bad)
    assert not ExitReason.WALLTIME.charges_videos and ExitReason.CRASH.charges_videos


def _video(vid: str) -> dict[str, Any]:
    return {"video_id": vid, "prompt_id": vid, "prompt": f"p {vid}", "seed": 0, "height": 48, "width": 64,
            "num_frames": 5, "num_inference_steps": 2, "cost": 1.0}  # fmt: skip


def _run(tmp_path: Path, videos: list[str]) -> RunDir:
    run = RunDir(tmp_path / "run")
    write_parquet_atomic(run.shard_path(0), pa.Table.from_pylist([_video(v) for v in videos]))
    write_json_atomic(run.run_json, {"num_shards": 1, "created_at": 0.0})
    return run


def _attempt(run: RunDir, key: str, reason: str, rows: list[tuple[str, str]], at: float) -> None:
    metrics = {name: None for name in METRICS_SCHEMA.names} | {
        "job_id": AttemptKey.parse(key).job_id, "attempt_key": key, "shard": 0, "exit_reason": reason,
        "started_at": at,
    }  # fmt: skip
    write_parquet_atomic(run.metrics_part(0, key), pa.Table.from_pylist([metrics], schema=METRICS_SCHEMA))
    manifest = [
        {name: None for name in MANIFEST_SCHEMA.names}
        | {
            "video_id": vid,
            "status": status,
            "attempt_key": key,
            "finished_at": at + 1,
            "final": False,
            "error": "boom" if status == "failed" else None,
        }
        for vid, status in rows
    ]
    write_parquet_atomic(run.manifest_part(0, key, 0), pa.Table.from_pylist(manifest, schema=MANIFEST_SCHEMA))


def test_videos_are_charged_for_crashes_but_not_for_walltime(tmp_path: Path) -> None:
    run = _run(tmp_path, ["a", "b", "c"])
    _attempt(run, "job1.r0", "walltime", [("a", "started")], at=10)
    _attempt(run, "job1.r1", "crash", [("a", "done"), ("b", "started")], at=20)
    _attempt(run, "job2.r0", "completed", [("c", "failed")], at=30)
    histories = video_histories(run, 0, None)
    assert histories["a"].done and histories["a"].attempts == 0
    assert histories["b"].attempts == 1 and "crash" in (histories["b"].last_error or "")
    assert histories["c"].attempts == 1 and histories["c"].last_error == "boom"
    # `hvbatch retry` (a manual submission) starts the counts again.
    run.add_submission({"submitted_at": 100.0, "executor": "local", "kind": "manual",
                        "jobs": [{"shard": 0, "job_id": "9", "executor": "local"}]})  # fmt: skip
    histories = video_histories(run, 0, None)
    assert histories["b"].attempts == 0 and histories["c"].attempts == 0 and histories["a"].done


def test_attempts_used_up_end_every_video_as_one_failure(tmp_path: Path) -> None:
    run = _run(tmp_path, ["a", "b", "c"])
    now = time.time()
    _attempt(run, "job1.r0", "running", [("a", "done"), ("b", "started")], at=now)
    resubmitted: list[tuple[list[int], float]] = []
    retry = RetryConfig(max_attempts=2, backoff_s=5)
    key1, key2 = AttemptKey.parse("job1.r0"), AttemptKey.parse("job2.r0")
    fates = ledger.finish(run, retry, [0], key1, 137, resubmit=lambda s, d: resubmitted.append((s, d)))
    assert fates == {0: "retry"} and resubmitted == [([0], 5.0)]
    assert run.metrics_rows(0)[0]["exit_reason"] == "crash"
    _attempt(run, "job2.r0", "running", [("b", "started")], at=now + 1)
    fates = ledger.finish(run, retry, [0], key2, 137, resubmit=lambda s, d: resubmitted.append((s, d)))
    assert fates == {0: "gave-up"} and len(resubmitted) == 1
    rows = [r for r in run.manifest_rows(0).to_pylist() if r["status"] == "failed"]
    assert sorted(r["video_id"] for r in rows) == ["b", "c"] and all(r["final"] for r in rows)
    assert "gave up after 2 attempts (last: crash: killed by SIGKILL)" in rows[0]["error"]
    marker = json.loads(run.done_marker(0).read_text())
    assert marker["done"] == 1 and marker["failed"] == 2


def test_submissions_get_distinct_numbers_when_recorded_concurrently(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    threads = [threading.Thread(target=run.add_submission, args=({"n": i, "jobs": []},)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(s["n"] for s in run.submissions()) == list(range(16))


def test_a_video_is_committed_once(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    frames = np.zeros((3, 16, 16, 3), np.uint8)
    assert commit_video(run, "a/../b", frames, VideoConfig(), AttemptKey.parse("job1.r0"), None)
    first = run.video_path("a/../b").read_bytes()
    assert not commit_video(run, "a/../b", frames + 50, VideoConfig(), AttemptKey.parse("job2.r0"), None)
    assert run.video_path("a/../b").read_bytes() == first  # the first commit stands
    assert [p.name for p in (tmp_path / "videos").iterdir()] == [run.video_path("a/../b").name]


class _Probe:
    def __init__(self, alive: dict[str, bool | None], state: str | None = None) -> None:
        self.alive, self.state = alive, state

    def is_alive(self, job_id: str) -> bool | None:
        return self.alive[job_id]

    def final_state(self, job_id: str) -> str | None:
        return self.state


def test_stale_running_attempts_are_closed_and_live_ones_kept(tmp_path: Path) -> None:
    run = _run(tmp_path, ["a"])
    _attempt(run, "job7.r0", "running", [("a", "started")], at=1.0)
    _attempt(run, "job8.r0", "running", [("a", "started")], at=2.0)
    _attempt(run, "job9.r0", "running", [("a", "started")], at=3.0)
    # job7 is gone (sacct: cancelled), job8 is a concurrent job still alive, job9's state is unknown.
    ledger.reconcile(run, [0], _Probe({"7": False, "8": True, "9": None}, "CANCELLED"))
    reasons = {row["attempt_key"]: row["exit_reason"] for row in run.metrics_rows(0)}
    assert reasons == {"job7.r0": "cancelled", "job8.r0": "running", "job9.r0": "running"}


def test_sbatch_template_jobs_resubmit_their_script_after_a_crash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hvbatch.batch.executors import sbatch, slurm
    from hvbatch.config import load_config, save_config

    run = _run(tmp_path, ["a"])
    save_config(load_config(overrides=["model=tiny", "retry.backoff_s=7"]), run.root / "config.yaml")
    _attempt(run, "job42.r0", "running", [("a", "started")], at=time.time())
    for name in ("SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    script = tmp_path / "job.sbatch"
    script.write_text("#!/bin/bash\n")
    calls: list[list[str]] = []

    def fake_run(argv: list[str], **kw: Any) -> Any:
        calls.append(argv)
        return subprocess.CompletedProcess(argv, 0, stdout=f"JobId=42 Command={script} ...", stderr="")

    monkeypatch.setattr(sbatch.subprocess, "run", fake_run)
    log = tmp_path / "job.err"
    log.write_text("srun: error: node: task 1: Segmentation fault\n")
    monkeypatch.setattr(slurm, "Path", lambda _: log)  # the job's stderr
    assert sbatch.finish(str(run.root), 139, 0, [0]) == {0: "retry"}
    assert calls[-1] == ["sbatch", "--begin=now+7", "--export=ALL,HVBATCH_SUBMISSION_KIND=auto", str(script)]
    assert run.metrics_rows(0)[0]["exit_detail"] == "killed by SIGSEGV"


def test_a_rank_without_progress_is_ended_by_its_watchdog(tmp_path: Path) -> None:
    import subprocess
    import sys

    code = (
        "import time\n"
        "from hvbatch.batch.attempt import AttemptKey\n"
        "from hvbatch.batch.runtime.support import Watchdog\n"
        "from hvbatch.batch.rundir import RunDir\n"
        f"Watchdog(0.5, RunDir({str(tmp_path)!r}), AttemptKey.parse('job1.r0'), 3).start()\n"
        "time.sleep(30)\n"
    )
    started = time.time()
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == EXIT_STALLED and time.time() - started < 20
    assert "no progress" in result.stderr and "Thread" in result.stderr  # the stacks are dumped
    (error,) = ledger.rank_errors(RunDir(tmp_path), AttemptKey.parse("job1.r0"))
    assert error["kind"] == "stalled" and error["rank"] == 3
    assert classify_exit(EXIT_STALLED, [error])[0] == "stalled"


def test_a_retry_reopens_videos_that_had_failed_for_good(tmp_path: Path) -> None:
    run = _run(tmp_path, ["a"])
    row = {name: None for name in MANIFEST_SCHEMA.names} | {
        "video_id": "a", "status": "failed", "final": True, "attempt_key": "job1.r0", "finished_at": 10.0,
    }  # fmt: skip
    part = run.manifest_part(0, "job1.r0", 0)
    write_parquet_atomic(part, pa.Table.from_pylist([row], schema=MANIFEST_SCHEMA))
    assert ledger.mark_complete_if_done(run, 0, AttemptKey.parse("job1.r0"))  # a final failure completes it
    run.add_submission({"submitted_at": 100.0, "jobs": [{"shard": 0, "job_id": "2", "executor": "local"}]})
    # After `hvbatch retry` the video is tried again.
    assert not ledger.mark_complete_if_done(run, 0, AttemptKey.parse("job2.r0"))
    assert not video_histories(run, 0, None)["a"].final


def test_an_mp4_is_on_disk_and_checked_before_it_gets_its_final_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hvbatch.batch import files
    from hvbatch.batch.runtime import support

    events: list[str] = []
    real_fsync, real_link, real_check = files.os.fsync, files.os.link, support.check_mp4

    def fsync(fd: int) -> None:
        target = Path(os.readlink(f"/proc/self/fd/{fd}"))
        events.append("fsync dir" if target.is_dir() else f"fsync {target.name}")
        real_fsync(fd)

    def link(src: str, dst: str, **kwargs: object) -> None:
        events.append(f"link {src}")
        real_link(src, dst, **kwargs)

    def check(handle: object, **kwargs: int) -> object:
        events.append(f"check {kwargs}")
        return real_check(handle, **kwargs)

    monkeypatch.setattr(files.os, "fsync", fsync)
    monkeypatch.setattr(files.os, "link", link)
    monkeypatch.setattr(support, "check_mp4", check)
    run = RunDir(tmp_path)
    assert commit_video(
        run, "a", np.zeros((3, 16, 16, 3), np.uint8), VideoConfig(), AttemptKey.parse("job1.r0"), None
    )
    tmp_name = events[0].split(" ", 1)[1]
    assert tmp_name.startswith(f".{run.video_path('a').name}.job1.r0.") and tmp_name.endswith(".tmp")
    frames = {"frames": 3, "width": 16, "height": 16}
    assert events == [f"fsync {tmp_name}", f"check {frames}", f"link {tmp_name}", "fsync dir"]
