"""Faults that are not the videos' fault, and faults while a video is committed, through the local
executor: a full disk (a real tmpfs mounted in the run), ffmpeg killed mid-encode, weights that do
not load, a rendezvous port that is taken. Every test checks exactly once: each video done once,
every final mp4 decoding with its frame count, nothing else under a final name."""

from __future__ import annotations

import contextlib
import signal
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from hvbatch.batch import ledger
from hvbatch.batch.attempt import EXIT_DISK_FULL, AttemptKey, ExitReason, RankErrorKind, classify_exit
from hvbatch.batch.control.commands import create_run, wait_for_run
from hvbatch.batch.control.status import run_status
from hvbatch.batch.executors import local
from hvbatch.batch.files import read_json
from hvbatch.batch.rundir import RunDir
from hvbatch.cli import main
from hvbatch.config import RetryConfig, load_config
from tests.batch_helpers import EXAMPLE_CONFIG
from tests.disk_helpers import FILLER, fake_ffmpeg, fill, mount_in_new_runs, wait_for
from tests.fault_helpers import (
    FAULT_PROMPTS,
    assert_exactly_once,
    manifest,
    metrics,
    submit_argv,
    write_prompts,
)

FOX, CITY, KITE, PLAIN = (p["id"] for p in FAULT_PROMPTS)
TWO = FAULT_PROMPTS[2:]  # kite, then plain: one rank makes them in this order
ONE_RANK = ("slurm.tasks_per_node=1", "batch.min_shards=1", "sampling.num_inference_steps=2")


def _rows(run_dir: Path) -> list[dict[str, Any]]:
    return RunDir(run_dir).manifest_rows().to_pylist()


def _has_row(run_dir: Path, video_id: str, status: str) -> bool:
    return any(r["video_id"] == video_id and r["status"] == status for r in _rows(run_dir))


def _reasons(run_dir: Path) -> list[str]:
    return [a["exit_reason"] for a in metrics(run_dir).get(0, [])]


def _no_temporaries(run_dir: Path) -> None:
    for folder in ("videos", "manifest", "metrics", "done"):
        hidden = [p.name for p in (run_dir / folder).iterdir() if p.name.startswith(".")]
        assert hidden == [], (folder, hidden)


def _done_attempt(run_dir: Path, video_id: str) -> int:
    (row,) = [r for r in _rows(run_dir) if r["video_id"] == video_id and r["status"] == "done"]
    return int(row["attempt"])


# --- unit: the reasons and what they do to a shard -------------------------------------------------


def test_faults_outside_the_videos_have_their_own_reasons() -> None:
    for kind in (RankErrorKind.LOAD_FAILED, RankErrorKind.PORT_FAILED, RankErrorKind.DISK_FULL):
        errors = [{"rank": 1, "kind": "timeout", "error": "t"}, {"rank": 0, "kind": str(kind), "error": "x"}]
        reason, detail = classify_exit(1, errors)
        assert reason == ExitReason(str(kind)) and detail == "rank 0: x"  # the cause, not the peer's timeout
        assert reason.outside_the_videos and reason.charges_shard and not reason.charges_videos
    assert classify_exit(EXIT_DISK_FULL, [])[0] == ExitReason.DISK_FULL  # its error record did not fit
    assert ExitReason.SUPERVISOR_ERROR.charges_shard and not ExitReason.SUPERVISOR_ERROR.charges_videos
    assert ExitReason.CRASH.charges_videos and not ExitReason.CRASH.outside_the_videos


def test_a_shard_out_of_attempts_for_such_faults_stops_without_failing_its_videos(tmp_path: Path) -> None:
    prompts = write_prompts(tmp_path / "prompts.parquet", TWO)
    run = RunDir(tmp_path / "run")
    rows = [{"video_id": p["id"], "prompt": p["prompt"], "seed": 0} for p in TWO]
    create_run(run, load_config(EXAMPLE_CONFIG), prompts, [pa.Table.from_pylist(rows)], "local")
    job = {"shard": 0, "job_id": "1", "executor": "local"}
    run.add_submission({"submitted_at": 0.0, "executor": "local", "kind": "manual", "jobs": [job]})
    retry = RetryConfig(max_attempts=2, backoff_s=1)
    cause = (ExitReason.LOAD_FAILED, "rank 0: ModelLoadError: loading the model failed: bad header")
    assert ledger.finish(run, retry, [0], AttemptKey.local("1", 0), None, cause=cause) == {0: "retry"}
    assert ledger.finish(run, retry, [0], AttemptKey.local("1", 1), None, cause=cause) == {0: "stopped"}
    assert run.manifest_rows().num_rows == 0 and not run.completed_shards()  # no video marked failed
    stopped = run_status(run).stopped
    assert stopped[0] == (
        "stopped: shard 0 stopped after 2 attempts, its videos not charged (last: load-failed: rank 0: "
        "ModelLoadError: loading the model failed: bad header); fix that, then retry"
    )
    # A crash (the videos' fault) at the end still gives up as before.
    crash = (ExitReason.CRASH, "killed by SIGKILL")
    assert ledger.finish(run, retry, [0], AttemptKey.local("1", 2), None, cause=crash) == {0: "gave-up"}


def test_the_supervisor_records_its_own_failures(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import hvbatch.parallel.ports as ports

    job = local.LocalShardJob(nproc=1, time_min=30, signal_delay_s=120)
    job.key = AttemptKey.local("1", 0)
    run = RunDir(tmp_path)

    def no_port() -> int:
        raise OSError(98, "Address already in use")

    monkeypatch.setattr(ports, "free_local_port", no_port)
    status, cause = job._attempt(run, [0])
    assert status is None and cause is not None and cause[0] == ExitReason.PORT_FAILED
    assert "no free rendezvous port: [Errno 98] Address already in use" in cause[1]
    monkeypatch.setattr(ports, "free_local_port", lambda: 12345)

    def broken(run: RunDir, shards: list[int], port: int) -> int:
        raise RuntimeError("cannot fork")

    monkeypatch.setattr(job, "_run_attempt", broken)
    status, cause = job._attempt(run, [0])
    assert cause == (ExitReason.SUPERVISOR_ERROR, "the supervisor failed: RuntimeError: cannot fork")


# --- end to end -------------------------------------------------------------------------------------


def test_disk_full_during_an_mp4_write_ends_the_attempt_and_loses_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # videos/ is a small filesystem. Kite is committed; the disk fills while plain's write waits
    # (slow-write, before its encode); ffmpeg fails with ENOSPC, the attempt ends `disk-full`, and
    # the next attempt, with space again, makes plain, charging it nothing.
    monkeypatch.setenv("HVBATCH_FAULT", f"action=slow-write,video={PLAIN},attempt=1,seconds=5")
    prompts = write_prompts(tmp_path / "prompts.parquet", TWO)
    run_dir = tmp_path / "run"
    with contextlib.ExitStack() as stack:
        mount_in_new_runs(monkeypatch, stack, {"videos": 2048})
        assert main(submit_argv(prompts, run_dir, "local", *ONE_RANK)) == 0
        wait_for(lambda: _has_row(run_dir, KITE, "done"))
        kite = RunDir(run_dir).video_path(KITE)
        kite_before = (kite.stat().st_ino, kite.read_bytes())
        filler = fill(run_dir / "videos")
        wait_for(lambda: _reasons(run_dir)[:1] == ["disk-full"])
        filler.unlink()
        assert wait_for_run(RunDir(run_dir), poll_s=0.5, timeout_s=300)
        first = metrics(run_dir)[0][0]
        assert (
            "no space left to write" in first["exit_detail"]
            and "No space left on device" in first["exit_detail"]
        )
        assert _reasons(run_dir) == ["disk-full", "completed"]
        assert_exactly_once(run_dir, TWO, {})
        assert (kite.stat().st_ino, kite.read_bytes()) == kite_before  # what was committed stayed
        assert _done_attempt(run_dir, PLAIN) == 1  # the full disk was not charged to plain
        _no_temporaries(run_dir)


def test_disk_full_during_a_manifest_part_and_a_marker_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # manifest/ and done/ are small filesystems; done/ is full from the start. Attempt 1: kite is
    # done, then manifest/ fills while plain denoises: plain's mp4 is linked but its done row
    # finds no space. Attempt 2 records plain (a whole final mp4 without a row) and then cannot
    # write the completion marker. Attempt 3 writes it. Nothing is made twice.
    monkeypatch.setenv("HVBATCH_FAULT", f"action=slow,video={PLAIN},step=1,attempt=1,seconds=4")
    prompts = write_prompts(tmp_path / "prompts.parquet", TWO)
    run_dir = tmp_path / "run"
    with contextlib.ExitStack() as stack:
        mount_in_new_runs(
            monkeypatch, stack, {"manifest": 2048, "done": 256}, then=lambda run: fill(run.root / "done")
        )
        assert main(submit_argv(prompts, run_dir, "local", *ONE_RANK)) == 0
        wait_for(lambda: _has_row(run_dir, KITE, "done") and _has_row(run_dir, PLAIN, "started"))
        filler = fill(run_dir / "manifest")
        wait_for(lambda: _reasons(run_dir)[:1] == ["disk-full"])
        plain = RunDir(run_dir).video_path(PLAIN)
        assert plain.is_file() and not _has_row(run_dir, PLAIN, "done")  # committed, its row lost
        plain_inode = plain.stat().st_ino
        filler.unlink()
        wait_for(lambda: _reasons(run_dir)[1:2] == ["disk-full"])
        (run_dir / "done" / FILLER).unlink()
        assert wait_for_run(RunDir(run_dir), poll_s=0.5, timeout_s=300)
        attempts = metrics(run_dir)[0]
        assert [a["exit_reason"] for a in attempts] == ["disk-full", "disk-full", "completed"]
        assert "manifest/shard-00000" in attempts[0]["exit_detail"]
        assert "done/shard-00000.json" in attempts[1]["exit_detail"]
        assert_exactly_once(run_dir, TWO, {})
        assert plain.stat().st_ino == plain_inode  # recorded, not made again
        _no_temporaries(run_dir)


def test_ffmpeg_killed_or_cut_short_fails_the_video_which_is_made_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # The first encode is SIGKILLed half-way (an OOM kill), the second exits 0 with half a file.
    # Before the job starts, a dead attempt's temporary mp4 and manifest part lie in the run, and
    # city has a final mp4 cut short (as the old writer committed them).
    fake_ffmpeg(monkeypatch, tmp_path, ["kill", "short"])
    prompts = write_prompts(tmp_path / "prompts.parquet", FAULT_PROMPTS[1:])
    run_dir = tmp_path / "run"
    planted: dict[str, Path] = {}

    def plant(run: RunDir) -> None:
        (run.root / "videos").mkdir()
        final = run.video_path(CITY)
        final.write_bytes(b"\0\0\0\x18ftypisom" + b"\0" * 30)
        planted["temp"] = final.with_name(f".{final.name}.job999.a0.node9.4242.0badf00d.tmp")
        planted["temp"].write_bytes(b"partial")
        (run.root / "manifest").mkdir()
        planted["part"] = run.root / "manifest" / ".shard-00000.job999.a0.dp0.parquet.node9.4242.0badf00d.tmp"
        planted["part"].write_bytes(b"PAR1")

    with contextlib.ExitStack() as stack:
        mount_in_new_runs(monkeypatch, stack, {}, then=plant)
        assert main([*submit_argv(prompts, run_dir, "local", *ONE_RANK), "--wait"]) == 0
    assert_exactly_once(run_dir, FAULT_PROMPTS[1:], {})
    assert _reasons(run_dir) == ["completed"]  # video failures, not the attempt's
    failed = sorted(
        (r["finished_at"], r["video_id"], r["error"]) for r in _rows(run_dir) if r["status"] == "failed"
    )
    assert len(failed) == 2 and failed[0][1] != failed[1][1]  # the first two encodes, one try each
    assert failed[0][2].startswith("EncodeError: ffmpeg was killed by SIGKILL while encoding")
    assert failed[1][2].startswith("InvalidVideo: the file is cut short")
    attempts = {vid: row["attempts"] for vid, row in manifest(capsys, run_dir).items()}
    assert attempts == {vid: 2 if vid in (failed[0][1], failed[1][1]) else 1 for vid in (CITY, KITE, PLAIN)}
    (record,) = (run_dir / "quarantine").glob("*.json")
    assert read_json(record)["file"] == f"videos/{RunDir(run_dir).video_path(CITY).name}"
    assert "has no moov box" in read_json(record)["reason"]
    assert not planted["temp"].exists() and not planted["part"].exists()
    _no_temporaries(run_dir)


def test_weights_that_fail_to_load_are_retried_without_charging_the_videos(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from hvbatch.pipeline import Pipeline
    from tests.test_generate import _write_tiny_weights

    weights = tmp_path / "weights"
    _write_tiny_weights(Pipeline.load(load_config(EXAMPLE_CONFIG)), weights, "diffusers")
    checkpoint = weights / "transformer" / "diffusion_pytorch_model.safetensors"
    good = checkpoint.read_bytes()
    prompts = write_prompts(tmp_path / "prompts.parquet", TWO)
    run_dir = tmp_path / "run"
    overrides = (*ONE_RANK, f"model.path={weights}", "model.random_weights=false", "retry.max_attempts=2")
    assert main(submit_argv(prompts, run_dir, "local", *overrides)) == 0  # submit checked the files
    # Cut short after the check, before the job's rank has imported torch: the loader refuses it.
    checkpoint.write_bytes(good[: len(good) // 2])
    assert wait_for_run(RunDir(run_dir)) is False
    attempts = metrics(run_dir)[0]
    assert [a["exit_reason"] for a in attempts] == ["load-failed", "load-failed"]
    assert "ModelLoadError: loading the model failed" in attempts[0]["exit_detail"]
    assert not [r for r in _rows(run_dir) if r["status"] == "failed"]  # no video charged or failed
    assert {row["status"] for row in manifest(capsys, run_dir).values()} == {"pending"}
    assert "its videos not charged (last: load-failed" in run_status(RunDir(run_dir)).stopped[0]
    # The report says in its text (not only on hover) that the jobs failed though no video did.
    assert main(["report", str(run_dir), "--out", str(tmp_path / "report.html")]) == 0
    page = (tmp_path / "report.html").read_text()
    assert "No video failed, but 2 job attempts ended without completing (2 load-failed):" in page
    assert page.count('<td class="err">rank 0: ModelLoadError: loading the model failed') == 2
    checkpoint.write_bytes(good)  # the weights fixed: `hvbatch retry` finishes
    assert main(["retry", str(run_dir), "--wait"]) == 0
    assert_exactly_once(run_dir, TWO, {})
    assert _done_attempt(run_dir, KITE) == 1 and _done_attempt(run_dir, PLAIN) == 1


def test_rendezvous_port_failures_are_retried_without_charging_the_videos(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The supervisor runs in this process. Attempt 1: its search for a free port raises (the
    # supervisor used to crash and leave the shard stopped). Attempt 2: rank 0 finds the port
    # taken (`port-busy`: it listens there first) and its store cannot bind it. Attempt 3 runs.
    import hvbatch.parallel.ports as ports

    monkeypatch.setenv("HVBATCH_FAULT", "action=port-busy,rank=0,attempt=2")
    prompts = write_prompts(tmp_path / "prompts.parquet", TWO)
    run_dir = tmp_path / "run"
    created: list[RunDir] = []
    monkeypatch.setattr(
        local.LocalExecutor, "submit", lambda self, shards, **kw: created.append(self.run) or []
    )
    argv = submit_argv(prompts, run_dir, "local", *ONE_RANK, "slurm.tasks_per_node=2", "parallel.ulysses=1")
    assert main(argv) == 0 and created
    real_port = ports.free_local_port
    calls: list[int] = []

    def first_search_fails() -> int:
        calls.append(1)
        if len(calls) == 1:
            raise OSError(98, "Address already in use")
        return real_port()

    monkeypatch.setattr(ports, "free_local_port", first_search_fails)
    monkeypatch.setattr(local, "die_with_parent", lambda: None)
    monkeypatch.setattr(local.signal, "signal", lambda signum, handler: signal.SIG_DFL)
    job = local.LocalShardJob(nproc=2, time_min=30, signal_delay_s=120)
    result = job(str(run_dir), [0])
    assert result["fates"] == '{"0": "complete"}'
    attempts = metrics(run_dir)[0]
    assert [a["exit_reason"] for a in attempts] == ["port-failed", "port-failed", "completed"]
    assert "the supervisor found no free rendezvous port" in attempts[0]["exit_detail"]
    assert (
        "EADDRINUSE" in attempts[1]["exit_detail"] or "address already in use" in attempts[1]["exit_detail"]
    )
    assert_exactly_once(run_dir, TWO, {})
    assert _done_attempt(run_dir, KITE) == 1 and _done_attempt(run_dir, PLAIN) == 1
