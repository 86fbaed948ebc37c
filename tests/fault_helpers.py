"""Shared pieces of the fault-injection tests: a small prompts file and the exactly-once checks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import imageio.v2 as imageio
import pyarrow as pa
import pyarrow.parquet as pq

from hvbatch.batch.rundir import RunDir
from hvbatch.cli import main
from tests.batch_helpers import EXAMPLE_CONFIG

# Ids with path characters, spaces and unicode: file names must stay inside videos/.
FAULT_PROMPTS = [
    {"id": "../../escape fox", "prompt": "A fox in the snow.", "seed": 0},
    {"id": "city/ü night", "prompt": "A city at night.", "seed": 1},
    {"id": "kite", "prompt": "A kite over a beach.", "seed": 2},
    {"id": "plain", "prompt": "A plain field.", "seed": 3},
]
SMALL = {"height": 48, "width": 64, "num_frames": 5}
# Few, small ranks keep the matrix quick on a 2-core CI machine.
FAST = ["sampling.num_inference_steps=3", "slurm.tasks_per_node=2", "batch.min_shards=2",
        "retry.backoff_s=1", "parallel.timeout_s=6", "retry.heartbeat_interval_s=0.5",
        "retry.peer_timeout_s=6"]  # fmt: skip


# Busy peers (tests/test_runtime_waits.py, tests/test_faults_slurm.py): dp 2 x ulysses 2 on 4 ranks.
# Replica 0 (ranks 0, 1) makes videos 0 and 2, replica 1 videos 1 and 3. Rank 0, replica 0's leader,
# takes 12 s more to write video 0 while rank 1 waits for it; replica 1's last video takes 20 s more
# (every rank of its group), so replica 0 waits for it at the end of the shard. Collectives and
# heartbeats give up after 5 s.
BUSY_PEER_FAULTS = ";".join(
    ["action=slow-write,rank=0,video=0,seconds=12", "action=slow,rank=all,video=3,step=1,seconds=20"]
)
BUSY_PEER_OVERRIDES = [
    *("slurm.tasks_per_node=4", "batch.min_shards=1", "parallel.ulysses=2", "parallel.ring=1"),
    *("parallel.timeout_s=5", "retry.peer_timeout_s=5", "retry.heartbeat_interval_s=0.5"),
]


def write_prompts(path: Path, prompts: list[dict[str, Any]] | None = None) -> Path:
    rows = [p | SMALL for p in (prompts or FAULT_PROMPTS)]
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def submit_argv(prompts: Path, run_dir: Path, executor: str, *overrides: str) -> list[str]:
    return ["submit", str(prompts), "--config", str(EXAMPLE_CONFIG), "--executor", executor,
            "--run-dir", str(run_dir), *FAST, *overrides]  # fmt: skip


def manifest(capsys: Any, run_dir: Path) -> dict[str, dict[str, Any]]:
    capsys.readouterr()
    assert main(["manifest", str(run_dir), "--json"]) == 0
    return {row["video_id"]: row for row in json.loads(capsys.readouterr().out)}


def metrics(run_dir: Path) -> dict[int, list[dict[str, Any]]]:
    """Per shard, its attempts' metrics rows, oldest first."""
    rows = RunDir(run_dir).metrics_rows()
    by_shard: dict[int, list[dict[str, Any]]] = {}
    for row in rows:
        by_shard.setdefault(int(row["shard"]), []).append(row)
    return by_shard


def assert_exactly_once(run_dir: Path, prompts: list[dict[str, Any]], failed: dict[str, str]) -> None:
    """Each prompt is one done video or one final failure naming `failed[id]`; nothing else on disk."""
    run = RunDir(run_dir)
    rows = run.manifest_rows().to_pylist()
    for prompt in prompts:
        vid = prompt["id"]
        done = [r for r in rows if r["video_id"] == vid and r["status"] == "done"]
        final = [r for r in rows if r["video_id"] == vid and r["status"] == "failed" and r["final"]]
        if vid in failed:
            assert not done and len(final) == 1, (vid, done, final)
            assert failed[vid] in final[0]["error"], final[0]["error"]
            assert not run.video_path(vid).exists()
        else:
            assert len(done) == 1, (vid, done)
            # A final failure may only precede the video's success (a manual `hvbatch retry`).
            assert all(f["finished_at"] < done[0]["finished_at"] for f in final), (vid, done, final)
            reader = imageio.get_reader(run_dir / done[0]["path"], format="FFMPEG")
            assert reader.count_frames() == SMALL["num_frames"]
            reader.close()
    videos = sorted(p.name for p in (run_dir / "videos").iterdir() if not p.name.startswith("."))
    assert videos == sorted(run.video_path(p["id"]).name for p in prompts if p["id"] not in failed)
    assert all(p.parent == run_dir / "videos" for p in (run_dir / "videos").iterdir())
