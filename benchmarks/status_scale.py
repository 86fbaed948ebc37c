"""`hvbatch status` and `hvbatch retry` on large run directories, without running any job.

    python3 benchmarks/status_scale.py [--parts 10000] [--retry-shards 3000]

Status: a run directory with N shards of one video each, N manifest parts (every video done) and N
completion markers, the way jobs leave them; times `hvbatch status --json` in this process.
Retry: a run with M shards, none complete, each with an attempt whose job has gone; times
`hvbatch retry` (job states, reopening, the lock, recording the submission) with the submission
itself replaced by recording the jobs, so that the figure is the control plane's own cost.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import tempfile
import time
from pathlib import Path

import pyarrow as pa

from hvbatch.batch.control.commands import create_run
from hvbatch.batch.control.prompts import VIDEO_SCHEMA
from hvbatch.batch.executors.base import JobRecord, record_submission
from hvbatch.batch.executors.local import LocalExecutor
from hvbatch.batch.files import write_json_atomic, write_parquet_atomic
from hvbatch.batch.rundir import MANIFEST_SCHEMA, METRICS_SCHEMA, RunDir
from hvbatch.cli import main
from hvbatch.config import load_config


def build_run(root: Path, parts: int, done: bool = True) -> RunDir:
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
    for i in range(parts if done else 0):
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


def time_retry(root: Path, num_shards: int) -> None:
    run = build_run(root, num_shards, done=False)
    for i in range(num_shards):  # each shard: an attempt that crashed, its job gone
        row = {name: None for name in METRICS_SCHEMA.names} | {
            "job_id": "1", "attempt_key": "job1.a0", "shard": i, "exit_reason": "running", "started_at": 1.0,
        }  # fmt: skip
        table = pa.Table.from_pylist([row], schema=METRICS_SCHEMA)
        write_parquet_atomic(run.metrics_part(i, "job1.a0"), table)
    gone = [JobRecord(i, "1", "local", "1:0") for i in range(num_shards)]  # pid 1 is not this job
    record_submission(run, gone, "local", manual=True)

    def record_only(self: LocalExecutor, shards: list[int], **kw: object) -> list[JobRecord]:
        records = [JobRecord(s, "2", "local", None) for s in shards]
        record_submission(self.run, records, "local", manual=True)
        return records

    LocalExecutor.submit = record_only  # type: ignore[method-assign]
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["retry", str(run.root), "--executor", "local"]) == 0
    print(f"hvbatch retry over {num_shards} unfinished shards: {time.perf_counter() - start:.2f} s")


def main_benchmark() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--parts", type=int, default=10_000)
    parser.add_argument("--retry-shards", type=int, default=3_000)
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
        time_retry(Path(tmp) / "retry", args.retry_shards)


if __name__ == "__main__":
    main_benchmark()
