"""Every user mistake is one `hvbatch CMD: error: ...` message and exit status 2: no traceback,
nothing half-made (README "When something is wrong")."""

from __future__ import annotations

import argparse
import os
import re
import stat
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest
import torch

from hvbatch import plan_cli
from hvbatch.batch.control import commands
from hvbatch.batch.control.prompts import read_prompts
from hvbatch.batch.control.shards import shard_videos
from hvbatch.batch.executors.base import JobRecord, record_submission
from hvbatch.batch.files import write_json_atomic
from hvbatch.batch.rundir import RunDir
from hvbatch.cli import main
from hvbatch.config import load_config, transformer_preset
from hvbatch.models.hunyuan_video.loading import open_checkpoint
from hvbatch.pipeline import Pipeline
from hvbatch.text import printable
from tests.batch_helpers import REPO
from tests.fault_helpers import FAULT_PROMPTS, write_prompts

TINY = ["model=tiny", "model.random_weights=true"]
BIDI_ID = "abc\u202etxt.exe"  # shows as "abcexe.txt" on a terminal


def _error(capsys: pytest.CaptureFixture[str], command: str) -> str:
    """The one error message of a failed command (asserting its form)."""
    err = capsys.readouterr().err
    assert err.startswith(f"hvbatch {command}: error: "), err
    assert "Traceback" not in err, err
    return err


def _run(tmp_path: Path, prompts: list[dict] | None = None) -> RunDir:
    config = load_config(overrides=TINY)
    tmp_path.mkdir(exist_ok=True)
    path = write_prompts(tmp_path / "prompts.parquet", prompts)
    videos = read_prompts(path, config.sampling)
    run = RunDir(tmp_path / "run")
    commands.create_run(run, config, path, shard_videos(videos, max_shard_cost=1e18, min_shards=2), "local")
    return run


BAD_YAML = {
    "syntax": ("model:\n  name: tiny\n random_weights: [true\n", r"not valid YAML: .*line 3"),
    "python-tag": ('model: !!python/object/apply:os.system ["touch PWNED"]\n', r"python/object/apply"),
    "alias-bomb": (
        'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'
        + "".join(
            f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi", strict=True)
        )
        + "model: {name: tiny}\n",
        r"line 2: YAML aliases \(\*a\) are not supported",
    ),
}


@pytest.mark.parametrize("kind", BAD_YAML)
def test_bad_yaml_is_refused_by_every_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    monkeypatch.chdir(tmp_path)
    text, message = BAD_YAML[kind]
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    prompts = str(write_prompts(tmp_path / "prompts.parquet"))
    for argv in (
        ["config"],
        ["plan"],
        ["plan", prompts],
        ["submit", prompts, "--run-dir", str(tmp_path / "run"), "--executor", "local"],
        ["generate", "--prompt", "a fox", "--out", str(tmp_path / "out" / "v.mp4")],
    ):
        start = time.monotonic()
        assert main([*argv, "--config", str(config)]) == 2, argv
        assert time.monotonic() - start < 2.0, argv
        err = _error(capsys, argv[0])
        assert "config file" in err and str(config.name) in err, err
        assert re.search(message, err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml", "prompts.parquet"]  # no PWNED


def test_a_run_dir_that_cannot_hold_a_run_is_refused_and_left_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prompts = str(write_prompts(tmp_path / "prompts.parquet"))
    a_file = tmp_path / "a-file"
    a_file.write_text("mine")
    other = tmp_path / "photos"
    (other / "2026").mkdir(parents=True)
    (other / "notes.txt").write_text("mine")
    other.chmod(0o755)
    cases = {
        a_file: "is a file, not a directory",
        a_file / "run": "cannot be created or written (Not a directory)",
        Path("/proc/hvbatch-no-such-dir/run"): "cannot be created or written",  # a virtual filesystem
        other: "is not empty and not a run",
    }
    for run_dir, message in cases.items():
        argv = ["submit", prompts, "--run-dir", str(run_dir), "--executor", "local", *TINY]
        assert main(argv) == 2, run_dir
        assert message in _error(capsys, "submit")
    assert a_file.read_text() == "mine"
    assert sorted(p.name for p in other.iterdir()) == ["2026", "notes.txt"]
    assert stat.S_IMODE(other.stat().st_mode) == 0o755  # not taken over, not chmod-ed


def test_slurm_without_a_controller_is_refused_before_the_run_dir_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, script in {
        "sbatch": "exit 1",
        "scontrol": "echo 'Slurmctld(primary) at x is DOWN'; exit 1",
    }.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{script}\n")
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    prompts = str(write_prompts(tmp_path / "prompts.parquet"))
    run_dir = tmp_path / "run"
    assert main(["submit", prompts, "--run-dir", str(run_dir), "--executor", "slurm", *TINY]) == 2
    assert "no Slurm controller answers" in _error(capsys, "submit")
    assert not run_dir.exists()
    # `retry` is refused before it reopens a shard whose marker counts failed videos.
    run = _run(tmp_path / "local")
    write_json_atomic(run.done_marker(0), {"shard": 0, "videos": 2, "done": 1, "failed": 1})
    assert main(["retry", str(run.root), "--executor", "slurm"]) == 2
    assert "no Slurm controller answers" in _error(capsys, "retry")
    assert run.done_marker(0).is_file() and run.submissions() == []


def test_ctrl_c_is_one_line_and_says_what_happened_to_the_jobs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(plan_cli, "plan_for_config", interrupted)
    assert main(["plan", *TINY]) == 130
    assert capsys.readouterr().err == "hvbatch plan: interrupted (Ctrl-C); nothing more was done\n"
    # `submit --wait` on Slurm (the local executor's Ctrl-C: tests/test_local_executor.py).
    run = _run(tmp_path)
    record_submission(
        run, [JobRecord(0, "77_0", "slurm"), JobRecord(1, "77_1", "slurm")], "slurm", manual=True
    )
    monkeypatch.setattr(commands, "wait_with_progress", interrupted)
    assert commands._wait_or_stop(run) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Slurm jobs 77_0, 77_1 keep running (`hvbatch cancel`" in err, err


def test_output_into_a_closed_pipe_ends_quietly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    run = _run(tmp_path)

    class ClosedPipe:
        def write(self, text: str) -> int:
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self) -> None:
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    assert main(["status", str(run.root)]) == 141
    monkeypatch.undo()
    assert capsys.readouterr().err == ""
    # The real thing: the reader is gone before `manifest --json | head` writes (and at exit).
    read_end, write_end = os.pipe()
    os.close(read_end)
    result = subprocess.run(
        [sys.executable, "-m", "hvbatch", "manifest", str(run.root), "--json"],
        cwd=REPO,
        stdout=write_end,
        stderr=subprocess.PIPE,
        text=True,
        timeout=120,
    )
    os.close(write_end)
    assert result.returncode == 141 and result.stderr == "", result.stderr


def test_generate_checks_out_before_the_model_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_load(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(Pipeline, "load", no_load)
    a_file = tmp_path / "a-file"
    a_file.write_text("mine")
    cases = {
        "/proc/hvbatch-no-such-dir/v.mp4": "cannot write in /proc",
        f"{a_file}/v.mp4": "not a directory",
        f"{tmp_path}/v.mp4/": "is a directory",
    }
    (tmp_path / "v.mp4").mkdir()
    for out, message in cases.items():
        assert main(["generate", "--prompt", "a fox", "--out", out, *TINY]) == 2, out
        assert message in _error(capsys, "generate")


@pytest.mark.parametrize("command", ["status", "retry", "cancel", "manifest", "sbatch"])
def test_a_folder_that_is_not_a_run(tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str) -> None:
    assert main([command, str(tmp_path)]) == 2
    assert f"{tmp_path} is not an hvbatch run directory (no run.json)" in _error(capsys, command)


def test_sbatch_shards_that_are_not_numbers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = _run(tmp_path)
    assert main(["sbatch", str(run.root), "--shards", "a,b"]) == 2
    assert "--shards 'a,b': give comma-separated shard indices" in _error(capsys, "sbatch")


def test_a_prompts_file_with_a_corrupt_data_page(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "prompts.parquet"
    table = pa.table({"prompt": [f"a prompt about the number {i}, " * 3 for i in range(2000)]})
    pq.write_table(table, path, compression="snappy", use_dictionary=False)
    column = pq.ParquetFile(path).metadata.row_group(0).column(0)
    data = bytearray(path.read_bytes())
    middle = column.data_page_offset + column.total_compressed_size // 2
    data[middle : middle + 64] = bytes(b ^ 0xFF for b in data[middle : middle + 64])
    path.write_bytes(bytes(data))
    run_dir = tmp_path / "run"
    for argv in (
        ["plan", str(path)],
        ["submit", str(path), "--run-dir", str(run_dir), "--executor", "local"],
    ):
        assert main([*argv, *TINY]) == 2
        assert f"{path}: is corrupt: a data page cannot be read" in _error(capsys, argv[0])
    assert not run_dir.exists()


def test_a_legacy_format_checkpoint_with_pickled_objects(tmp_path: Path) -> None:
    path = tmp_path / "mp_rank_00_model_states.pt"
    state = {"module": {"x": torch.zeros(2)}, "args": argparse.Namespace(lr=1)}
    torch.save(state, path, _use_new_zipfile_serialization=False)
    with pytest.raises(ValueError, match=r"refusing to load .*pickled Python objects"):
        open_checkpoint(path, config=transformer_preset("tiny"))


def test_plan_never_advises_more_gpus_when_the_weights_alone_do_not_fit(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["plan", "model=hunyuan-video-t2v-720p", "parallel.gpu_memory_gib=20"]) == 2
    err = _error(capsys, "plan")
    assert "alone need" in err and "more GPUs per job cannot help" in err and "fp8" in err, err
    assert "use more GPUs" not in err
    # Where more GPUs would help, they are still the first advice.
    argv = ["plan", "model=hunyuan-video-t2v-720p", "slurm.gpus_per_node=1", "parallel.gpu_memory_gib=45"]
    assert main(argv) == 2
    assert "To fix: use more GPUs per job" in _error(capsys, "plan")


def test_manifest_out_writes_csv_or_refuses(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = _run(tmp_path)
    out = tmp_path / "all.csv"
    assert main(["manifest", str(run.root), "--out", str(out)]) == 0
    rows = pa_csv.read_csv(out).to_pylist()
    assert sorted(r["video_id"] for r in rows) == sorted(p["id"] for p in FAULT_PROMPTS)
    assert {r["status"] for r in rows} == {"pending"}
    capsys.readouterr()
    assert main(["manifest", str(run.root), "--out", str(tmp_path / "all.txt")]) == 2
    assert "written as .parquet or .csv" in _error(capsys, "manifest")
    assert not (tmp_path / "all.txt").exists()


def test_ids_and_prompts_are_printed_escaped(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert printable("a\x1b[31mb\x85c\x7fd\u202ee\u2066f\u200fg\u061ch\ni") == (
        "a\\x1b[31mb\\x85c\\x7fd\\u202ee\\u2066f\\u200fg\\u061ch\\ni"
    )
    assert printable("zürich 東京 — ok") == "zürich 東京 — ok"
    run = _run(tmp_path / "a", [{"id": BIDI_ID, "prompt": "A kite.\u202e", "seed": 0}])
    assert main(["manifest", str(run.root)]) == 0
    out = capsys.readouterr().out
    assert "abc\\u202etxt.exe" in out and "\u202e" not in out, out
    prompts = write_prompts(
        tmp_path / "dup.parquet", [{"id": BIDI_ID, "prompt": "x", "seed": s} for s in (0, 1)]
    )
    assert main(["plan", str(prompts), *TINY]) == 2
    err = _error(capsys, "plan")
    assert "duplicate id" in err and "abc\\u202etxt.exe" in err and "\u202e" not in err, err
