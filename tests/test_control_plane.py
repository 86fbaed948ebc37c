"""The control plane under concurrency and failure, without running jobs: cancel, retry, status."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from hvbatch.batch import ledger
from hvbatch.batch.attempt import AttemptKey, VideoStatus
from hvbatch.batch.control import commands
from hvbatch.batch.control.prompts import read_prompts
from hvbatch.batch.control.shards import shard_videos
from hvbatch.batch.executors import sbatch
from hvbatch.batch.executors.base import JobRecord, record_submission
from hvbatch.batch.executors.local import LocalExecutor, process_identity
from hvbatch.batch.files import write_parquet_atomic
from hvbatch.batch.rundir import MANIFEST_SCHEMA, RunDir
from hvbatch.batch.runtime.support import SEGMENT_ROWS, ShardProgress, manifest_row
from hvbatch.cli import main
from hvbatch.config import load_config
from tests.fault_helpers import FAULT_PROMPTS, write_prompts


def _run(tmp_path: Path, num_shards: int = 2) -> RunDir:
    config = load_config(overrides=["model=tiny"])
    videos = read_prompts(write_prompts(tmp_path / "prompts.parquet"), config.sampling)
    run = RunDir(tmp_path / "run")
    shards = shard_videos(videos, max_shard_cost=1e18, min_shards=num_shards)
    commands.create_run(run, config, tmp_path / "prompts.parquet", shards, "local")
    return run


def _done_row(run: RunDir, shard: int, video_id: str, key: str = "job1.r0", **extra: Any) -> None:
    video = next(v for v in run.read_shard(shard).to_pylist() if v["video_id"] == video_id)
    row = manifest_row(video, shard, AttemptKey.parse(key), status=VideoStatus.DONE, attempt=1, final=False)
    part = run.manifest_part(shard, key, 0, suffix=video_id.encode().hex())
    write_parquet_atomic(part, pa.Table.from_pylist([row | extra], schema=MANIFEST_SCHEMA))


def _complete(run: RunDir, shard: int) -> None:
    for video in run.read_shard(shard).to_pylist():
        _done_row(run, shard, video["video_id"])
    assert ledger.mark_complete_if_done(run, shard, AttemptKey.parse("job1.r0"))


def test_cancel_never_signals_a_reused_pid_and_skips_complete_shards(tmp_path: Path) -> None:
    run = _run(tmp_path)
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    done_job = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        identity = process_identity(bystander.pid)
        assert identity is not None
        stale = f"{bystander.pid}:{int(identity.split(':')[1]) - 100}"  # the pid, reused by another process
        record_submission(run, [JobRecord(0, str(bystander.pid), "local", stale)], "local", manual=True)
        _complete(run, 1)
        live = process_identity(done_job.pid)
        record_submission(run, [JobRecord(1, str(done_job.pid), "local", live)], "local", manual=True)
        assert main(["cancel", str(run.root)]) == 0
        time.sleep(0.5)
        assert bystander.poll() is None, "cancel signalled a process that is not the run's job"
        assert done_job.poll() is None, "cancel signalled the job of a complete shard"
        # The real job (pid and start time match) of an unfinished shard is stopped.
        record_submission(run, [JobRecord(0, str(bystander.pid), "local", identity)], "local", manual=True)
        assert main(["cancel", str(run.root)]) == 0
        assert bystander.wait(timeout=10) == -9
    finally:
        for process in (bystander, done_job):
            process.kill()


def test_concurrent_retries_submit_each_shard_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = _run(tmp_path, num_shards=3)
    submitted: list[list[int]] = []

    def fake_submit(self: LocalExecutor, shards: list[int], **kw: Any) -> list[JobRecord]:
        time.sleep(0.5)  # sbatch takes a while: the other retry must wait, not race
        me = process_identity(os.getpid())  # a job that is alive
        records = [JobRecord(s, str(os.getpid()), "local", me) for s in shards]
        record_submission(self.run, records, "local", manual=True)
        submitted.append(shards)
        return records

    monkeypatch.setattr(LocalExecutor, "submit", fake_submit)
    codes: list[int] = []
    threads = [
        threading.Thread(target=lambda: codes.append(main(["retry", str(run.root), "--executor", "local"])))
        for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert codes == [0, 0]
    assert submitted == [[0, 1, 2]], submitted  # one job per shard, from one of the two retries


def _fake_squeue(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, script: str) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    squeue = bin_dir / "squeue"
    squeue.write_text(f"#!/bin/sh\n{script}\n")
    squeue.chmod(squeue.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")


def test_a_failing_squeue_is_unknown_never_no_job_alive(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _run(tmp_path)
    record_submission(
        run, [JobRecord(0, "4242_0", "slurm"), JobRecord(1, "4242_1", "slurm")], "slurm", manual=True
    )
    _fake_squeue(
        tmp_path, monkeypatch, 'echo "slurm_load_jobs error: Unable to contact slurm controller" >&2; exit 1'
    )
    with pytest.raises(SystemExit, match=r"cannot tell which jobs .* are still alive"):
        main(["retry", str(run.root), "--executor", "local"])
    assert len(run.submissions()) == 1  # nothing submitted on a guess
    capsys.readouterr()
    assert main(["status", str(run.root), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert {job["state"] for job in status["jobs"]} == {"UNKNOWN"}
    assert "Unable to contact" in status["scheduler_error"] and status["eta_seconds"] is None
    # squeue answering "Invalid job id" for every id means they all left the queue.
    _fake_squeue(tmp_path, monkeypatch, 'echo "slurm_load_jobs error: Invalid job id specified" >&2; exit 1')
    assert main(["status", str(run.root), "--json"]) == 0
    assert {job["state"] for job in json.loads(capsys.readouterr().out)["jobs"]} == {"STOPPED"}


def test_a_corrupt_marker_is_named_and_repaired(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _run(tmp_path)
    _complete(run, 1)
    run.done_marker(1).write_bytes(b"")  # a node crashed while writing it (without fsync)
    assert main(["status", str(run.root)]) == 2
    error = capsys.readouterr().err
    assert str(run.done_marker(1)) in error and "--repair" in error
    submitted: list[list[int]] = []
    monkeypatch.setattr(LocalExecutor, "submit", lambda self, shards, **kw: submitted.append(shards) or [])
    assert main(["retry", str(run.root), "--repair", "--executor", "local"]) == 0
    assert (run.root / "corrupt" / "done" / "shard-00001.json").is_file()
    assert submitted == [[0, 1]]  # the shard runs again; its done videos are skipped by the job
    assert main(["status", str(run.root), "--json"]) == 0


def test_status_and_manifest_work_on_a_read_only_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _run(tmp_path)
    _done_row(run, 0, FAULT_PROMPTS[0]["id"])
    from hvbatch.batch import rundir

    def read_only(path: Path, table: pa.Table) -> None:
        raise OSError(30, "Read-only file system", str(path))

    monkeypatch.setattr(rundir, "write_parquet_atomic", read_only)  # the manifest cache cannot be written
    capsys.readouterr()
    assert main(["status", str(run.root), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["counts"]["done"] == 1
    assert main(["manifest", str(run.root), "--json"]) == 0
    assert sum(row["status"] == "done" for row in json.loads(capsys.readouterr().out)) == 1
    assert not (run.root / "manifest-cache.parquet").exists()


def test_submit_takes_the_run_directory_atomically(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = load_config(overrides=["model=tiny"])
    videos = read_prompts(write_prompts(tmp_path / "prompts.parquet"), config.sampling)
    shards = shard_videos(videos, max_shard_cost=1e18, min_shards=1)
    old_umask = os.umask(0)  # even so, the folders submit creates are not group or world writable
    try:
        root = tmp_path / "deep" / "parents" / "run"
        outcomes: list[str] = []

        def create() -> None:
            try:
                commands.create_run(RunDir(root), config, tmp_path / "prompts.parquet", shards, "local")
                outcomes.append("created")
            except ValueError as err:
                outcomes.append(str(err))

        threads = [threading.Thread(target=create) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        os.umask(old_umask)
    assert outcomes.count("created") == 1, outcomes
    losers = [o for o in outcomes if o != "created"]
    assert all("another `hvbatch submit`" in o or "already holds a run" in o for o in losers), losers
    for folder in (root, root.parent, root.parent.parent):
        assert not folder.stat().st_mode & 0o022, oct(folder.stat().st_mode)
    argv = ["submit", str(tmp_path / "prompts.parquet"), "--executor", "local", "model=tiny"]
    assert main([*argv, "--run-dir", str(tmp_path / "bad\nname")]) == 2
    assert "control character" in capsys.readouterr().err and not (tmp_path / "bad\nname").exists()
    (tmp_path / "not-a-run").mkdir()
    (tmp_path / "not-a-run" / "thesis.tex").write_text("keep me")
    assert main([*argv, "--run-dir", str(tmp_path / "not-a-run")]) == 2
    assert "not empty and not a run" in capsys.readouterr().err
    assert oct((tmp_path / "not-a-run").stat().st_mode)[-3:] != "700"  # not taken over


def test_manifest_rows_are_written_in_bounded_segments(tmp_path: Path) -> None:
    run = _run(tmp_path, num_shards=1)
    video = run.read_shard(0).to_pylist()[0]
    key = AttemptKey.parse("job1.r0")
    progress = ShardProgress(run, 0, key, 0, leader=True)
    count = 2 * SEGMENT_ROWS + 5
    for i in range(count):
        vid = f"v{i}"
        progress.put(vid, manifest_row(video | {"video_id": vid}, 0, key, status=VideoStatus.STARTED))
        progress.put(vid, manifest_row(video | {"video_id": vid}, 0, key, status=VideoStatus.DONE))
    parts = sorted((run.root / "manifest").glob("*.parquet"))
    assert len(parts) == 3  # each write rewrote at most one segment of SEGMENT_ROWS rows
    rows = run.manifest_rows(0).to_pylist()
    assert len(rows) == count and {r["status"] for r in rows} == {"done"}


def test_a_plain_sbatch_job_is_recorded_and_retries_failed_videos(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = _run(tmp_path, num_shards=1)
    failed_id = FAULT_PROMPTS[0]["id"]
    for video in run.read_shard(0).to_pylist():
        if video["video_id"] == failed_id:
            _done_row(run, 0, failed_id, status="failed", final=True, error="InjectedFault: boom")
        else:
            _done_row(run, 0, video["video_id"])
    assert ledger.mark_complete_if_done(run, 0, AttemptKey.parse("job1.r0"))
    assert ledger.video_histories(run, 0, None)[failed_id].final
    time.sleep(0.01)
    for name in ("SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_RESTART_COUNT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "777")
    assert sbatch.register(str(run.root), [0])
    assert not sbatch.register(str(run.root), [0])  # a requeue of the same job: recorded once
    (submission,) = [s for s in run.submissions() if s["executor"] == "sbatch"]
    assert submission["kind"] == "manual" and submission["jobs"] == [
        {"shard": 0, "job_id": "777", "executor": "sbatch"}
    ]
    assert not run.done_marker(0).exists()  # reopened, as `hvbatch retry` does
    assert not ledger.video_histories(run, 0, None)[failed_id].final  # a fresh budget
