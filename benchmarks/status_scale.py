"""`hvbatch status` on a large run directory, without running any job.

    python3 benchmarks/status_scale.py [--parts 10000]

Builds a run directory with N shards of one video each, N manifest parts (every video done) and N
completion markers, the way jobs leave them, then times `hvbatch status --json` in this process.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import tempfile
import time
from pathlib import Path

import pyarrow as pa

from hvbatch.batch.commands import create_run
from hvbatch.batch.prompts import VIDEO_SCHEMA
from hvbatch.batch.rundir import MANIFEST_SCHEMA, RunDir, write_json_atomic, write_parquet_atomic
from hvbatch.cli import main
from hvbatch.config import load_config


def build_run(root: Path, parts: int) -> RunDir:
    config = load_config(overrides=["model=tiny"])
    shards = []
    for i in range(parts):
        video = {name: None for name in VIDEO_SCHEMA.names} | {
            "video_id": f"v{i}",
            "prompt_id": f"v{i}",
            "row": i,
            "video_index": 0,
            "prompt": f"prompt {i}",
            "negative_prompt": "",
            "seed": i,
            "height": 64,
            "width": 64,
            "num_frames": 9,
            "num_inference_steps": 4,
            "guidance_scale": 6.0,
            "flow_shift": 7.0,
            "cost": 1.0,
        }
        shards.append(pa.Table.from_pylist([video], schema=VIDEO_SCHEMA))
    run = RunDir(root)
    create_run(run, config, Path("prompts.parquet"), shards, "local")
    now = time.time()
    for i in range(parts):
        row = {name: None for name in MANIFEST_SCHEMA.names} | {
            "video_id": f"v{i}",
            "prompt": f"prompt {i}",
            "seed": i,
            "shard": i,
            "status": "done",
            "path": f"videos/v{i}.mp4",
            "seconds": 1.0,
            "job_id": "1",
            "attempt_key": "job1.r0",
            "finished_at": now,
        }
        write_parquet_atomic(
            run.manifest_part(i, "job1.r0", 0), pa.Table.from_pylist([row], schema=MANIFEST_SCHEMA)
        )
        write_json_atomic(run.done_marker(i), {"shard": i, "videos": 1, "done": 1, "failed": 0})
    return run


def main_benchmark() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--parts", type=int, default=10_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        run = build_run(Path(tmp) / "run", args.parts)
        print(
            f"built a run with {args.parts} shards and manifest parts in {time.perf_counter() - start:.1f} s"
        )
        for _ in range(2):  # the second run sees a warm page cache, as a user re-running status does
            start = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):
                main(["status", str(run.root), "--json"])
            print(f"hvbatch status --json: {time.perf_counter() - start:.2f} s")


if __name__ == "__main__":
    main_benchmark()
