"""The `hvbatch` command line. Subcommands are added by the issues that build them."""

from __future__ import annotations

import argparse
import sys

from omegaconf import OmegaConf

from hvbatch import __version__
from hvbatch.batch.control.commands import add_batch_parsers
from hvbatch.config import available_presets, load_config
from hvbatch.generate import add_generate_parser
from hvbatch.plan_cli import add_plan_parser


def _cmd_config(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)
    print(OmegaConf.to_yaml(OmegaConf.structured(config)), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hvbatch", description="Batch HunyuanVideo generation on Slurm.")
    parser.add_argument("--version", action="version", version=f"hvbatch {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    config = commands.add_parser(
        "config",
        help="print the resolved config",
        description=f"Print the resolved config. Model presets: {', '.join(available_presets())}.",
    )
    config.add_argument("--config", help="a YAML file merged over the defaults and the preset")
    config.add_argument("overrides", nargs="*", help="key=value overrides, e.g. model=tiny sampling.seed=3")
    config.set_defaults(func=_cmd_config)
    add_generate_parser(commands)
    add_plan_parser(commands)
    add_batch_parsers(commands)
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Like parse_args, but `key=value` overrides may also follow options after a positional."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    overrides_only = all("=" in item and not item.startswith("-") for item in extra)
    if extra and hasattr(args, "overrides") and overrides_only:
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return int(args.func(args))
    except (ValueError, FileNotFoundError) as err:
        print(f"hvbatch {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
