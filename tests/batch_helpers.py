"""Shared checks for the batch tests (local executor and Slurm)."""

from __future__ import annotations

import json
from pathlib import Path

import imageio.v2 as imageio
import pyarrow.parquet as pq

from hvbatch.batch.rundir import RunDir
from hvbatch.cli import main

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_PROMPTS = REPO / "examples" / "prompts.parquet"
EXAMPLE_CONFIG = REPO / "configs" / "examples" / "tiny-batch.yaml"


def cli_json(capsys, *argv: str) -> object:  # type: ignore[no-untyped-def]
    capsys.readouterr()
    assert main(list(argv)) == 0
    return json.loads(capsys.readouterr().out)


def assert_every_video_done_once(run_dir: Path, capsys) -> list[dict]:  # type: ignore[no-untyped-def]
    """Every prompt is exactly one readable video of the right size; the manifest agrees."""
    prompts = pq.read_table(EXAMPLE_PROMPTS).to_pylist()
    rows = cli_json(capsys, "manifest", str(run_dir), "--json")
    assert isinstance(rows, list)
    assert sorted(r["video_id"] for r in rows) == sorted(p["id"] for p in prompts)
    by_id = {r["video_id"]: r for r in rows}
    for prompt in prompts:
        row = by_id[prompt["id"]]
        assert row["status"] == "done", row
        assert row["prompt"] == prompt["prompt"] and row["seed"] == prompt["seed"]
        reader = imageio.get_reader(run_dir / row["path"], format="FFMPEG")
        assert reader.count_frames() == prompt["num_frames"]
        assert tuple(reader.get_meta_data()["size"]) == (prompt["width"], prompt["height"])
        reader.close()
    run = RunDir(run_dir)
    done_rows = [r for r in run.manifest_rows().to_pylist() if r["status"] == "done"]
    assert len(done_rows) == len(prompts), "a video was committed twice"
    # Final names only (a killed attempt may leave a hidden temporary file, never a final name).
    videos = sorted(p.name for p in (run_dir / "videos").iterdir() if not p.name.startswith("."))
    assert len(videos) == len(prompts)
    status = cli_json(capsys, "status", str(run_dir), "--json")
    assert status["counts"] == {"done": len(prompts), "failed": 0, "pending": 0, "running": 0}
    assert all(job["state"] == "COMPLETE" for job in status["jobs"])
    return rows
