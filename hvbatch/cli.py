"""The `hvbatch` command line. Subcommands are added by the issues that build them."""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import sys

from omegaconf import OmegaConf

from hvbatch import __version__
from hvbatch.batch.control.commands import add_batch_parsers
from hvbatch.config import available_presets, bundled_configs, load_config
from hvbatch.generate import add_generate_parser
from hvbatch.plan_cli import add_plan_parser
from hvbatch.process import run_then_exit
from hvbatch.report.command import add_report_parser
from hvbatch.text import printable_lines


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
        description=f"Print the resolved config. Model presets: {', '.join(available_presets())}. "
        f"Example configs shipped with hvbatch (--config NAME): {', '.join(bundled_configs())}.",
    )
    config.add_argument("--config", help="a YAML file merged over the defaults and the preset")
    config.add_argument("overrides", nargs="*", help="key=value overrides, e.g. model=tiny sampling.seed=3")
    config.set_defaults(func=_cmd_config)
    add_generate_parser(commands)
    add_plan_parser(commands)
    add_batch_parsers(commands)
    add_report_parser(commands)
    from hvbatch.doctor.command import add_doctor_parser

    add_doctor_parser(commands)
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


EXIT_USER_ERROR = 2
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for `cat big | head`
EXIT_INTERRUPTED = 130  # 128 + SIGINT
USER_OS_ERRORS = {
    errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EACCES, errno.EPERM, errno.EROFS,
    errno.ENOSPC, errno.EDQUOT, errno.EEXIST, errno.ENAMETOOLONG, errno.ELOOP, errno.ENOTEMPTY,
}  # fmt: skip


def _user_error(err: Exception) -> str | None:
    """The message of a mistake the user can fix (bad input, a path), None for anything else (a bug)."""
    if isinstance(err, ValueError):
        return str(err)
    if isinstance(err, OSError) and not isinstance(err, BrokenPipeError) and err.errno in USER_OS_ERRORS:
        where = f"{err.filename}: " if err.filename is not None else ""
        return f"{where}{err.strerror or err}"
    return None


def _silence_stdout() -> None:
    """The reader of stdout went away: send what is still buffered nowhere instead of failing at exit."""
    with contextlib.suppress(OSError, ValueError, AttributeError):  # a stdout that is not a file
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def main(argv: list[str] | None = None) -> int:
    """Run one command. A user mistake is one `hvbatch CMD: error: ...` message and exit status 2
    (README "When something is wrong"); an internal bug keeps its traceback."""
    args = parse_args(argv)
    try:
        code = int(args.func(args))
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:
        print(f"hvbatch {args.command}: interrupted (Ctrl-C); nothing more was done", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:
        message = _user_error(err)
        if message is None:
            raise
        print(f"hvbatch {args.command}: error: {printable_lines(message)}", file=sys.stderr)
        return EXIT_USER_ERROR


def console_main() -> None:
    """The `hvbatch` executable: `main`, then `exit_process` (no native teardown at exit)."""
    run_then_exit(main)


if __name__ == "__main__":
    console_main()
