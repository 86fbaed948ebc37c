"""`hvbatch submit | status | manifest | retry | cancel`."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from hvbatch.batch.attempts import mark_cancelled, reconcile_stale_attempts
from hvbatch.batch.launcher import resolve_executor, submit_shards
from hvbatch.batch.prompts import read_prompts
from hvbatch.batch.rundir import RunDir, write_json_atomic, write_parquet_atomic
from hvbatch.batch.shards import max_shard_cost_for_walltime, shard_summary, shard_videos
from hvbatch.batch.status import format_status, latest_jobs, live_states, run_status, video_table
from hvbatch.config import Config, load_config, save_config
from hvbatch.parallel.planner import ParallelPlan, format_plan
from hvbatch.plan_cli import plan_for_config


def job_plan(config: Config, videos: pa.Table) -> ParallelPlan:
    """The layout a shard job will use: planned for one job's GPUs and the largest video."""
    from hvbatch.batch.job_support import sampling_for

    s = config.slurm
    job = dataclasses.replace(
        config,
        parallel=dataclasses.replace(config.parallel, gpus_per_node=s.tasks_per_node, num_nodes=s.nodes),
    )
    largest = pc.index(videos["cost"], pc.max(videos["cost"])).as_py()
    return plan_for_config(job, sampling_for(videos.slice(largest, 1).to_pylist()[0], config.sampling))


def _shards_for(config: Config, videos: pa.Table, plan: ParallelPlan) -> list[pa.Table]:
    b = config.batch
    max_cost = max_shard_cost_for_walltime(
        config.slurm.time_min, b.seconds_per_cost_unit / plan.sp, plan.dp, b.reserve_s
    )
    return shard_videos(videos, max_shard_cost=max_cost, min_shards=b.min_shards)


def _print_dry_run(config: Config, videos: pa.Table, plan: ParallelPlan, shards: list[pa.Table]) -> None:
    total_cost = float(pc.sum(videos["cost"]).as_py())
    gpu_hours = total_cost * config.batch.seconds_per_cost_unit / 3600.0
    print(f"{videos.num_rows} videos in {len(shards)} shards (one {config.slurm.nodes}-node job each)")
    print(format_plan(plan))
    print(
        f"estimated GPU-hours: {gpu_hours:,.1f} "
        f"(batch.seconds_per_cost_unit={config.batch.seconds_per_cost_unit:g})"
    )
    summary = shard_summary(shards)
    for entry in summary[:20]:
        print(f"  shard {entry['index']:>5}: {entry['num_videos']} videos, cost {entry['cost']:.3g}")
    for entry in summary:
        if entry["warning"]:
            print(f"warning: shard {entry['index']}: {entry['warning']}")
    if len(shards) > 20:
        print(f"  ... {len(shards) - 20} more shards")


def _default_run_dir(prompts: Path) -> Path:
    return Path("runs") / f"{prompts.stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def create_run(run: RunDir, config: Config, prompts: Path, shards: list[pa.Table], executor: str) -> None:
    if run.exists():
        raise ValueError(
            f"{run.root} already holds a run: use `hvbatch retry {run.root}` or another --run-dir"
        )
    run.root.mkdir(parents=True, exist_ok=True, mode=0o700)
    run.root.chmod(0o700)  # submitit's pickles in here are code the jobs execute
    for index, shard in enumerate(shards):
        write_parquet_atomic(run.shard_path(index), shard)
    write_parquet_atomic(
        run.videos_path,
        pa.concat_tables(
            shard.select(["video_id", "prompt", "seed"]).append_column(
                "shard", pa.array([index] * shard.num_rows, pa.int32())
            )
            for index, shard in enumerate(shards)
        ),
    )
    save_config(config, run.root / "config.yaml")
    write_json_atomic(
        run.run_json,
        {
            "prompts": str(prompts.resolve()),
            "num_shards": len(shards),
            "num_videos": sum(s.num_rows for s in shards),
            "executor": executor,
            "created_at": time.time(),
        },
    )


def wait_for_run(
    run: RunDir, poll_s: float = 5.0, timeout_s: float | None = None, exit_grace_s: float = 120.0
) -> bool:
    """Poll until every shard is complete and its jobs have exited, or no job is alive.

    True when all shards are complete. Jobs get `exit_grace_s` after the last marker to finish
    writing metrics and exit, so that a `retry` right after `--wait` does not find them alive.
    """
    start = time.time()
    complete_since: float | None = None
    while True:
        complete = len(run.completed_shards()) == run.num_shards()
        live = live_states(list(latest_jobs(run).values()))
        if complete:
            complete_since = complete_since or time.time()
            if not live or time.time() - complete_since > exit_grace_s:
                return True
        elif not live and time.time() - start > poll_s:
            return len(run.completed_shards()) == run.num_shards()
        if timeout_s is not None and time.time() - start > timeout_s:
            return complete
        time.sleep(min(poll_s, 1.0) if complete else poll_s)


def dry_run(config: Config, prompts: str | Path) -> int:
    """Print shards, layout, memory and GPU-hour estimates for a prompts file; submit nothing."""
    videos = read_prompts(Path(prompts), config.sampling)
    plan = job_plan(config, videos)
    _print_dry_run(config, videos, plan, _shards_for(config, videos, plan))
    return 0


def run_submit(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)
    if args.dry_run:
        return dry_run(config, args.prompts)
    prompts = Path(args.prompts)
    videos = read_prompts(prompts, config.sampling)  # validates everything before anything is written
    kind = resolve_executor(args.executor or config.batch.executor)
    plan = job_plan(config, videos)
    shards = _shards_for(config, videos, plan)
    run = RunDir(args.run_dir or _default_run_dir(prompts))
    create_run(run, config, prompts, shards, kind)
    records = submit_shards(run, config, list(range(len(shards))), kind)
    print(
        f"run {run.root}: {videos.num_rows} videos, {len(shards)} shards, {kind} jobs "
        f"{', '.join(sorted({r['job_id'] for r in records}))}"
    )
    if args.wait:
        return 0 if wait_for_run(run) else 1
    return 0


def run_status_command(args: argparse.Namespace) -> int:
    run = RunDir(args.run_dir)
    status = run_status(run)
    print(json.dumps(status.to_dict(), indent=2) if args.json else format_status(run, status))
    return 0


def run_manifest(args: argparse.Namespace) -> int:
    table = video_table(RunDir(args.run_dir))
    if args.failed:
        table = table.filter(pc.equal(table["status"], "failed"))
    if args.out:
        write_parquet_atomic(Path(args.out), table)
        print(f"wrote {args.out} ({table.num_rows} rows)")
    elif args.json:
        print(json.dumps(table.to_pylist(), indent=2))
    else:
        for row in table.to_pylist():
            print(
                f"{row['status']:<8} {row['attempts']}  {row['video_id']}  "
                f"{row['path'] or row['error'] or ''}"
            )
    return 0


def unfinished_shards(run: RunDir) -> list[int]:
    """Shards without a completion marker, or whose marker counts failed videos."""
    shards = []
    for shard in range(run.num_shards()):
        marker = run.done_marker(shard)
        if not marker.is_file() or json.loads(marker.read_text()).get("failed", 0):
            shards.append(shard)
    return shards


def run_retry(args: argparse.Namespace) -> int:
    run = RunDir(args.run_dir)
    config = load_config(run.root / "config.yaml")
    jobs = latest_jobs(run)
    live = live_states(list(jobs.values()))
    unfinished = unfinished_shards(run)
    todo = [s for s in unfinished if jobs.get(s, {}).get("job_id") not in live]
    busy = sorted(set(unfinished) - set(todo))
    if busy:
        print(f"run {run.root}: shards {busy} still have a queued or running job; retry them once it ends")
    if not todo:
        print(f"run {run.root}: nothing to retry (every shard is complete or still queued)")
        return 0
    for shard in todo:
        reconcile_stale_attempts(run, shard, set(live), "")  # e.g. an attempt ended by scancel
        run.done_marker(shard).unlink(missing_ok=True)  # a shard with failed videos runs them again
    kind = resolve_executor(args.executor or run.read_run()["executor"])
    records = submit_shards(run, config, todo, kind)
    print(f"run {run.root}: resubmitted shards {todo} as {', '.join(sorted({r['job_id'] for r in records}))}")
    if args.wait:
        return 0 if wait_for_run(run) else 1
    return 0


def _children(pid: int) -> list[int]:
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return children


def kill_process_tree(pid: int) -> None:
    """SIGKILL a local job's controller and every process below it (its ranks)."""
    tree, frontier = [pid], [pid]
    while frontier:
        frontier = [child for parent in frontier for child in _children(parent)]
        tree += frontier
    for member in reversed(tree):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(member, signal.SIGKILL)


def run_cancel(args: argparse.Namespace) -> int:
    run = RunDir(args.run_dir)
    records = list(latest_jobs(run).values())
    live = live_states(records)
    slurm = sorted({r["job_id"] for r in records if r["executor"] == "slurm" and r["job_id"] in live})
    local = sorted({r["job_id"] for r in records if r["executor"] == "local" and r["job_id"] in live})
    # First, so that a job script finishing after its srun is killed sees why and does not retry.
    mark_cancelled(run, set(slurm) | set(local))
    if slurm:
        subprocess.run(["scancel", *slurm], check=False, timeout=60)
    for pid in local:
        kill_process_tree(int(pid))
    print(f"run {run.root}: cancelled {len(slurm) + len(local)} jobs")
    return 0


def add_batch_parsers(commands: argparse._SubParsersAction) -> None:
    submit = commands.add_parser("submit", help="submit a Parquet file of prompts as shard jobs")
    submit.add_argument("prompts", help="Parquet file with a `prompt` column (see README for the others)")
    submit.add_argument("--config", help="a YAML file merged over the defaults and the preset")
    submit.add_argument("--run-dir", help="where the run lives (default runs/<prompts>-<time>)")
    submit.add_argument(
        "--executor", choices=["auto", "slurm", "local"], help="default: batch.executor (auto)"
    )
    submit.add_argument(
        "--dry-run", action="store_true", help="print shards, layout and estimates; submit nothing"
    )
    submit.add_argument("--wait", action="store_true", help="wait until every shard is complete")
    submit.add_argument(
        "overrides", nargs="*", help="key=value overrides, e.g. model=tiny slurm.partition=gpu"
    )
    submit.set_defaults(func=run_submit)
    status = commands.add_parser("status", help="counts, rate, ETA and jobs of a run")
    status.add_argument("run_dir")
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=run_status_command)
    manifest = commands.add_parser("manifest", help="one row per video of a run")
    manifest.add_argument("run_dir")
    manifest.add_argument("--failed", action="store_true", help="only failed videos")
    group = manifest.add_mutually_exclusive_group()
    group.add_argument("--json", action="store_true")
    group.add_argument("--out", help="write the merged manifest to this .parquet file")
    manifest.set_defaults(func=run_manifest)
    retry = commands.add_parser("retry", help="resubmit the failed or unfinished shards of a run")
    retry.add_argument("run_dir")
    retry.add_argument("--executor", choices=["auto", "slurm", "local"])
    retry.add_argument("--wait", action="store_true")
    retry.set_defaults(func=run_retry)
    cancel = commands.add_parser("cancel", help="cancel a run's queued and running jobs")
    cancel.add_argument("run_dir")
    cancel.set_defaults(func=run_cancel)
