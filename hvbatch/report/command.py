"""The `hvbatch report` subcommand (registered by hvbatch.cli)."""

from __future__ import annotations

import argparse
from pathlib import Path

from hvbatch.batch.rundir import RunDir
from hvbatch.report.page import write_report


def run_report(args: argparse.Namespace) -> int:
    run = RunDir(args.run_dir).require()
    out = Path(args.out) if args.out else run.root / "report.html"
    data = write_report(run, out, thumbnails=not args.no_thumbnails)
    size = out.stat().st_size / 1e6
    print(f"wrote {out} ({len(data.videos)} videos, {size:.1f} MB): open it in a browser")
    return 0


def add_report_parser(commands: argparse._SubParsersAction) -> None:
    report = commands.add_parser(
        "report",
        help="write one self-contained HTML page showing a run",
        description="Write one HTML file (no network needed) with a contact sheet of the run's videos, "
        "its failures, throughput over time and each shard's job attempts.",
    )
    report.add_argument("run_dir")
    report.add_argument("--out", help="the HTML file to write (default: RUN_DIR/report.html)")
    report.add_argument(
        "--no-thumbnails", action="store_true", help="skip the first-frame thumbnails (no ffmpeg run)"
    )
    report.set_defaults(func=run_report)
