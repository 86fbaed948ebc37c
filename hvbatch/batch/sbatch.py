"""`hvbatch sbatch`: the run's jobs as plain sbatch scripts, and `hvbatch run-shard`, their entry point.

Every value that reaches the script is shell-quoted, whatever the config or the path contains.
`#SBATCH` lines are read by sbatch's own parser, not by the shell: a line break there would end the
comment and run the rest as a command, and a backslash escapes the next character even inside single
quotes, so values with control characters are refused and backslashes are doubled.
"""

from __future__ import annotations

import argparse
import importlib.resources
import json
import math
import os
import shlex
import signal
import string
import subprocess
import sys
from pathlib import Path

from hvbatch.batch.commands import unfinished_shards
from hvbatch.batch.rundir import RunDir
from hvbatch.config import Config, load_config

TEMPLATES = ("node", "multinode", "array")
EXIT_REQUEUED = 143


def _template_text(name: str) -> str:
    if name not in TEMPLATES:
        raise ValueError(f"--template {name!r}: use one of {', '.join(TEMPLATES)}")
    return (importlib.resources.files("hvbatch.slurm_templates") / f"{name}.sbatch").read_text()


def _sbatch_value(value: str, what: str) -> str:
    """`value` quoted for an `#SBATCH` line (sbatch reads it back exactly); refuse control characters."""
    if any(ord(ch) < 32 or 127 <= ord(ch) < 160 for ch in value):
        raise ValueError(f"{what} {value!r} contains a line break or control character")
    return shlex.quote(value).replace("\\", "\\\\")


def _log_dir(run: RunDir) -> str:
    log_dir = str(run.root / "logs")
    if "\\" in log_dir:  # sbatch drops backslashes from --output paths
        raise ValueError(f"{run.root}: sbatch cannot write job logs under a path with a backslash")
    return _sbatch_value(log_dir.replace("%", "%%"), "run directory")  # %% is a literal % in --output


def _sbatch_options(config: Config) -> str:
    s = config.slurm
    options = {"partition": s.partition, "account": s.account, "qos": s.qos, "constraint": s.constraint}
    if s.mem_gb:
        options["mem"] = f"{s.mem_gb}G"
    if s.cpus_per_task:
        options["cpus-per-task"] = str(s.cpus_per_task)
    options.update(s.additional_parameters)
    lines = []
    for key, value in options.items():
        if value is None:
            continue
        if not key.replace("-", "").replace("_", "").isalnum():
            raise ValueError(f"slurm option name {key!r} is not a valid sbatch option")
        flag = key.replace("_", "-")  # as submitit writes additional_parameters: mail_user -> --mail-user
        text = str(value)
        lines.append(f"#SBATCH --{flag}" + (f"={_sbatch_value(text, f'slurm option {key}')}" if text else ""))
    return "\n".join(lines)


def render(run: RunDir, template: str, shards: list[int]) -> str:
    """The sbatch script for `shards` of `run` from one of the `slurm/` templates."""
    config = load_config(run.root / "config.yaml")
    if not shards:  # an empty --array=%N would be read as --array=0
        raise ValueError(f"{run.root}: every shard is complete; nothing to render")
    num_shards = run.num_shards()
    bad = [shard for shard in shards if not 0 <= shard < num_shards]
    if bad or len(set(shards)) != len(shards):
        raise ValueError(f"--shards {shards}: give distinct shard indices in 0..{num_shards - 1}")
    s = config.slurm
    values = {
        "job_name": _sbatch_value(f"hvbatch-{run.root.name}", "run directory name"),
        "nodes": str(int(s.nodes)),
        "tasks_per_node": str(int(s.tasks_per_node)),
        "gpus_per_node": str(int(s.gpus_per_node)),
        "time_min": str(math.ceil(s.time_min)),
        "signal_delay_s": str(int(config.retry.signal_delay_s)),
        "log_dir": _log_dir(run),
        "extra_sbatch": _sbatch_options(config),
        "setup": "\n".join(s.setup),  # the user's own shell lines, verbatim by design
        "python": shlex.quote(sys.executable),
        "run_dir": shlex.quote(str(run.root)),
        "shards": " ".join(str(int(shard)) for shard in shards),
        "array": ",".join(str(int(shard)) for shard in shards) + f"%{int(s.array_parallelism)}",
    }
    return string.Template(_template_text(template)).substitute(values)


def run_sbatch(args: argparse.Namespace) -> int:
    run = RunDir(args.run_dir)
    shards = [int(x) for x in args.shards.split(",")] if args.shards else unfinished_shards(run)
    text = render(run, args.template, shards)
    # As `retry` does: a job skips a shard that has a marker, so reopen those with failed videos.
    for shard in shards:
        marker = run.done_marker(shard)
        if marker.is_file() and json.loads(marker.read_text()).get("failed", 0):
            marker.unlink()
    (run.root / "logs").mkdir(exist_ok=True)
    if args.out:
        Path(args.out).write_text(text)
        print(f"wrote {args.out}: submit it with `sbatch {args.out}`")
    else:
        print(text, end="")
    return 0


def run_shard_command(args: argparse.Namespace) -> int:
    """Under plain sbatch: on USR2 (walltime or preemption) rank 0 records why and requeues the job."""
    from hvbatch.batch.job import ShardJob

    run_dir = str(Path(args.run_dir).resolve())
    shards = [int(shard) for shard in args.shards]
    config = load_config(Path(run_dir) / "config.yaml")
    job = ShardJob(config.slurm.time_min, config.retry.signal_delay_s)

    def on_usr2(signum: int, frame: object) -> None:
        if os.environ.get("SLURM_PROCID", "0") != "0" or "SLURM_JOB_ID" not in os.environ:
            return
        job.checkpoint(run_dir, shards)  # records walltime / preempted for the running shard
        subprocess.run(["scontrol", "requeue", os.environ["SLURM_JOB_ID"]], check=False, timeout=60)
        sys.exit(EXIT_REQUEUED)

    signal.signal(signal.SIGUSR2, on_usr2)
    job(run_dir, shards)
    return 0


def add_sbatch_parsers(commands: argparse._SubParsersAction) -> None:
    sbatch = commands.add_parser("sbatch", help="render the run's jobs as a plain sbatch script")
    sbatch.add_argument("run_dir")
    sbatch.add_argument("--template", default="array", help=f"one of {', '.join(TEMPLATES)} (default array)")
    sbatch.add_argument("--shards", help="comma-separated shard indices (default: every unfinished shard)")
    sbatch.add_argument("--out", help="write the script here instead of printing it")
    sbatch.set_defaults(func=run_sbatch)
    shard = commands.add_parser("run-shard", help="run shards of a run on this rank (the sbatch entry point)")
    shard.add_argument("run_dir")
    shard.add_argument("shards", nargs="+", type=int)
    shard.set_defaults(func=run_shard_command)
