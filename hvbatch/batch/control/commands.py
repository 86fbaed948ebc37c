"""`hvbatch submit | status | manifest | retry | cancel | sbatch | run-shard`: the login-node side."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pwd
import stat
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv

from hvbatch.batch import ledger
from hvbatch.batch.attempt import EXIT_DISK_FULL
from hvbatch.batch.control import recovery
from hvbatch.batch.control.calibration import (
    configured_rate,
    gpu_seconds_per_cost,
    job_plan,
)
from hvbatch.batch.control.frozen import ShardTables, StreamedShards, write_frozen_inputs
from hvbatch.batch.control.preflight import RetryOverrides, check_model_files
from hvbatch.batch.control.progress import wait_with_progress, watch_run
from hvbatch.batch.control.prompt_ids import PromptFileError
from hvbatch.batch.control.prompt_images import ImageOptions, ImageStaging, dry_run_lines
from hvbatch.batch.control.prompt_index import PromptIndex, index_prompts
from hvbatch.batch.control.shards import ShardLayout, max_shard_cost_for_walltime, shard_videos
from hvbatch.batch.control.status import format_status, run_status, video_table
from hvbatch.batch.executors import sbatch as sbatch_jobs
from hvbatch.batch.executors.base import latest_records
from hvbatch.batch.executors.registry import choose_executor, executor_for
from hvbatch.batch.files import (
    PRIVATE_DIR_MODE,
    is_disk_full,
    make_dirs,
    named_by_user,
    write_atomic,
    write_json_atomic,
    write_json_exclusive,
    write_parquet_atomic,
    write_text_atomic,
)
from hvbatch.batch.rundir import RunDir
from hvbatch.config import Config, load_config, save_config
from hvbatch.models.family import family_of, model_folder_problem
from hvbatch.parallel.planner import ParallelPlan, format_plan
from hvbatch.sampling.estimates import saving_line
from hvbatch.text import count, printable, printable_lines

CLAIM_NAME = ".hvbatch-claim"
LARGE_BATCH_VIDEOS = 100_000  # a dry run above either size warns
LARGE_BATCH_GPU_HOURS = 10_000.0


def max_shard_cost(config: Config, plan: ParallelPlan) -> float:
    b = config.batch
    # A group of `plan.group` GPUs (cfg x ulysses x ring) makes one video that much faster.
    return max_shard_cost_for_walltime(
        config.slurm.time_min, gpu_seconds_per_cost(config) / plan.group, plan.dp, b.reserve_s
    )


def plan_shards(config: Config, videos: pa.Table, plan: ParallelPlan) -> list[pa.Table]:
    limit = max_shard_cost(config, plan)
    return shard_videos(videos, max_shard_cost=limit, min_shards=config.batch.min_shards)


def plan_layout(config: Config, index: PromptIndex, plan: ParallelPlan) -> ShardLayout:
    """`plan_shards` for a streamed prompt file: the same shards, as arrays."""
    return index.layout(max_shard_cost=max_shard_cost(config, plan), min_shards=config.batch.min_shards)


def _print_dry_run(config: Config, index: PromptIndex, plan: ParallelPlan, layout: ShardLayout) -> None:
    num_videos = index.num_videos
    gpu_hours = index.total_cost * gpu_seconds_per_cost(config) / 3600.0
    print(
        f"{count(num_videos, 'video')} in {count(layout.num_shards, 'shard')} "
        f"(one {config.slurm.nodes}-node job each)"
    )
    print(format_plan(plan))
    rate = configured_rate(config)
    branches = " x 2 CFG branches" if config.sampling.cfg_scale > 1.0 else ""
    print(
        f"estimated GPU-hours: {gpu_hours:,.1f} ({rate.seconds_per_cost_unit:.3g} GPU-s per token-step, "
        f"{rate.source}{branches})"
    )
    if num_videos > LARGE_BATCH_VIDEOS or gpu_hours > LARGE_BATCH_GPU_HOURS:
        print(
            f"warning: a very large batch ({num_videos:,} videos, {gpu_hours:,.0f} GPU-hours): check "
            "the prompts file (num_videos, height / width / num_frames columns) and the config's sampling "
            "sizes before submitting"
        )
    if config.sampling.cache != "none":
        thresholds, costs = zip(*sorted(index.cost_by_threshold.items()), strict=True)
        figures = family_of(config.model).step_cache
        print(saving_line(config.sampling.cache, gpu_hours, list(costs), list(thresholds), figures))
    summary = layout.summary()
    idle = idle_gpus_line(plan, [int(entry["num_videos"]) for entry in summary])
    if idle:
        print(idle)
    for entry in summary[:20]:
        print(f"  shard {entry['index']:>5}: {entry['num_videos']} videos, cost {entry['cost']:.3g}")
    for entry in summary:
        if entry["warning"]:
            print(f"warning: shard {entry['index']}: {entry['warning']}")
    if layout.num_shards > 20:
        print(f"  ... {layout.num_shards - 20} more shards")


def idle_gpus_line(plan: ParallelPlan, videos_per_shard: list[int]) -> str | None:
    """Says how many of a job's GPUs have no video when a shard holds fewer videos than dp groups."""
    short = [n for n in videos_per_shard if n < plan.dp]
    if not short:
        return None
    fewest = min(short)
    idle = (plan.dp - fewest) * plan.group
    jobs = "the job" if len(videos_per_shard) == 1 else f"{len(short)} of the {len(videos_per_shard)} jobs"
    return (
        f"idle GPUs: {idle} of {plan.world_size} GPUs idle in {jobs} (a shard of {fewest} "
        f"video{'s' if fewest != 1 else ''} fills {fewest} of the {plan.dp} groups of {plan.group} GPUs); "
        "fewer GPUs per job (slurm.nodes, slurm.gpus_per_node) or a larger parallel group "
        "(parallel.mode=latency) would use them"
    )


def _default_run_dir(prompts: Path) -> Path:
    return Path("runs") / f"{prompts.stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def check_run_dir_name(root: Path) -> None:
    """The run directory's path reaches job scripts: no line breaks or control characters."""
    text = str(root)
    if any(ord(ch) < 32 or 127 <= ord(ch) < 160 for ch in text):
        raise ValueError(
            f"--run-dir {text!r} contains a line break or control character; choose another name"
        )


def check_run_dir_owner(root: Path) -> None:
    """An existing run directory must be the user's alone: whoever else owns or can write it could
    change `config.yaml` (whose `slurm.setup` lines later submissions run) or the pickles the jobs
    execute."""
    info = root.stat()
    if info.st_uid != os.geteuid():
        raise ValueError(
            f"--run-dir {root} belongs to {_user_name(info.st_uid)}, not to you "
            f"({_user_name(os.geteuid())}): its owner could change the run's config and the code its "
            "jobs run. Choose a directory you own (a new path is created for you), or have it "
            "chowned to you first"
        )
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        who = " and ".join(
            w for w, bit in (("group", stat.S_IWGRP), ("others", stat.S_IWOTH)) if info.st_mode & bit
        )
        raise ValueError(
            f"--run-dir {root} is writable by {who} (mode {stat.S_IMODE(info.st_mode):04o}): anyone who can "
            "write it could change the run's config and the code its jobs run. Choose a new "
            f"--run-dir (it is created private), or `chmod go-w {root}` first"
        )


def _user_name(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def claim_run_dir(run: RunDir) -> None:
    """Take the run directory atomically: a second submit (even a concurrent one) is refused."""
    check_run_dir_name(run.root)
    if run.exists():
        raise ValueError(
            f"{run.root} already holds a run: use `hvbatch retry {run.root}` or another --run-dir"
        )
    if run.root.exists() and not run.root.is_dir():
        raise ValueError(f"--run-dir {run.root} is a file, not a directory; choose another --run-dir")
    existed = run.root.is_dir()
    if existed:
        check_run_dir_owner(run.root)
    claim = run.root / CLAIM_NAME
    try:
        make_dirs(run.root, PRIVATE_DIR_MODE)
        claimed = write_json_exclusive(claim, {"pid": os.getpid(), "at": time.time()})
    except OSError as err:
        raise ValueError(
            f"--run-dir {run.root} cannot be created or written ({err.strerror or err}); choose a "
            "--run-dir on a writable filesystem"
        ) from err
    if not claimed:
        raise ValueError(
            f"{run.root} is being created by another `hvbatch submit` (or one that stopped half-way: "
            "then remove the folder); choose another --run-dir"
        )
    others = [
        p
        for p in run.root.iterdir()
        if not p.name.startswith(CLAIM_NAME) and not p.name.startswith(f".{CLAIM_NAME}")
    ]
    if existed and others:
        claim.unlink()
        raise ValueError(f"--run-dir {run.root} is not empty and not a run; choose a new or empty directory")
    run.root.chmod(PRIVATE_DIR_MODE)  # submitit's pickles in here are code the jobs execute


def create_run(
    run: RunDir, config: Config, prompts: Path, shards: list[pa.Table] | StreamedShards, executor: str,
    images: ImageStaging | None = None,
) -> None:  # fmt: skip
    """Claim the run directory and write the run's frozen inputs (the input images first: `images`
    moved in), config and (last) `run.json`."""
    frozen = shards if isinstance(shards, StreamedShards) else ShardTables(shards)
    claim_run_dir(run)
    if images is not None:
        images.adopt()
    write_frozen_inputs(run, frozen)
    save_config(config, run.root / "config.yaml")
    write_json_atomic(
        run.run_json,
        {
            "prompts": str(prompts.resolve()),
            "num_shards": frozen.num_shards,
            "num_videos": frozen.num_videos,
            "executor": executor,
            "created_at": time.time(),
        },
    )


def wait_for_run(
    run: RunDir, poll_s: float = 5.0, timeout_s: float | None = None, exit_grace_s: float = 120.0
) -> bool:
    """Poll until every shard is complete and its jobs have exited, or no job is alive (no
    progress shown); True when all shards are complete. See `progress.watch_run`."""
    return watch_run(run, None, poll_s, timeout_s, exit_grace_s)


def _wait_or_stop(run: RunDir) -> int:
    """`--wait` with progress and a summary; Ctrl-C stops local jobs (recorded `cancelled`) and
    leaves Slurm jobs running."""
    try:
        return 0 if wait_with_progress(run) else 1
    except KeyboardInterrupt:
        records = list(latest_records(run).values())
        complete = run.completed_shards()
        local = [r for r in records if r.executor == "local" and r.shard not in complete]
        if local:
            ledger.cancel(run, {r.job_id for r in local}, "Ctrl-C on hvbatch --wait")
            executor_for("local", run).cancel(local)
        others = sorted({r.job_id for r in records if r.executor != "local" and r.shard not in complete})
        message = f"stopped waiting for {run.root}"
        message += "; the local job was stopped (resume with `hvbatch retry`)" if local else ""
        message += (
            f"; Slurm jobs {', '.join(others)} keep running (`hvbatch cancel` stops them)" if others else ""
        )
        print(message, file=sys.stderr)
        return 130


def _check_row_steps(config: Config, index: PromptIndex) -> None:
    """Refuse rows whose `num_inference_steps` the model cannot run (a distilled variant's fixed
    counts), as a prompt-file problem naming the rows, before anything is written."""
    family = family_of(config.model)

    def problems_for(steps: int) -> list[str]:
        sampling = dataclasses.replace(config.sampling, num_inference_steps=steps)
        found = family.sampling_problems(config.model, sampling)
        return [p.removeprefix("sampling.num_inference_steps: ") for p in found]

    if problems := index.step_problems(problems_for):
        raise PromptFileError(index.scan.path, problems)


def dry_run(config: Config, prompts: str | Path) -> int:
    """Print shards, layout, memory and GPU-hour estimates for a prompts file; submit nothing."""
    options = ImageOptions.for_model(config.model)
    index = index_prompts(Path(prompts), config.sampling, family_of(config.model).geometry, options)
    _check_row_steps(config, index)
    plan = job_plan(config, index.largest)
    _print_dry_run(config, index, plan, plan_layout(config, index, plan))
    if index.scan.images is not None:
        te_bytes = 4 if config.model.text_encoder_dtype == "float32" else 2
        geometry = family_of(config.model).geometry
        print("\n".join(dry_run_lines(index.scan.images, geometry, index.largest, te_bytes)))
    return 0


def run_submit(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)
    folder_problem = model_folder_problem(config.model)  # before anything is written or submitted
    if folder_problem is not None:
        raise ValueError(folder_problem)
    if args.dry_run:
        return dry_run(config, args.prompts)
    prompts = Path(args.prompts)
    run = RunDir(args.run_dir or _default_run_dir(prompts))
    check_run_dir_name(run.root)
    with ImageStaging(run.root) as images:  # input images frozen as they are checked; gone on error
        options = ImageOptions.for_model(config.model, images.store)
        geometry = family_of(config.model).geometry
        index = index_prompts(prompts, config.sampling, geometry, options)  # validates all first
        _check_row_steps(config, index)
        choice = choose_executor(args.executor or config.batch.executor, _executor_source(args))
        if not args.no_weight_check:
            check_model_files(config, "submitted")
        kind = choice.kind
        plan = job_plan(config, index.largest)
        layout = plan_layout(config, index, plan)
        create_run(run, config, prompts, StreamedShards(index, layout), kind, images)
    print(choice.line(), file=sys.stderr, flush=True)
    records = executor_for(kind, run, config).submit(list(range(layout.num_shards)))
    job_ids = sorted({r.job_id for r in records})
    print(
        f"run {run.root}: {count(index.num_videos, 'video')}, {count(layout.num_shards, 'shard')}, "
        f"{kind} {'job' if len(job_ids) == 1 else 'jobs'} {', '.join(job_ids)}"
    )
    return _wait_or_stop(run) if args.wait else 0


def _executor_source(args: argparse.Namespace) -> str:
    return "--executor" if args.executor else "batch.executor"


def run_status_command(args: argparse.Namespace) -> int:
    run = RunDir(args.run_dir).require()
    status = run_status(run)
    text = status.to_json() if args.json else format_status(run, status)
    print(printable_lines(text))
    return 0


def write_manifest_file(path: Path, table: pa.Table) -> None:
    """`manifest --out`: Parquet or CSV by the file's suffix, written atomically."""
    path = named_by_user(path)
    suffix = path.suffix.lower()
    if suffix not in (".parquet", ".csv"):
        raise ValueError(f"--out {path}: the manifest is written as .parquet or .csv; name the file so")
    if suffix == ".parquet":
        write_parquet_atomic(path, table)
        return
    write_atomic(path, lambda handle: pa_csv.write_csv(table, handle))


def run_manifest(args: argparse.Namespace) -> int:
    table = video_table(RunDir(args.run_dir).require())
    if args.failed:
        table = table.filter(pc.equal(table["status"], "failed"))
    if args.out:
        write_manifest_file(Path(args.out), table)
        print(f"wrote {printable(args.out)} ({table.num_rows} rows)")
    elif args.json:
        print(json.dumps(table.to_pylist(), indent=2))
    else:
        print(format_manifest(table))
    return 0


def format_manifest(table: pa.Table) -> str:
    """`manifest`'s plain text: a header, then per video its status, attempts, size, id (quoted as
    a Python string when it holds spaces or quotes, so every line splits alike) and its path or
    error."""
    lines = [f"{'status':<8} {'tries':>5}  {'WxHxframes':<14} {'video_id':<24} path or error"]
    for row in table.to_pylist():
        size = f"{row['width']}x{row['height']}x{row['num_frames']}"
        video_id = printable(row["video_id"])
        if not video_id or any(ch.isspace() or ch in "'\"\\" for ch in video_id):
            video_id = printable(repr(row["video_id"]))
        where = printable(row["path"] or row["error"] or "")
        lines.append(f"{row['status']:<8} {row['attempts']:>5}  {size:<14} {video_id:<24} {where}")
    return "\n".join(lines)


def run_retry(args: argparse.Namespace) -> int:
    run = RunDir(args.run_dir).require()
    if args.repair:
        for line in recovery.repair_run(run):
            print(line)
    overrides = RetryOverrides.check(run, args.overrides)  # refused before anything is written
    outcome = recovery.retry_shards(
        run, args.executor, wait=args.wait, overrides=overrides, check_weights=not args.no_weight_check
    )
    if outcome.held:
        return 1  # recovery said which shards and why
    if args.wait and (outcome.submitted or outcome.running):
        return _wait_or_stop(run)
    return 0


def run_cancel(args: argparse.Namespace) -> int:
    return recovery.cancel_run(RunDir(args.run_dir).require())


def run_sbatch(args: argparse.Namespace) -> int:
    run = RunDir(args.run_dir).require()
    try:
        shards = [int(x) for x in args.shards.split(",")] if args.shards else recovery.unfinished_shards(run)
    except ValueError as err:
        raise ValueError(
            f"--shards {args.shards!r}: give comma-separated shard indices, e.g. --shards 0,3"
        ) from err
    text = sbatch_jobs.render(run, args.template, shards)
    (run.root / "logs").mkdir(exist_ok=True)
    if args.out:
        write_text_atomic(named_by_user(Path(args.out)), text)
        print(f"wrote {args.out}: submit it with `sbatch {args.out}`")
    else:
        print(text, end="")
    return 0


def run_shard_command(args: argparse.Namespace) -> int:
    try:
        sbatch_jobs.run_shard(args.run_dir, [int(shard) for shard in args.shards])
    except Exception as err:
        if is_disk_full(err):  # logged by the job; its error record may not have fit
            return EXIT_DISK_FULL
        raise
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
    submit.add_argument(
        "--wait",
        action="store_true",
        help="wait until every shard is complete (Ctrl-C: local jobs stop, Slurm jobs keep running)",
    )
    submit.add_argument(
        "--no-weight-check",
        action="store_true",
        help="do not check the model's files here first (for weights this machine cannot see)",
    )
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
    group.add_argument("--out", help="write the merged manifest to this .parquet or .csv file")
    manifest.set_defaults(func=run_manifest)
    retry = commands.add_parser("retry", help="resubmit the failed or unfinished shards of a run")
    retry.add_argument("run_dir")
    retry.add_argument("--executor", choices=["auto", "slurm", "local"])
    retry.add_argument("--wait", action="store_true")
    retry.add_argument(
        "--repair", action="store_true", help="first move corrupt markers, records and parts to corrupt/"
    )
    retry.add_argument(
        "--no-weight-check",
        action="store_true",
        help="do not check the model's files here first (for weights this machine cannot see)",
    )
    retry.add_argument(
        "overrides",
        nargs="*",
        help="key=value overrides that do not change a video (weight paths, slurm.partition, "
        "slurm.time_min, batch.executor, retry.*), saved in the run's config.yaml",
    )
    retry.set_defaults(func=run_retry)
    cancel = commands.add_parser("cancel", help="cancel a run's queued and running jobs")
    cancel.add_argument("run_dir")
    cancel.set_defaults(func=run_cancel)
    sbatch = commands.add_parser("sbatch", help="render the run's jobs as a plain sbatch script")
    sbatch.add_argument("run_dir")
    sbatch.add_argument(
        "--template", default="array", help=f"one of {', '.join(sbatch_jobs.TEMPLATES)} (default array)"
    )
    sbatch.add_argument("--shards", help="comma-separated shard indices (default: every unfinished shard)")
    sbatch.add_argument("--out", help="write the script here instead of printing it")
    sbatch.set_defaults(func=run_sbatch)
    shard = commands.add_parser("run-shard", help="run shards of a run on this rank (the sbatch entry point)")
    shard.add_argument("run_dir")
    shard.add_argument("shards", nargs="+", type=int)
    shard.set_defaults(func=run_shard_command)
