"""Time the batch control plane on a large prompt file: read + validate + expand, then shard.

    python benchmarks/control_plane.py [--rows 1000000] [--walltime-min 1440] [--explicit-ids]

Writes a Parquet file of `--rows` prompts (varied sizes, frame counts and steps, some nulls that
take the config defaults, 5% of rows asking for 2-4 videos) to a temporary folder, then times
`read_prompts` and `shard_videos` (shard cost from a walltime, as `hvbatch submit` sizes them) and
prints seconds and rows per second for each, and the shard balance.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from hvbatch.batch.control.prompts import read_prompts
from hvbatch.batch.control.shards import max_shard_cost_for_walltime, shard_summary, shard_videos
from hvbatch.config import SamplingConfig

WORDS = ("a", "red", "fox", "cat", "dog", "walks", "runs", "in", "the", "snow", "rain", "city")
WORDS += ("forest", "at", "night", "dawn", "slowly", "cinematic")


def write_prompts(path: Path, rows: int, explicit_ids: bool, seed: int = 0) -> None:
    """A prompt file with `rows` distinct prompts and varied per-row overrides."""
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(WORDS), size=(rows, 12))
    words = np.array(WORDS, dtype=object)
    prompts = [" ".join(w) + f" #{i}" for i, w in enumerate(words[picks])]
    nulls = lambda p: rng.random(rows) < p
    columns: dict[str, pa.Array] = {
        "prompt": pa.array(prompts, pa.string()),
        "height": pa.array(rng.choice([480, 544, 720, 960], rows), mask=nulls(0.1)),
        "width": pa.array(rng.choice([848, 960, 1280], rows), mask=nulls(0.1)),
        "num_frames": pa.array(rng.choice([33, 65, 97, 129], rows), mask=nulls(0.1)),
        "num_inference_steps": pa.array(rng.choice([30, 40, 50], rows).astype(float), mask=nulls(0.1)),
        "seed": pa.array(rng.integers(0, 2**31, rows), mask=nulls(0.2)),
        "guidance_scale": pa.array(rng.choice([5.0, 6.0, 7.5], rows), mask=nulls(0.5)),
        "num_videos": pa.array(np.where(nulls(0.05), rng.integers(2, 5, rows), 1), pa.int32()),
        "notes": pa.array(np.full(rows, "extra column, ignored")),
    }
    if explicit_ids:
        columns["id"] = pa.array(np.arange(rows) * 7 + 1000)
    pq.write_table(pa.table(columns), path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--walltime-min", type=float, default=24 * 60)
    parser.add_argument("--explicit-ids", action="store_true", help="an integer id column (else hashed ids)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "prompts.parquet"
        start = time.perf_counter()
        write_prompts(path, args.rows, args.explicit_ids)
        size_mib = path.stat().st_size / 2**20
        print(f"wrote {args.rows:,} rows ({size_mib:.0f} MiB) in {time.perf_counter() - start:.1f} s")

        start = time.perf_counter()
        videos = read_prompts(path, SamplingConfig())
        read_s = time.perf_counter() - start
    # 720x1280x129 at 50 steps (5.94M cost units) in ~30 min on one 8-GPU dp group
    max_cost = max_shard_cost_for_walltime(args.walltime_min, 1800 / 5.94e6, 1, reserve_s=900)
    start = time.perf_counter()
    shards = shard_videos(videos, max_shard_cost=max_cost)
    shard_s = time.perf_counter() - start
    costs = [s["cost"] for s in shard_summary(shards)]
    total = read_s + shard_s
    n_videos = videos.num_rows
    print(f"read_prompts: {read_s:6.2f} s  {args.rows / read_s:12,.0f} rows/s    -> {n_videos:,} videos")
    print(f"shard_videos: {shard_s:6.2f} s  {n_videos / shard_s:12,.0f} videos/s  -> {len(shards):,} shards")
    print(f"total:        {total:6.2f} s  {args.rows / total:12,.0f} rows/s")
    balance = max(costs) / min(costs)
    print(f"shards: max cost {max(costs):,.0f} of {max_cost:,.0f} allowed; max/min {balance:.3f}")


if __name__ == "__main__":
    main()
