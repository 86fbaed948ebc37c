"""`hvbatch plan`: print the parallel layout and per-GPU memory estimate the config leads to."""

from __future__ import annotations

import argparse
import json

from hvbatch.config import load_config
from hvbatch.models.family import family_of
from hvbatch.parallel.plan import memory_figures, plan_for_config, plan_header, plan_to_dict, video_tokens
from hvbatch.parallel.planner import format_plan
from hvbatch.sampling.estimates import speedup_line


def run_plan(args: argparse.Namespace) -> int:
    files = [item for item in args.overrides if "=" not in item]
    if len(files) > 1:
        raise ValueError(f"hvbatch plan takes at most one prompts file, got {files}")
    if files:  # `hvbatch plan PROMPTS.parquet` is `hvbatch submit PROMPTS.parquet --dry-run`
        from hvbatch.batch.control.commands import dry_run

        overrides = [item for item in args.overrides if "=" in item]
        return dry_run(load_config(args.config, overrides), files[0])
    config = load_config(args.config, args.overrides)
    plan = plan_for_config(config)
    if args.json:
        data = plan_to_dict(plan)
        s = config.sampling
        data["video"] = {
            "height": s.height,
            "width": s.width,
            "num_frames": s.num_frames,
            "image_tokens": video_tokens(config, s),
            "text_tokens": memory_figures(config).text_tokens,
        }
        print(json.dumps(data, indent=2))
    else:
        print(plan_header(config, config.sampling))
        print(format_plan(plan))
        if config.sampling.cache != "none":
            figures = family_of(config.model).step_cache
            print(speedup_line(config.sampling.cache, config.sampling.cache_threshold, figures))
    return 0


def add_plan_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "plan",
        help="print the parallel layout (dp x ulysses x ring) and per-GPU memory estimate",
        description="Plan the parallel layout of a job from the config tree, without loading anything: "
        "e.g. parallel.mode=latency slurm.nodes=2 sampling.height=544 sampling.width=960.",
    )
    parser.add_argument("--config", help="a YAML file merged over the defaults and the preset")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="[PROMPTS.parquet] key=value",
        help="an optional prompts file (then: shards, layout and estimates of `submit --dry-run`) and "
        "key=value overrides, e.g. parallel.gpu_memory_gib=40",
    )
    parser.set_defaults(func=run_plan)
