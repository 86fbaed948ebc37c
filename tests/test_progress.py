"""Runs that explain themselves: `--wait` progress and summary, why a run stopped, the dry-run
size warning, one layout line per shard in a job's log, and the example config's sizes."""

from __future__ import annotations

import io
import json
import os
import re
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hvbatch.batch import ledger
from hvbatch.batch.attempt import AttemptKey, RankErrorKind
from hvbatch.batch.control import commands, progress
from hvbatch.batch.control.progress import Progress, ProgressReporter, format_progress, watch_run
from hvbatch.batch.control.prompts import read_prompts
from hvbatch.batch.control.shards import shard_videos
from hvbatch.batch.control.status import format_duration, run_status
from hvbatch.batch.executors.base import JobRecord, record_submission
from hvbatch.batch.executors.local import process_identity
from hvbatch.batch.rundir import RunDir
from hvbatch.cli import main
from hvbatch.config import RetryConfig, load_config
from tests.batch_helpers import EXAMPLE_CONFIG, EXAMPLE_PROMPTS

GONE_PID = "4194399"  # above Linux's largest pid: never a live process


def test_progress_line_rate_eta_and_bar() -> None:
    counts = {"done": 120, "failed": 3, "running": 10, "pending": 367}
    p = Progress.measure(counts, done_at_start=20, elapsed_s=3600.0, running=True)
    assert p.videos_per_hour == pytest.approx(100.0) and p.total == 500
    assert p.eta_s == pytest.approx(377 / 100.0 * 3600.0)
    assert format_progress(p) == "120/500 done, 3 failed, 100.0 videos/h, ETA 3h 46m"
    assert format_progress(p, 10) == "[##........] 120/500 done, 3 failed, 100.0 videos/h, ETA 3h 46m"
    stopped = Progress.measure(counts, done_at_start=120, elapsed_s=60.0, running=False)
    assert stopped.videos_per_hour is None and stopped.eta_s is None
    assert format_progress(stopped) == "120/500 done, 3 failed, no video done yet"
    finished = Progress.measure({"done": 5, "failed": 1, "running": 0, "pending": 0}, 0, 60.0, False)
    assert finished.eta_s is None  # nothing left: no "ETA 0s"
    assert format_progress(finished, 4) == "[####] 5/6 done, 1 failed, 300.0 videos/h"
    assert [format_duration(s) for s in (0, 45, 725, 7800, 3 * 86400 + 4 * 3600)] == [
        "0s", "45s", "12m 5s", "2h 10m", "3d 4h",
    ]  # fmt: skip


def _progress(done: int, failed: int = 0) -> Progress:
    return Progress.measure(
        {"done": done, "failed": failed, "running": 1, "pending": 9 - done}, 0, 60.0, True
    )


def test_tty_redraws_one_line_and_logs_get_rare_plain_lines() -> None:
    tty = io.StringIO()
    reporter = ProgressReporter(tty, tty=True)
    for done in (0, 1, 2):
        reporter.update(_progress(done))
    reporter.close()
    text = tty.getvalue()
    assert text.count("\r") == 3 and text.count("\n") == 1 and text.endswith("\n")
    assert "[##" in text.split("\r")[-1] and "2/10 done" in text.split("\r")[-1]

    log, now = io.StringIO(), [0.0]
    reporter = ProgressReporter(log, tty=False, interval_s=60.0, clock=lambda: now[0])
    for at, done in ((0, 0), (10, 1), (30, 1), (70, 1), (75, 2), (200, 2), (201, 3)):
        now[0] = at
        reporter.update(_progress(done))
    reporter.close()
    lines = log.getvalue().splitlines()
    # The first poll; then a line when the counts differ from the last line's and 60 s have passed:
    # t=70 (1 done; t=10 was too early), t=200 (2 done); t=201 is too early again.
    assert [re.search(r"(\d+)/10 done", line).group(1) for line in lines] == ["0", "1", "2"]  # type: ignore[union-attr]
    assert "\r" not in log.getvalue() and "[#" not in log.getvalue()


def test_watch_reports_every_poll_and_returns_how_the_run_ended(monkeypatch: pytest.MonkeyPatch) -> None:
    polls = iter(
        [
            (False, True, {"done": 0, "failed": 0, "running": 4, "pending": 0}, "job 7: loading [3s]"),
            (False, True, {"done": 2, "failed": 1, "running": 1, "pending": 0}, None),
            (True, True, {"done": 3, "failed": 1, "running": 0, "pending": 0}, None),
            (True, True, {"done": 3, "failed": 1, "running": 0, "pending": 0}, None),  # jobs exiting
            (True, False, {"done": 3, "failed": 1, "running": 0, "pending": 0}, None),
        ]
    )
    asked = []

    def poll(reader: object, before_any_video: bool, with_phases: bool = True) -> tuple[object, ...]:
        asked.append(before_any_video)
        return next(polls)

    monkeypatch.setattr(progress, "poll_run_phases", poll)
    monkeypatch.setattr(progress.time, "sleep", lambda s: None)
    out = io.StringIO()
    reporter = ProgressReporter(out, tty=True)
    assert watch_run(RunDir("unused"), reporter, poll_s=0.0) is True
    reporter.close()
    shown = out.getvalue().split("\r")[1:]
    # The start-up phase instead of "no video done yet"; once every video has ended the line is
    # drawn once more, not again while the jobs exit (the rate stops at the last video).
    assert [s.split("] ")[1].split(",")[0].strip() for s in shown] == ["0/4 done", "2/4 done", "3/4 done"]
    assert "0 failed, job 7: loading [3s]" in shown[0] and "ETA" not in shown[-1]
    assert asked == [True, True, False, False, False]  # phases past start-up only before a video ends
    assert reporter.first is not None and reporter.first.done == 0
    # No job alive and shards unfinished: the wait ends, not complete.
    monkeypatch.setattr(
        progress,
        "poll_run_phases",
        lambda *args, **kwargs: (False, False, {"done": 1, "failed": 0, "running": 0, "pending": 3}, None),
    )
    monkeypatch.setattr(progress.RunDir, "completed_shards", lambda self: set())
    monkeypatch.setattr(progress.RunDir, "num_shards", lambda self: 2)
    assert watch_run(RunDir("unused"), None, poll_s=-1.0) is False


def test_the_phase_of_a_job_starting_is_shown_also_after_videos_ended(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    ledger.record_phase(run, AttemptKey.slurm("7_0", 0), "first denoising step done", starting=False)
    ledger.record_phase(run, AttemptKey.slurm("7_1", 0), "8 ranks up in 3 s; loading the model")
    ledger.record_phase(run, AttemptKey.slurm("7_2", 0), "imports done; 8 ranks meeting")
    states = {"7_0": "RUNNING", "7_1": "RUNNING", "7_2": "RUNNING", "7_3": "PENDING"}
    now = time.time() + 12
    # The latest start-up phase of a running job, with how long ago it began and who else starts.
    doing = progress.jobs_doing(run, states, before_any_video=False, now=now)
    assert doing == "job 7_2: imports done; 8 ranks meeting [12s] (+1 other job starting)"
    # Past start-up, a job is named only before any video ended; a queued one by its state.
    assert progress.jobs_doing(run, {"7_0": "RUNNING"}, before_any_video=False, now=now) is None
    assert (
        progress.jobs_doing(run, {"7_0": "RUNNING"}, True, now=now)
        == "job 7_0: first denoising step done [12s]"
    )
    assert progress.jobs_doing(run, {"7_3": "PENDING"}, True) == "job 7_3 pending"
    assert progress.jobs_doing(run, {"7_4": "RUNNING", "7_3": "PENDING"}, True) == (
        "job 7_4 running, starting (+1 other job)"
    )


def _small_run(tmp_path: Path, num_shards: int = 2) -> RunDir:
    rows = [{"id": f"v{i}", "prompt": f"prompt {i}", "seed": i} for i in range(4)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "prompts.parquet")
    config = load_config(str(EXAMPLE_CONFIG))
    videos = read_prompts(tmp_path / "prompts.parquet", config.sampling)
    run = RunDir(tmp_path / "run")
    shards = shard_videos(videos, max_shard_cost=1e18, min_shards=num_shards)
    commands.create_run(run, config, tmp_path / "prompts.parquet", shards, "local")
    return run


def test_status_says_why_a_run_stopped(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = _small_run(tmp_path)
    record_submission(run, [JobRecord(s, GONE_PID, "local", None) for s in (0, 1)], "local", manual=True)
    # Shard 0: one attempt, a collective timed out, attempts used up: it gave up.
    gave_up = AttemptKey.local(GONE_PID, 0)
    ledger.begin(run, 0, gave_up, {})
    ledger.record_rank_error(run, gave_up, 1, RankErrorKind.TIMEOUT, "allgather timed out after 600 s")
    fates = ledger.finish(run, RetryConfig(max_attempts=1), [0], gave_up, 1)
    assert str(fates[0]) == "gave-up"
    # Shard 1: cancelled by the user.
    ledger.begin(run, 1, AttemptKey.local(GONE_PID, 1), {})
    ledger.cancel(run, {GONE_PID}, "hvbatch cancel")

    status = run_status(run)
    assert status.counts["failed"] == 2 and status.counts["pending"] == 2
    assert status.stopped[0] == (
        "stopped: shard 0 gave up after 1 attempt (last: timeout: rank 1: allgather timed out after 600 s)"
    )
    assert status.stopped[1].startswith("stopped: shard 1 cancelled by the user at ")
    assert status.stopped[1].endswith("(hvbatch cancel)")
    assert status.stopped[2] == (
        f"waiting for retry: run `hvbatch retry {run.root}` "
        f"(`hvbatch manifest {run.root} --failed` lists the 2 failed videos)"
    )
    capsys.readouterr()
    assert main(["status", str(run.root)]) == 0
    text = capsys.readouterr().out
    assert all(line in text.splitlines() for line in status.stopped)
    assert main(["status", str(run.root), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["stopped"] == status.stopped
    # While a job of the run is alive, the run has not stopped.
    me = JobRecord(1, str(os.getpid()), "local", process_identity(os.getpid()))
    record_submission(run, [me], "local", manual=False)
    assert run_status(run).stopped == []


def test_a_very_large_dry_run_warns(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = [{"prompt": "a fox", "num_videos": 60_000}, {"prompt": "a kite", "num_videos": 60_000}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "big.parquet")
    argv = ["submit", str(tmp_path / "big.parquet"), "--config", str(EXAMPLE_CONFIG), "--dry-run"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "warning: a very large batch (120,000 videos," in out and "check the prompts file" in out
    small = [{"prompt": "a fox", "num_videos": 10}]
    pq.write_table(pa.Table.from_pylist(small), tmp_path / "small.parquet")
    assert main([*argv[:1], str(tmp_path / "small.parquet"), *argv[2:]]) == 0
    assert "very large batch" not in capsys.readouterr().out
    # GPU-hours alone also warn (a 720p x 129-frame default on a few prompts, costed high).
    assert (
        main([*argv[:1], str(tmp_path / "small.parquet"), "--dry-run", "batch.seconds_per_cost_unit=1e9"])
        == 0
    )
    assert "warning: a very large batch (10 videos," in capsys.readouterr().out


def test_tiny_batch_config_makes_tiny_videos_from_prompts_without_sizes(tmp_path: Path) -> None:
    sampling = load_config(str(EXAMPLE_CONFIG)).sampling
    example = pq.read_table(EXAMPLE_PROMPTS).to_pylist()
    largest = max((p["height"], p["width"], p["num_frames"]) for p in example)
    assert (sampling.height, sampling.width, sampling.num_frames) == largest == (64, 96, 9)
    assert sampling.num_inference_steps == 4
    pq.write_table(pa.Table.from_pylist([{"prompt": "a fox"}]), tmp_path / "p.parquet")
    video = read_prompts(tmp_path / "p.parquet", sampling).to_pylist()[0]
    assert (video["height"], video["width"], video["num_frames"]) == (64, 96, 9)


def _job_log(run_dir: Path) -> str:
    logs = sorted((run_dir / "submitit").glob("*/*_log.err"))
    assert len(logs) == 1, logs
    return logs[0].read_text()


def test_wait_shows_progress_and_a_summary_and_the_log_one_layout_per_shard(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(progress, "POLL_S", 1.0)  # polls are cheap; the test ends sooner
    rows = [{"id": f"v{i}", "prompt": f"prompt {i}", "seed": i} for i in range(3)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "prompts.parquet")
    run_dir = tmp_path / "run"
    argv = ["submit", str(tmp_path / "prompts.parquet"), "--config", str(EXAMPLE_CONFIG), "--executor",
            "local", "--run-dir", str(run_dir), "--wait", "sampling.height=16", "sampling.width=16",
            "sampling.num_frames=1", "sampling.num_inference_steps=3", "slurm.tasks_per_node=2",
            "batch.min_shards=2", "sampling.cache=teacache", "sampling.cache_threshold=1e9"]  # fmt: skip
    assert main(argv) == 0
    captured = capsys.readouterr()
    progress_lines = [
        line for line in captured.err.splitlines() if re.search(r"\d+/3 done, \d+ failed", line)
    ]
    # From the first poll on, what the job is doing instead of "no video done yet".
    assert re.search(r"0/3 done, 0 failed, job \d+", progress_lines[0]), progress_lines[0]
    assert not any("no video done yet" in line for line in progress_lines)
    assert "executor: local (--executor=local)" in captured.err
    assert re.search(r"run \S+: 3 videos, 2 shards, local job \d+$", captured.out.splitlines()[0])
    summary = captured.out.splitlines()[-1]
    assert re.fullmatch(
        rf"run {run_dir}: 3/3 videos done, 0 failed, in \S+( \S+)?, [\d.]+ videos/h; "
        rf"videos in {run_dir}/videos",
        summary,
    ), summary
    log = _job_log(run_dir)
    num_shards = RunDir(run_dir).num_shards()
    assert num_shards == 2
    # Two ranks per job: the layout once per shard (rank 0), one line per video (its group's leader).
    assert len(re.findall(r"shard-\d+ \S+ \(attempt 1\): layout dp", log)) == num_shards, log
    per_video = re.findall(r"video (v\d): done in [\d.]+ s \(([\d.]+) steps/s\), peak memory [\d.]+ GiB", log)
    assert sorted(v for v, _ in per_video) == ["v0", "v1", "v2"] and all(float(r) > 0 for _, r in per_video)
    assert run_status(RunDir(run_dir)).stopped == []
    # Start-up says what it is doing, in order, on rank 0 (and in the attempt's phase record).
    phases = ["starting 2 ranks on this machine", "imports done", "2 ranks meeting", "2 ranks up in",
              "loading the model", "model loaded in", "first denoising step done"]  # fmt: skip
    at = [log.find(phase) for phase in phases]
    assert -1 not in at and at == sorted(at), (at, log)
    # The writer's line only from leaders that wrote (each of the 3 videos has its own dp group).
    assert log.count("mp4 writes:") == 3, log
    assert sorted(p.name for p in (run_dir / "submitit").iterdir()) == [
        p.parent.name for p in [*(run_dir / "submitit").glob("*/*_log.err")]
    ]
    # Step caching reaches the merged manifest: the middle step reused, first and last computed.
    assert main(["manifest", str(run_dir), "--json"]) == 0
    videos = json.loads(capsys.readouterr().out)
    assert [(v["steps_computed"], v["steps_skipped"]) for v in videos] == [(2, 1)] * 3
    assert [(v["width"], v["height"], v["num_frames"]) for v in videos] == [(16, 16, 1)] * 3
    assert main(["manifest", str(run_dir)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["status", "tries", "WxHxframes", "video_id", "path", "or", "error"]
    assert sorted(line.split()[:4] for line in lines[1:]) == [
        ["done", "1", "16x16x1", f"v{i}"] for i in range(3)
    ]


def test_status_lists_failed_videos_in_the_wait_summary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = _small_run(tmp_path, num_shards=1)
    key = AttemptKey.local(GONE_PID, 0)
    record_submission(run, [JobRecord(0, GONE_PID, "local", None)], "local", manual=True)
    ledger.begin(run, 0, key, {})
    ledger.finish(run, RetryConfig(max_attempts=1), [0], key, 1)
    text = progress.format_summary(run, started_at=0.0)
    lines = text.splitlines()
    assert lines[0].startswith(f"run {run.root}: 0/4 videos done, 4 failed, in ")
    assert lines[1].startswith("  failed v") and "gave up after 1 attempt" in lines[1]
    assert f"`hvbatch manifest {run.root} --failed`" in text
    assert any(line.startswith("stopped: shard 0 gave up") for line in lines)
