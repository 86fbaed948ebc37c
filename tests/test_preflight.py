"""`submit` and `retry` check the model's files before writing anything; `retry` takes overrides
that cannot change a video and refuses the others; `auto` says which executor it chose and why.

Through the CLI as a user types it; the jobs a retry submits are stood in for (nothing runs).
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import yaml

from hvbatch.batch.control import commands
from hvbatch.batch.control.prompts import read_prompts
from hvbatch.batch.control.shards import shard_videos
from hvbatch.batch.executors.local import LocalExecutor
from hvbatch.batch.executors.registry import choose_executor
from hvbatch.batch.rundir import RunDir
from hvbatch.cli import main
from hvbatch.config import load_config
from hvbatch.pipeline import Pipeline
from tests.batch_helpers import EXAMPLE_CONFIG, EXAMPLE_PROMPTS
from tests.test_generate import _write_tiny_weights


def _errors(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    capsys.readouterr()
    code = main(list(argv))
    return code, capsys.readouterr().err


def test_submit_without_a_config_refuses_the_missing_weights_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "runs" / "r"
    code, error = _errors(capsys, "submit", str(EXAMPLE_PROMPTS), "--run-dir", str(run_dir))
    assert code == 2, error
    assert (
        "the model's files (model=hunyuan-video-t2v-720p) would fail every job, so nothing was submitted"
        in error
    )
    assert "weights: model weights not found: transformer, vae, text_encoder, text_encoder_2" in error
    assert "fix: set model.path" in error
    assert not (tmp_path / "runs").exists()


def test_retry_overrides_that_cannot_change_a_video_fix_a_run_and_are_recorded(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    submitted: list[list[int]] = []
    monkeypatch.setattr(LocalExecutor, "submit", lambda self, todo, **kw: submitted.append(todo) or [])
    weights = tmp_path / "weights"
    _write_tiny_weights(Pipeline.load(load_config(EXAMPLE_CONFIG)), weights, "official")
    # A run whose config points at no weights (submitted before they were in place).
    config = load_config(EXAMPLE_CONFIG, ["model.random_weights=false"])
    run = RunDir(tmp_path / "run")
    shards = shard_videos(read_prompts(EXAMPLE_PROMPTS, config.sampling), max_shard_cost=1e18, min_shards=2)
    commands.create_run(run, config, EXAMPLE_PROMPTS, shards, "local")
    saved = (run.root / "config.yaml").read_bytes()

    code, error = _errors(capsys, "retry", str(run.root), "--executor", "local")
    assert code == 2 and "so nothing was resubmitted" in error and "model weights not found" in error
    # Overrides that would change a video are refused, each named with why; nothing changes.
    code, error = _errors(
        capsys,
        "retry",
        str(run.root),
        "sampling.seed=3",
        "slurm.nodes=2",
        "video.crf=30",
        f"model.path={weights}",
    )
    assert code == 2, error
    assert "a retry cannot override sampling.seed (is part of each video's identity" in error
    assert (
        "slurm.nodes (changes the ranks of each job" in error and "video.crf (changes the mp4 files" in error
    )
    assert "model.path" not in error.split(". A retry may")[0]  # a weight path is allowed
    code, error = _errors(capsys, "retry", str(run.root), "model=tiny")
    assert code == 2 and "cannot override model (decides the model the videos are made with" in error
    code, error = _errors(capsys, "retry", str(run.root), "model.path=/nonexistent", "--executor", "local")
    assert code == 2 and "not a recognised weights folder" in error
    assert (run.root / "config.yaml").read_bytes() == saved and submitted == []
    assert not (run.root / "config-overrides.json").exists() and not list((run.root / "jobs").glob("*"))

    argv = ["retry", str(run.root), f"model.path={weights}", "slurm.time_min=7", "retry.max_attempts=5"]
    capsys.readouterr()
    assert main([*argv, "batch.executor=local"]) == 0
    out, error = capsys.readouterr()
    assert submitted == [[0, 1]]
    assert "executor: local (batch.executor=local)" in error
    assert f"config.yaml now has model.path='{weights}' (was None), slurm.time_min=7.0 (was 30.0)" in out
    resolved = yaml.safe_load((run.root / "config.yaml").read_text())
    assert resolved["model"]["path"] == str(weights) and resolved["slurm"]["time_min"] == 7.0
    assert (
        resolved["retry"]["max_attempts"] == 5 and resolved["sampling"] == yaml.safe_load(saved)["sampling"]
    )
    history = json.loads((run.root / "config-overrides.json").read_text())["overrides"]
    assert history[0]["command"] == "hvbatch retry"
    assert history[0]["set"]["model.path"] == {"from": None, "to": str(weights)}
    assert history[0]["set"]["batch.executor"] == {"from": "auto", "to": "local"}


def _fake_slurm(folder: Path, scontrol: str) -> None:
    folder.mkdir()
    for name, body in (("sbatch", "exit 0"), ("scontrol", scontrol)):
        path = folder / name
        path.write_text(f"#!/bin/sh\n{body}\n")
        path.chmod(path.stat().st_mode | stat.S_IXUSR)


def test_auto_says_which_executor_it_chose_and_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "none"))
    choice = choose_executor("auto", "batch.executor")
    assert (
        choice.line()
        == "executor: local (batch.executor=auto: sbatch and scontrol not on PATH, so no Slurm here)"
    )
    # Slurm's commands exist but the controller does not answer (a login node's SLURM_CONF): a warning.
    _fake_slurm(
        tmp_path / "bin", "echo 'slurm_load_partitions: Unable to contact slurm controller' >&2; exit 1"
    )
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}/usr/bin:/bin")
    choice = choose_executor("auto", "batch.executor")
    assert choice.kind == "local" and choice.warning
    assert choice.line().startswith(
        "warning: executor: local (batch.executor=auto: scontrol ping failed (exit status 1): "
        "slurm_load_partitions: Unable to contact slurm controller; each job's ranks run on this machine"
    )
    (tmp_path / "bin" / "scontrol").write_text("#!/bin/sh\necho 'Slurmctld(primary) at head is UP'\n")
    assert choose_executor("auto").line() == (
        "executor: slurm (--executor=auto: scontrol ping: Slurmctld(primary) at head is UP)"
    )
