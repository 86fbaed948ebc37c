"""`hvbatch submit` end to end on the local executor (8 ranks per job, like an 8-GPU node)."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from hvbatch.batch.rundir import RunDir
from hvbatch.cli import main
from tests.batch_helpers import EXAMPLE_CONFIG, EXAMPLE_PROMPTS, assert_every_video_done_once


def test_submit_runs_every_prompt_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "run"
    argv = ["submit", str(EXAMPLE_PROMPTS), "--config", str(EXAMPLE_CONFIG), "--executor", "local",
            "--run-dir", str(run_dir), "--wait"]  # fmt: skip
    assert main(argv) == 0
    assert_every_video_done_once(run_dir, capsys)
    run = RunDir(run_dir)
    assert run.num_shards() >= 2 and (run_dir.stat().st_mode & 0o077) == 0
    metrics = [pq.read_table(p).to_pylist()[0] for p in sorted((run_dir / "metrics").glob("*.parquet"))]
    assert len(metrics) == run.num_shards()
    for row in metrics:
        assert row["world_size"] == 8 and row["dp"] * row["ulysses"] * row["ring"] == 8
        assert row["exit_reason"] == "completed" and len(row["peak_memory_bytes"]) == 8
        assert row["load_seconds"] > 0 and row["seconds_to_first_step"] > 0
    # The merged manifest reads with pyarrow, pandas and duckdb.
    merged = tmp_path / "all.parquet"
    assert main(["manifest", str(run_dir), "--out", str(merged)]) == 0
    import duckdb
    import pandas as pd

    assert pq.read_table(merged).num_rows == 6
    frame = pd.read_parquet(merged)
    assert list(frame["status"]) == ["done"] * 6 and frame["attempts"].tolist() == [1] * 6
    assert duckdb.sql(f"SELECT count(*) FROM '{merged}' WHERE status = 'done'").fetchall() == [(6,)]
    # A rerun skips what is done; a second submit into the same directory is refused.
    assert main(["retry", str(run_dir)]) == 0
    assert "nothing to retry" in capsys.readouterr().out
    assert main([*argv[:-1]]) == 2
    assert "already holds a run" in capsys.readouterr().err


def test_cancel_then_retry_finishes_exactly_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "run"
    argv = [
        "submit",
        str(EXAMPLE_PROMPTS),
        "--config",
        str(EXAMPLE_CONFIG),
        "--executor",
        "local",
        "--run-dir",
        str(run_dir),
        "sampling.num_inference_steps=20",
        "parallel.ulysses=4",
        "parallel.ring=2",
    ]  # fmt: skip  (one group of 8: videos one at a time)
    assert main(argv) == 0
    deadline = time.time() + 240
    while not list((run_dir / "videos").glob("[!.]*.mp4")) and time.time() < deadline:
        time.sleep(0.5)  # cancel once the first video is committed: mid-run
    time.sleep(1)  # its done row follows the mp4
    assert main(["cancel", str(run_dir)]) == 0
    time.sleep(3)
    capsys.readouterr()
    assert main(["status", str(run_dir), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert 1 <= status["counts"]["done"] < 6
    assert status["counts"]["pending"] == 6 - status["counts"]["done"]  # nothing is left running
    assert main(["status", str(run_dir)]) == 0  # the shard that never started says why it stopped
    assert re.search(
        r"stopped: shard 1 cancelled by the user at .*\(hvbatch cancel, before the shard started\)",
        capsys.readouterr().out,
    )
    assert main(["retry", str(run_dir), "--wait"]) == 0
    assert_every_video_done_once(run_dir, capsys)
    reasons = [row["exit_reason"] for row in RunDir(run_dir).metrics_rows()]
    # 2 shards: one cut short, one cancelled before it started
    assert reasons.count("cancelled") == 2 and reasons.count("completed") == 2
