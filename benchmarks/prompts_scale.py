"""`hvbatch submit --dry-run` and `hvbatch submit` on very large prompt files: time and peak RSS.

    python3 benchmarks/prompts_scale.py [--rows 1000000 2000000 5000000 10000000] [--tmp /tmp]
        [--modes dry-run submit] [--keep]

For each size, writes a prompt file of short prompts and a few columns (prompt, seed, height,
width, num_frames, some nulls that take the config defaults, 5% of rows asking for 2-4 videos)
in row groups of 1M rows, then runs each mode in a fresh child process that prints its own wall
time and peak RSS (VmHWM of that process: a neighbour's memory never counts). `submit`
uses the local executor with the job submission replaced by recording it (the figure is the
control plane's own cost: reading, sharding, writing the run directory). Files are removed after
each size unless `--keep`.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

WORDS = ("a", "red", "fox", "cat", "dog", "walks", "runs", "in", "the", "snow", "rain", "city")
WORDS += ("forest", "at", "night", "dawn", "slowly", "cinematic")
CHUNK_ROWS = 1_000_000
OVERRIDES = ["slurm.time_min=1440", "batch.seconds_per_cost_unit=3.3e-4"]
"""A walltime and a figure both versions read alike (the calibrated default came later)."""


def write_prompts(path: Path, rows: int, seed: int = 0) -> None:
    """`rows` distinct short prompts (8 words and a number) with a few per-row overrides."""
    rng = np.random.default_rng(seed)
    words = np.array(WORDS, dtype=object)
    with pq.ParquetWriter(path, _schema()) as writer:
        for start in range(0, rows, CHUNK_ROWS):
            n = min(CHUNK_ROWS, rows - start)
            picks = words[rng.integers(0, len(WORDS), size=(n, 8))]
            prompts = [" ".join(w) + f" #{start + i}" for i, w in enumerate(picks)]
            nulls = lambda p, n=n: rng.random(n) < p
            table = pa.table(
                {
                    "prompt": pa.array(prompts, pa.string()),
                    "seed": pa.array(rng.integers(0, 2**31, n), mask=nulls(0.2)),
                    "height": pa.array(rng.choice([480, 544, 720], n), mask=nulls(0.1)),
                    "width": pa.array(rng.choice([848, 960, 1280], n), mask=nulls(0.1)),
                    "num_frames": pa.array(rng.choice([33, 65, 129], n), mask=nulls(0.1)),
                    "num_videos": pa.array(np.where(nulls(0.05), rng.integers(2, 5, n), 1), pa.int32()),
                },
                schema=_schema(),
            )
            writer.write_table(table)


def _schema() -> pa.Schema:
    names = ("seed", "height", "width", "num_frames")
    return pa.schema([("prompt", pa.string()), *((n, pa.int64()) for n in names), ("num_videos", pa.int32())])


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


def child(mode: str, prompts: str, run_dir: str) -> None:
    """One command in this process; prints {seconds, peak_rss_mib} as JSON on the last line."""
    from hvbatch.batch.executors.base import JobRecord, record_submission
    from hvbatch.batch.executors.local import LocalExecutor
    from hvbatch.cli import main

    def record_only(self: LocalExecutor, shards: list[int], **kw: object) -> list[JobRecord]:
        records = [JobRecord(s, "1", "local", None) for s in shards]
        record_submission(self.run, records, "local", manual=True)
        return records

    LocalExecutor.submit = record_only  # type: ignore[method-assign]
    argv = ["submit", prompts, *OVERRIDES]
    argv += ["--dry-run"] if mode == "dry-run" else ["--run-dir", run_dir, "--executor", "local"]
    start = time.perf_counter()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(argv)
    seconds = time.perf_counter() - start
    peak = peak_rss_mib()
    lines = out.getvalue().splitlines()
    result = {"code": code, "seconds": seconds, "cpu": cpu_seconds(), "peak_rss_mib": peak}
    result["first"] = lines[:1]
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 2_000_000, 5_000_000, 10_000_000])
    parser.add_argument("--modes", nargs="+", default=["dry-run", "submit"], choices=["dry-run", "submit"])
    parser.add_argument("--tmp", default="/tmp")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(*args.child)
    print("| rows | file | mode | wall | CPU | peak RSS | bytes/row | first line |")
    print("|---|---|---|---|---|---|---|---|")
    for rows in args.rows:
        folder = Path(args.tmp) / f"hvbatch-prompts-scale-{rows}"
        folder.mkdir(parents=True, exist_ok=True)
        prompts = folder / "prompts.parquet"
        try:
            write_prompts(prompts, rows)
            size = f"{prompts.stat().st_size / 2**20:.0f} MiB"
            for mode in args.modes:
                run_dir = folder / f"run-{mode}"
                shutil.rmtree(run_dir, ignore_errors=True)
                cmd = [sys.executable, __file__, "--child", mode, str(prompts), str(run_dir)]
                done = subprocess.run(cmd, capture_output=True, text=True, check=False)
                if done.returncode:
                    print(done.stdout, done.stderr, file=sys.stderr)
                    raise SystemExit(f"{mode} on {rows:,} rows failed")
                result = json.loads(done.stdout.splitlines()[-1])
                per_row = result["peak_rss_mib"] * 2**20 / rows
                print(
                    f"| {rows:,} | {size} | {mode} | {result['seconds']:.1f} s | {result['cpu']:.1f} s | "
                    f"{result['peak_rss_mib']:,.0f} MiB | {per_row:.0f} | {' '.join(result['first'])} |",
                    flush=True,
                )
                shutil.rmtree(run_dir, ignore_errors=True)
        finally:
            if not args.keep:
                shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
