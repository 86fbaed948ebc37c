"""Videos per hour of the bundled tiny example on the local executor, each issue-12 feature off and on.

    python3 benchmarks/throughput_cpu.py [--cases base,overlap,offload,cache] [--repeats 1]
        [--thresholds 0.05,0.1,0.15] [--cache-mode teacache] [--keep DIR] [override=value ...]

Every case runs `hvbatch submit examples/prompts.parquet --config configs/examples/tiny-batch.yaml
--executor local --wait` into a fresh run directory with the features set as below (extra
`key=value` arguments go to every run; with `--repeats N` the cases run round-robin N times and
the median is shown, so that load changes on a shared machine hit every case alike), then reads
the run's own files:

- videos/hour: done videos over the shards' summed `wall_seconds` (the local job runs its shards one
  after another; model loading and process start are outside it), and end to end (submit to done);
- `overlap`: `batch.overlap_writes` off (base) and on; the share of the mp4 encode time the job did not
  wait for, from the leaders' `mp4 writes:` log lines;
- `offload`: `model.text_encoder_offload` keep (base) and cpu; the measured peak memory per rank
  (`peak_memory_bytes`: ru_maxrss on a CPU, where moving the encoders is a no-op) and, for the real
  model on one 80 GB GPU, what the planner's memory model assumes with and without it;
- `cache`: `sampling.cache` none (base) and at each threshold; the denoising steps computed and the
  relative latent difference `|x - x_ref| / |x_ref|` against the uncached latents, measured in this
  process on the example's prompts (the batch job does not keep latents).
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch

from hvbatch.batch.rundir import RunDir
from hvbatch.cli import main as hvbatch_main
from hvbatch.config import SamplingConfig, load_config
from hvbatch.parallel.plan import plan_for_config
from hvbatch.pipeline import Pipeline

REPO = Path(__file__).resolve().parents[1]
PROMPTS = REPO / "examples" / "prompts.parquet"
CONFIG = REPO / "configs" / "examples" / "tiny-batch.yaml"
BASE = ["batch.overlap_writes=false", "model.text_encoder_offload=keep"]
WRITES = re.compile(r"mp4 writes: ([\d.]+) s writing, ([\d.]+) s waited for")


def has_step_cache() -> bool:
    return "cache" in {f.name for f in dataclasses.fields(SamplingConfig)}


def run_case(name: str, overrides: list[str], keep: Path | None) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix=f"throughput-{name}-", dir=keep))
    run_dir = root / "run"
    argv = ["submit", str(PROMPTS), "--config", str(CONFIG), "--executor", "local", "--run-dir", str(run_dir)]
    start = time.time()
    code = hvbatch_main([*argv, *overrides, "--wait"])
    end_to_end = time.time() - start
    run = RunDir(run_dir)
    done = sum(1 for r in run.manifest_rows().to_pylist() if r["status"] == "done")
    metrics = [r for r in run.metrics_rows() if r["exit_reason"] == "completed"]
    wall = sum(r["wall_seconds"] for r in metrics)
    peak = max((max(r["peak_memory_bytes"] or [0]) for r in metrics), default=0)
    writing = waited = 0.0
    for log in run_dir.rglob("*"):
        if log.is_file() and log.suffix in (".out", ".err", ".log"):
            for match in WRITES.finditer(log.read_text(errors="replace")):
                writing, waited = writing + float(match[1]), waited + float(match[2])
    if keep is None:
        shutil.rmtree(root, ignore_errors=True)
    return {
        "case": name,
        "exit": code,
        "done": done,
        "videos_per_hour": 3600 * done / wall if wall else 0.0,
        "end_to_end_per_hour": 3600 * done / end_to_end,
        "peak_rank_mib": peak / 2**20,
        "write_s": writing,
        "hidden": max(0.0, 1 - waited / writing) if writing else None,
    }


def planner_peaks() -> list[str]:
    """Per-GPU estimates of the real 720p model on one 80 GB GPU, encoders resident vs offloaded."""
    lines = []
    for cfg in (1.0, 6.0):
        for offload in ("keep", "cpu"):
            overrides = [f"sampling.cfg_scale={cfg}", "slurm.gpus_per_node=1"]
            config = load_config(overrides=[*overrides, f"model.text_encoder_offload={offload}"])
            try:
                plan = plan_for_config(config)
                text = f"{plan.memory.total_gib:.1f} GiB (fits)"
            except ValueError as err:
                found = re.search(r"estimate is ([\d.]+) GiB", str(err))
                text = f"{found[1] if found else '?'} GiB (does not fit)"
            lines.append(f"| 720p x 129, cfg_scale {cfg:g} | {offload} | {text} |")
    return lines


def cache_quality(mode: str, thresholds: list[float]) -> list[str]:
    """Steps computed and relative latent difference to the uncached latents, per threshold."""
    config = load_config(CONFIG, ["device=cpu"])
    pipeline = Pipeline.load(config)
    rows = pq.read_table(PROMPTS).to_pylist()
    keys = ("height", "width", "num_frames", "seed")
    samplings = [
        dataclasses.replace(config.sampling, **{k: r[k] for k in keys if r.get(k) is not None}) for r in rows
    ]
    reference = [
        pipeline.generate(r["prompt"], s, decode=False).latents for r, s in zip(rows, samplings, strict=True)
    ]
    lines = []
    for threshold in thresholds:
        computed, differences = [], []
        for row, sampling, ref in zip(rows, samplings, reference, strict=True):
            cached = dataclasses.replace(sampling, cache=mode, cache_threshold=threshold)
            video = pipeline.generate(row["prompt"], cached, decode=False)
            computed.append(getattr(video, "steps_computed", None) or sampling.num_inference_steps)
            differences.append(float((video.latents - ref).norm() / ref.norm()))
        steps = samplings[0].num_inference_steps
        mean_steps = sum(computed) / len(computed)
        lines.append(
            f"| {mode} {threshold:g} | {mean_steps:.2f} of {steps} | "
            f"{sum(differences) / len(differences):.4f} (max {max(differences):.4f}) |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", default="base,overlap,offload,cache")
    parser.add_argument("--thresholds", default="0.05,0.1,0.15")
    parser.add_argument("--cache-mode", default="teacache")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--keep", type=Path, help="keep the run directories under DIR")
    parser.add_argument("overrides", nargs="*", help="key=value for every run (e.g. slurm.tasks_per_node=2)")
    args = parser.parse_args()
    cases = args.cases.split(",")
    thresholds = [float(t) for t in args.thresholds.split(",")]
    torch.set_num_threads(max(1, torch.get_num_threads()))
    runs: list[tuple[str, list[str]]] = [("all off", BASE)]
    if "overlap" in cases:
        runs.append(("overlapped mp4 writing", [*BASE, "batch.overlap_writes=true"]))
    if "offload" in cases:
        runs.append(("encoders freed", [*BASE, "model.text_encoder_offload=cpu"]))
    cache_note = None
    if "cache" in cases and has_step_cache():
        for t in thresholds:
            runs.append((f"cache {args.cache_mode} {t:g}", [*BASE, f"sampling.cache={args.cache_mode}",
                                                            f"sampling.cache_threshold={t}"]))  # fmt: skip
    elif "cache" in cases:
        cache_note = "sampling.cache is not in this version's config: the step cache has not landed; skipped"
    print("| case | videos/h (shard wall) | videos/h (end to end) | peak RSS per rank | mp4 encode hidden |")
    print("|---|---|---|---|---|")
    results: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in runs}
    for _ in range(args.repeats):
        for name, overrides in runs:
            results[name].append(run_case(name.replace(" ", "-"), [*overrides, *args.overrides], args.keep))
    for name, repeats in results.items():
        r = {k: statistics.median(x[k] for x in repeats) for k in ("videos_per_hour", "end_to_end_per_hour")}
        peak = max(x["peak_rank_mib"] for x in repeats)
        shares = [x["hidden"] for x in repeats if x["hidden"] is not None]
        written = statistics.median(x["write_s"] for x in repeats)
        hidden = f"{statistics.median(shares):.0%} of {written:.1f} s" if shares else "n/a"
        bad = [x for x in repeats if x["exit"] != 0 or x["done"] != 6]
        status = f" ({len(bad)} runs incomplete)" if bad else ""
        print(
            f"| {name}{status} | {r['videos_per_hour']:.0f} | {r['end_to_end_per_hour']:.0f} | "
            f"{peak:.0f} MiB | {hidden} |",
            flush=True,
        )
    if "offload" in cases:
        print("\n| real model, 1 x 80 GB | text encoders | planner's per-GPU estimate |\n|---|---|---|")
        print("\n".join(planner_peaks()))
    if cache_note:
        print(f"\nnote: {cache_note}")
    elif "cache" in cases:
        print("\n| cache | steps computed per video | relative latent difference |\n|---|---|---|")
        print("\n".join(cache_quality(args.cache_mode, thresholds)), flush=True)


if __name__ == "__main__":
    main()
