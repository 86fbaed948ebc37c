"""The `hvbatch doctor` subcommand: argument parsing and printing; the checks live in `hvbatch.doctor`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

DEFAULT_RUN_DIR = "runs"
"""Where `hvbatch submit` puts runs when --run-dir is not given (runs/<prompts>-<time>)."""


def run_doctor_command(args: argparse.Namespace) -> int:
    from hvbatch.config import load_config
    from hvbatch.doctor import Check, exit_status, one_line, run_doctor

    config = load_config(args.config, args.overrides)
    checks: list[Check] = []
    videos = None
    if args.prompts:
        from hvbatch.batch.control.prompts import read_prompts
        from hvbatch.models.family import family_of

        try:
            videos = read_prompts(args.prompts, config.sampling, family_of(config.model).geometry)
        except ValueError as err:
            checks.append(Check("prompts", "fail", one_line(str(err)), "fix the prompts file as listed"))
        else:
            checks.append(Check("prompts", "ok", f"{args.prompts}: {videos.num_rows} videos"))
    checks += run_doctor(config, run_dir=Path(args.run_dir), videos=videos)
    if args.json:
        print(json.dumps([c.to_dict() for c in checks], indent=2))
    else:
        for check in checks:
            print(check.line())
        failed = sum(c.status == "fail" for c in checks)
        warned = sum(c.status == "warn" for c in checks)
        print(f"{len(checks)} checks: {failed} failed, {warned} warnings")
    return exit_status(checks)


def add_doctor_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "doctor",
        help="check weights, GPUs, ffmpeg, the run directory and Slurm before a run (nothing is loaded)",
        description="Check what a run of this config needs, without loading the model, and say what to fix: "
        "one line per check (ok, warn or FAIL). Exit status 1 if any check fails, 0 otherwise "
        "(warnings allowed), 2 for a bad command line or config.",
    )
    parser.add_argument("--config", help="a YAML file merged over the defaults and the preset")
    parser.add_argument(
        "--run-dir",
        default=DEFAULT_RUN_DIR,
        help=f"the run directory to check (default {DEFAULT_RUN_DIR}/, where submit puts runs)",
    )
    parser.add_argument("--prompts", help="a prompts Parquet file: sizes the plan and the free space check")
    parser.add_argument(
        "--json", action="store_true", help="print a JSON list of {check, status, detail, fix}"
    )
    parser.add_argument(
        "overrides", nargs="*", help="key=value overrides, e.g. model=tiny slurm.partition=gpu"
    )
    parser.set_defaults(func=run_doctor_command)
