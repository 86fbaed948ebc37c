"""`retry`, `cancel` and `retry --repair` tell the truth, without running jobs (fast).

Jobs are stood in for: a process whose command line is submitit's local controller for the run,
or a fake `squeue` whose answers the test sets. The real-cluster versions are in
tests/test_recovery_slurm.py.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from hvbatch.batch.control import commands, recovery
from hvbatch.batch.executors.base import JobRecord, record_submission
from hvbatch.batch.executors.local import LocalExecutor, process_identity
from hvbatch.batch.files import CorruptRunFile
from hvbatch.batch.rundir import RunDir
from hvbatch.cli import main
from tests.test_control_plane import _complete, _run


@pytest.fixture
def submitted(monkeypatch: pytest.MonkeyPatch) -> list[list[int]]:
    """What `retry` submits (nothing runs)."""
    shards: list[list[int]] = []
    monkeypatch.setattr(LocalExecutor, "submit", lambda self, todo, **kw: shards.append(todo) or [])
    monkeypatch.setattr(commands, "_wait_or_stop", lambda run: 0)
    return shards


def _errors(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    capsys.readouterr()
    code = main(list(argv))
    return code, capsys.readouterr().err


def test_a_marker_of_the_wrong_json_type_is_named_like_any_corrupt_file(
    tmp_path: Path, submitted: list[list[int]], capsys: pytest.CaptureFixture[str]
) -> None:
    # Before: `[]` in a marker crashed status and retry --repair with AttributeError tracebacks.
    run = _run(tmp_path)
    _complete(run, 1)
    marker = run.done_marker(1)
    for content in (b"[]", b"null", b'"done"', b'{"done": "4", "failed": 0}', b'{"done": 4}'):
        marker.write_bytes(content)
        code, error = _errors(capsys, "status", str(run.root))
        assert code == 2, (content, error)
        assert f"{marker} is corrupt or empty (TypeError: it" in error and "--repair" in error, error
    assert "'failed' is missing" in error
    marker.write_bytes(b"[]")
    assert (
        "holds an array where an object with the shard's counts belongs"
        in _errors(capsys, "status", str(run.root))[1]
    )
    assert main(["retry", str(run.root), "--repair", "--executor", "local"]) == 0
    assert (run.root / "corrupt" / "done" / marker.name).read_bytes() == b"[]"
    assert submitted == [[0, 1]]  # the shard runs again; its done videos are skipped by the job
    # A submission record and a rank's error of the wrong type are named and moved the same way.
    (run.root / "jobs").mkdir(exist_ok=True)
    (run.root / "jobs" / "submission-0007.json").write_text('{"jobs": [{"shard": "0"}]}')
    (run.root / "attempts").mkdir(exist_ok=True)
    (run.root / "attempts" / "job9.a0.rank00001.json").write_text("[1, 2]")
    code, error = _errors(capsys, "retry", str(run.root), "--executor", "local")
    assert code == 2 and "submission-0007.json is corrupt" in error
    assert main(["retry", str(run.root), "--repair", "--executor", "local"]) == 0
    assert sorted(p.name for p in (run.root / "corrupt").rglob("*.json")) == [
        "job9.a0.rank00001.json", marker.name, "submission-0007.json"
    ]  # fmt: skip
    assert main(["status", str(run.root)]) == 0


def test_repair_rebuilds_run_json_and_videos_parquet_and_names_the_fix_for_a_shard_file(
    tmp_path: Path, submitted: list[list[int]], capsys: pytest.CaptureFixture[str]
) -> None:
    # Before: the error for a corrupt videos.parquet (or run.json, or a shard file) said to run
    # `--repair`, which did not touch those files, so the advice looped.
    run = _run(tmp_path)
    videos, info = run.all_videos().to_pylist(), run.read_run()
    run.videos_path.write_bytes(b"PAR1 not really")
    run.run_json.write_text('["not", "a", "run"]')
    code, error = _errors(capsys, "status", str(run.root))
    assert code == 2 and f"{run.run_json} is corrupt" in error and "rebuilding run.json" in error
    assert main(["retry", str(run.root), "--repair", "--executor", "local"]) == 0
    assert run.all_videos().to_pylist() == videos
    rebuilt = run.read_run()
    assert (rebuilt["num_shards"], rebuilt["num_videos"], rebuilt["executor"]) == (2, 4, "auto")
    assert info["num_videos"] == 4
    assert {p.name for p in (run.root / "corrupt").iterdir()} == {"run.json", "videos.parquet"}
    assert submitted == [[0, 1]]
    assert main(["status", str(run.root)]) == 0
    # A shard file is a frozen input: the error names the real fix, and --repair moves nothing.
    run.shard_path(1).write_bytes(b"")
    with pytest.raises(CorruptRunFile) as caught:  # what the shard's job records as its error
        run.read_shard(1)
    code, error = _errors(capsys, "retry", str(run.root), "--repair", "--executor", "local")
    for text in (str(caught.value), error):
        assert f"{run.shard_path(1)} is corrupt" in text, text
        assert "--repair cannot rebuild it" in text and "hvbatch submit PROMPTS --run-dir NEW" in text
        assert "moves corrupt files" not in text
    assert code == 2
    assert run.shard_path(1).exists() and submitted == [[0, 1]]


def _fake_controller(run: RunDir) -> subprocess.Popen[bytes]:
    """A process whose command line is submitit's local controller for this run."""
    folder = run.root / "submitit"
    code = "import time; time.sleep(120)"
    process = subprocess.Popen([sys.executable, "-c", code, "submitit.local._local", f"{folder}/%j"])
    (folder / str(process.pid)).mkdir(parents=True)
    return process


def test_a_live_job_missing_from_the_records_is_never_resubmitted_over(
    tmp_path: Path, submitted: list[list[int]], capsys: pytest.CaptureFixture[str]
) -> None:
    # Before: with the submission record empty, retry --repair moved it aside and resubmitted
    # every shard next to the job still running them.
    run = _run(tmp_path)
    controller = _fake_controller(run)
    try:
        identity = process_identity(controller.pid)
        records = [JobRecord(shard, str(controller.pid), "local", identity) for shard in (0, 1)]
        record_submission(run, records, "local", manual=True)
        (run.root / "jobs" / "submission-0001.json").write_bytes(b"")  # lost in a crash
        code, error = _errors(capsys, "retry", str(run.root), "--repair", "--executor", "local")
        assert code == 1 and submitted == []
        assert f"jobs {controller.pid} (RUNNING) of this run are in the queue but in no readable" in error
        assert main(["retry", str(run.root), "--executor", "local", "--wait"]) == 1 and submitted == []
        # cancel finds it too, stops it, and returns once it is gone.
        capsys.readouterr()
        assert main(["cancel", str(run.root)]) == 0
        assert "cancelled 1 job; it has left the queue" in capsys.readouterr().out
        assert controller.wait(timeout=10) == -9
        assert main(["retry", str(run.root), "--executor", "local"]) == 0 and submitted == [[0, 1]]
    finally:
        controller.kill()
        controller.wait()


def _queue(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run: RunDir) -> Path:
    """A fake squeue: job 4242_0, writing its log in the run, in the state written to the file
    returned (empty: it has left the queue)."""
    state = tmp_path / "state"
    state.write_text("")
    log = run.root / "submitit" / "4242_0" / "4242_0_0_log.out"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "squeue"
    script.write_text(
        "#!/bin/sh\n"
        f"state=$(cat '{state}')\n"
        '[ -z "$state" ] && exit 0\n'
        f'case "$*" in *--me*) echo "4242_0|$state|{log}";; *) echo "4242_0 $state";; esac\n'
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    record_submission(run, [JobRecord(0, "4242_0", "slurm")], "slurm", manual=True)
    return state


def test_retry_waits_for_an_ending_job_and_a_cancelled_one_is_gone(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    submitted: list[list[int]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Before: a COMPLETING job (or one squeue still listed as CANCELLED) counted as running, and
    # `retry --wait` printed "nothing to retry" and exited 0 with no job alive.
    run = _run(tmp_path, num_shards=1)
    state = _queue(tmp_path, monkeypatch, run)
    state.write_text("COMPLETING")
    code, error = _errors(capsys, "retry", str(run.root), "--executor", "local")
    assert code == 1 and submitted == []
    assert "the jobs of shards [0] are still ending (4242_0 (COMPLETING))" in error and "--wait" in error
    monkeypatch.setattr(recovery, "POLL_S", 0.1)
    monkeypatch.setattr(recovery, "ENDING_WAIT_S", 1.0)  # it never ends: a clear message, exit 1
    code, error = _errors(capsys, "retry", str(run.root), "--executor", "local", "--wait")
    assert code == 1 and submitted == [] and "still ending" in error
    monkeypatch.setattr(recovery, "ENDING_WAIT_S", 30.0)
    threading.Timer(1.0, lambda: state.write_text("")).start()  # the job leaves the queue
    assert main(["retry", str(run.root), "--executor", "local", "--wait"]) == 0
    assert submitted == [[0]]
    state.write_text("CANCELLED")  # still listed until MinJobAge, but gone
    assert main(["retry", str(run.root), "--executor", "local"]) == 0
    assert submitted == [[0], [0]]
    state.write_text("RUNNING")
    capsys.readouterr()
    assert main(["retry", str(run.root), "--executor", "local"]) == 0  # nothing wrong: it runs
    assert "shards [0] still have a queued or running job (4242_0 (RUNNING))" in capsys.readouterr().out
    assert submitted == [[0], [0]]


def test_cancel_says_which_jobs_are_still_ending(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Before: cancel returned at once, while its jobs could still be running for a while.
    run = _run(tmp_path, num_shards=1)
    state = _queue(tmp_path, monkeypatch, run)
    cancelled: list[list[str]] = []
    leaves_after_s: list[float] = []
    from hvbatch.batch.executors.slurm import SlurmQueue

    def cancel(self: SlurmQueue, records: list[JobRecord]) -> None:
        cancelled.append([r.job_id for r in records])
        if leaves_after_s:  # scancel: the job ends, then leaves the queue a little later
            state.write_text("COMPLETING")
            threading.Timer(leaves_after_s[0], lambda: state.write_text("")).start()

    monkeypatch.setattr(SlurmQueue, "cancel", cancel)
    monkeypatch.setattr(recovery, "CANCEL_WAIT_S", 0.5)
    state.write_text("COMPLETING")  # never leaves
    code, error = _errors(capsys, "cancel", str(run.root))
    assert code == 1 and "cancelled 1 job; still ending after 0 s: 4242_0 (COMPLETING)" in error
    state.write_text("RUNNING")
    leaves_after_s.append(1.0)
    monkeypatch.setattr(recovery, "CANCEL_WAIT_S", 10.0)
    capsys.readouterr()
    assert main(["cancel", str(run.root)]) == 0
    assert "cancelled 1 job; it has left the queue" in capsys.readouterr().out
    assert cancelled == [["4242_0"], ["4242_0"]] and state.read_text() == ""


ABORT_AT_EXIT = """
import atexit, os, signal, subprocess, sys, threading, time
from datetime import timedelta
import torch.distributed as dist
from hvbatch.cli import console_main, main

# A native call that returns during interpreter finalisation aborts the process (exit 134), as
# pyarrow's thread pools did at random: made certain here with a daemon thread in a TCPStore call
# against a stopped server that dies while the interpreter finalises.
server = subprocess.Popen([sys.executable, "-c", sys.argv[3]], stdout=subprocess.PIPE, text=True)
store = dist.TCPStore("127.0.0.1", int(server.stdout.readline()), is_master=False,
                      wait_for_workers=False, timeout=timedelta(seconds=1))
os.kill(server.pid, signal.SIGSTOP)
threading.Thread(target=lambda: store.add("k", 1), daemon=True).start()

class SlowFinalisation:
    def __del__(self):
        time.sleep(1.5)

slow = SlowFinalisation()
# At exit, the server dies half a second later: the stuck call returns while the interpreter finalises.
atexit.register(lambda: subprocess.Popen(["sh", "-c", f"sleep 0.5; kill -9 {server.pid}"]))
sys.argv = ["hvbatch", "status", sys.argv[2], "--json"]
if sys.argv and os.environ["HOW"] == "python-exit":
    sys.exit(main())
console_main()
"""


def test_the_hvbatch_executable_never_aborts_at_exit(tmp_path: Path) -> None:
    # `hvbatch cancel` racing a job's end once died with `terminate called without an active
    # exception` (exit 134): pyarrow's thread pools torn down at interpreter exit (one script in
    # four aborted so on a loaded machine, at random). The executable now ends with os._exit after
    # Python's clean-up, so no native teardown runs at all; the control shows that the harness
    # aborts a process that exits the ordinary way.
    from tests.test_store import SERVER

    run = _run(tmp_path)
    script = tmp_path / "abort_at_exit.py"
    script.write_text(ABORT_AT_EXIT)
    codes = {}
    for how in ("hvbatch-executable", "python-exit"):
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]), HOW=how)
        result = subprocess.run(
            [sys.executable, str(script), "", str(run.root), SERVER],
            capture_output=True, text=True, timeout=120, env=env,
        )  # fmt: skip
        codes[how] = (result.returncode, "terminate called" in result.stderr)
        if how == "hvbatch-executable":
            assert json.loads(result.stdout)["counts"]["pending"] == 4, result.stderr[-2000:]
    # -6: SIGABRT (a shell shows 134)
    assert codes == {"hvbatch-executable": (0, False), "python-exit": (-6, True)}, codes
