"""`hvbatch status --json` and `--wait` polls on large runs, the way running jobs leave them.

    python3 benchmarks/status_table.py status --parts 10000 [--parts-per-shard 16] [--videos-per-part 48]
        [--complete] [--tmp /tmp]
    python3 benchmarks/status_table.py poll [--shards 3000] [--parts-per-shard 4] [--changed 300]

`status` builds a run directory with `--parts` manifest parts, `--parts-per-shard` of them per
shard (one per dp group and segment of one attempt) holding `--videos-per-part` videos each, one
metrics row per shard, a submission record naming this (live) process as every shard's job, and
either the parts of running shards (half their videos done, one started: "open") or of finished
shards with their completion markers (`--complete`). Where the code has per-part summaries
(`hvbatch.batch.summaries`), each part and metrics row gets the summary its writer leaves. Then
`hvbatch status --json` runs twice, each in a fresh process (the first sees a cold reader, no
cache of any kind: "first call"; the second the same files again: "second call"), and prints
each call's wall time and peak RSS.

`poll` builds a run of `--shards` running shards and times `--wait`'s polls (`progress.poll_run`
on one `RunReader`), the first one and then polls after `--changed` parts were rewritten (one
more video done each, with its summary where the code writes them), as running jobs do.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from hvbatch.batch import files
from hvbatch.batch.control.prompts import VIDEO_SCHEMA
from hvbatch.batch.executors.local import process_identity
from hvbatch.batch.rundir import MANIFEST_SCHEMA, METRICS_SCHEMA, RunDir
from hvbatch.config import load_config, save_config

try:  # the per-part summaries, where this version of the code has them
    from hvbatch.batch import summaries
except ImportError:
    summaries = None  # type: ignore[assignment]

KEY = "job1.r0"


def _videos(shard: int, count: int) -> pa.Table:
    ids = [f"s{shard}v{i}" for i in range(count)]
    n = count
    columns = {
        "video_id": ids, "prompt_id": ids, "row": np.arange(n) + shard * n, "video_index": np.zeros(n),
        "prompt": [f"prompt {i}" for i in ids], "negative_prompt": [""] * n, "seed": np.arange(n),
        "height": np.full(n, 64), "width": np.full(n, 64), "num_frames": np.full(n, 9),
        "num_inference_steps": np.full(n, 4), "guidance_scale": np.full(n, 6.0),
        "flow_shift": np.full(n, 7.0), "cache_threshold": [None] * n, "cost": np.full(n, 1.0),
    }  # fmt: skip
    arrays = {
        f.name: pa.array(columns[f.name], f.type) if f.name in columns else pa.nulls(n, f.type)
        for f in VIDEO_SCHEMA
    }
    return pa.table(arrays, schema=VIDEO_SCHEMA)


def _part(shard: int, ids: list[str], complete: bool, now: float) -> pa.Table:
    """A dp group's segment: every video done (complete), or the first half done and one started."""
    tried = ids if complete else ids[: len(ids) // 2 + 1]
    status = ["done"] * len(tried) if complete else ["done"] * (len(tried) - 1) + ["started"]
    rows = [
        {name: None for name in MANIFEST_SCHEMA.names}
        | {"video_id": vid, "prompt": f"prompt {vid}", "seed": 0, "shard": shard, "status": s,
           "attempt": 1, "final": False, "path": f"videos/{vid}.mp4" if s == "done" else None,
           "seconds": 1.0, "job_id": "1", "attempt_key": KEY, "finished_at": now}
        for vid, s in zip(tried, status, strict=True)
    ]  # fmt: skip
    return pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)


def _write_part(path: Path, table: pa.Table, index_of: dict[str, int]) -> None:
    """A part and, where this version of the code has them, its summary (as its writer does)."""
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)
    if summaries is not None:
        summaries.write_part_summary(path, table, index_of)


def build_run(
    root: Path, num_shards: int, parts_per_shard: int, videos_per_part: int, complete: bool
) -> RunDir:
    """A run directory as its jobs leave it (files written directly, summaries without fsyncs:
    only the result matters, and it is read from the page cache either way)."""
    files.fsync_file = files.fsync_dir = lambda path: None  # type: ignore[assignment]
    run = RunDir(root)
    for folder in ("shards", "manifest", "metrics", "done", "jobs"):
        (run.root / folder).mkdir(parents=True, exist_ok=True)
    save_config(load_config(overrides=["model=tiny"]), run.root / "config.yaml")
    per_shard = parts_per_shard * videos_per_part
    now = time.time()
    index_parts = []
    for shard in range(num_shards):
        videos = _videos(shard, per_shard)
        pq.write_table(videos, run.shard_path(shard))
        ids = videos["video_id"].to_pylist()
        index_of = {video_id: i for i, video_id in enumerate(ids)}
        index_parts.append(
            videos.select(["video_id", "prompt", "seed"]).append_column(
                "shard", pa.array(np.full(per_shard, shard), pa.int32())
            )
        )
        for p in range(parts_per_shard):
            dp, segment = p % 8, p // 8
            part = _part(shard, ids[p * videos_per_part : (p + 1) * videos_per_part], complete, now)
            _write_part(run.manifest_part(shard, KEY, dp, segment), part, index_of)
        metrics = {name: None for name in METRICS_SCHEMA.names} | {
            "job_id": "1", "attempt_key": KEY, "shard": shard, "started_at": now - 60,
            "exit_reason": "completed" if complete else "running", "finished_at": now if complete else None,
        }  # fmt: skip
        metrics_path = run.metrics_part(shard, KEY)
        metrics_table = pa.Table.from_pylist([metrics], schema=METRICS_SCHEMA)
        pq.write_table(metrics_table, metrics_path)
        if summaries is not None:
            summaries.write_metrics_summary(metrics_path, metrics_table)
        if complete:
            marker = {"shard": shard, "videos": per_shard, "done": per_shard, "failed": 0, "job_id": "1",
                      "attempt_key": KEY, "attempts": 1, "last_exit": "completed", "last_exit_detail": None,
                      "last_done_at": now, "finished_at": now}  # fmt: skip
            run.done_marker(shard).write_text(json.dumps(marker, indent=2, sort_keys=True))
    pq.write_table(pa.concat_tables(index_parts), run.videos_path)
    me = os.getpid()
    jobs = [{"shard": s, "job_id": str(me), "executor": "local", "identity": process_identity(me)}
            for s in range(num_shards)]  # fmt: skip
    submission = {"submitted_at": now - 120, "executor": "local", "jobs": jobs, "kind": "manual"}
    (run.root / "jobs" / "submission-0001.json").write_text(json.dumps(submission))
    run.run_json.write_text(
        json.dumps({"prompts": "prompts.parquet", "num_shards": num_shards,
                    "num_videos": num_shards * per_shard, "executor": "local", "created_at": now - 120})
    )  # fmt: skip
    return run


def cpu_seconds() -> float:
    """CPU time of this process, all its threads (on a machine shared with other work, closer to
    what the command costs than its wall time)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def peak_rss_mib() -> float:
    """This process's own peak RSS (VmHWM). Its ru_maxrss would not do: Linux carries the parent's
    peak over the fork and exec that started it."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024


def child_status(run_dir: str) -> None:
    import contextlib
    import io

    from hvbatch.cli import main

    start = time.perf_counter()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["status", run_dir, "--json"]) == 0
    seconds = time.perf_counter() - start
    counts = json.loads(out.getvalue())["counts"]
    peak = peak_rss_mib()
    print(json.dumps({"seconds": seconds, "cpu": cpu_seconds(), "peak_rss_mib": peak, "counts": counts}))


def time_status(args: argparse.Namespace) -> None:
    num_shards = max(1, args.parts // args.parts_per_shard)
    root = Path(args.tmp) / f"hvbatch-status-table-{os.getpid()}"
    try:
        start = time.perf_counter()
        run = build_run(root, num_shards, args.parts_per_shard, args.videos_per_part, args.complete)
        state = "complete" if args.complete else "open"
        parts = num_shards * args.parts_per_shard
        print(f"built {num_shards:,} {state} shards, {parts:,} parts in {time.perf_counter() - start:.0f} s")
        for call in ("first", "second")[: args.calls]:
            cmd = [sys.executable, __file__, "child-status", str(run.root)]
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            result = json.loads(done.stdout.splitlines()[-1])
            layout = f"{num_shards:,} x {args.parts_per_shard} x {args.videos_per_part}"
            figures = f"{result['seconds']:.2f} s | {result['cpu']:.2f} s | {result['peak_rss_mib']:.0f} MiB"
            print(f"| {parts:,} | {layout} | {state} | {call} | {figures} | {result['counts']} |", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def time_polls(args: argparse.Namespace) -> None:
    from hvbatch.batch.control.progress import poll_run
    from hvbatch.batch.control.status import RunReader

    root = Path(args.tmp) / f"hvbatch-status-polls-{os.getpid()}"
    rng = np.random.default_rng(0)
    try:
        run = build_run(root, args.shards, args.parts_per_shard, args.videos_per_part, False)
        reader = RunReader(run)
        start = time.perf_counter()
        first = poll_run(reader)
        first_s = time.perf_counter() - start
        seconds = []
        done_extra = 0
        for _ in range(args.polls):
            for flat in rng.choice(args.shards * args.parts_per_shard, args.changed, replace=False).tolist():
                shard, p = divmod(flat, args.parts_per_shard)
                ids = run.read_shard(shard)["video_id"].to_pylist()
                chunk = ids[p * args.videos_per_part : (p + 1) * args.videos_per_part]
                table = _part(shard, chunk, False, time.time())
                status = table["status"].to_pylist()
                status[len(chunk) // 2] = "done"  # the started video is done now
                table = table.set_column(9, "status", pa.array(status, pa.string()))
                index_of = {video_id: i for i, video_id in enumerate(ids)}
                _write_part(run.manifest_part(shard, KEY, p % 8, p // 8), table, index_of)
            start = time.perf_counter()
            _, _, counts = poll_run(reader)
            seconds.append(time.perf_counter() - start)
            done_extra = counts["done"]
        median = statistics.median(seconds)
        print(
            f"| {args.shards:,} running shards x {args.parts_per_shard} parts | first poll {first_s:.2f} s "
            f"| next polls ({args.changed} parts changed before each): median {median:.2f} s, "
            f"max {max(seconds):.2f} s | done {first[2]['done']} -> {done_extra} |"
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "child-status":
        return child_status(sys.argv[2])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    status = sub.add_parser("status")
    status.add_argument("--parts", type=int, default=10_000)
    status.add_argument("--parts-per-shard", type=int, default=16)
    status.add_argument("--videos-per-part", type=int, default=48)
    status.add_argument("--complete", action="store_true")
    status.add_argument("--calls", type=int, default=2, choices=[1, 2], help="1: the first call only")
    status.add_argument("--tmp", default="/tmp")
    poll = sub.add_parser("poll")
    poll.add_argument("--shards", type=int, default=3000)
    poll.add_argument("--parts-per-shard", type=int, default=4)
    poll.add_argument("--videos-per-part", type=int, default=48)
    poll.add_argument("--changed", type=int, default=300)
    poll.add_argument("--polls", type=int, default=5)
    poll.add_argument("--tmp", default="/tmp")
    args = parser.parse_args()
    (time_status if args.what == "status" else time_polls)(args)


if __name__ == "__main__":
    main()
