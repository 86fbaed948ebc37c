"""How an hvbatch process ends: Python's own clean-up, then `os._exit`, never native teardown.

A normal interpreter exit runs C++ static destructors and lets daemon threads run into the
interpreter's finalisation. Both can abort the process with `terminate called without an active
exception` (exit 134) after all the work was done:
- pyarrow's thread pools, torn down at exit while a worker thread is still joinable (one in four
  `pq.read_table` scripts aborted this way on a loaded 2-core machine; none with `os._exit`);
- a thread inside a TCPStore call (the GIL released) whose call returns during finalisation:
  CPython then ends the thread with `pthread_exit`, whose forced unwinding through pybind11's
  noexcept GIL guard calls `std::terminate` (pytorch/pytorch#38228).

So every process hvbatch owns ends through `exit_process`: atexit handlers, logging and stdio are
flushed as usual, then `os._exit(code)` skips the native teardown (every file hvbatch writes is
already fsynced and renamed by then). Processes that another program owns (a submitit task)
call `exit_after_interpreter_cleanup(code)` instead: the same happens when that program exits.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NoReturn

_armed_code: int | None = None


def _flush() -> None:
    logging.shutdown()  # flushes and closes every handler
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed or broken stream: nothing more to say
            stream.flush()


def exit_process(code: int) -> NoReturn:
    """Run the atexit handlers, flush logging and stdio, then `os._exit(code)`."""
    global _armed_code
    _armed_code = code  # atexit handlers may ask `exit_is_armed`
    with contextlib.suppress(Exception):
        atexit._run_exitfuncs()
    exit_now(code)


def exit_now(code: int) -> NoReturn:
    """Flush logging and stdio, then `os._exit(code)` (for atexit handlers: no handler runs again)."""
    _flush()
    os._exit(code)


def exit_is_armed() -> bool:
    """This process already ends through `os._exit` (`exit_process` or `exit_after_...`)."""
    return _armed_code is not None


def run_then_exit(main: Callable[[], int]) -> NoReturn:
    """`exit_process(main())`; an exception is printed as Python would, with Python's status."""
    try:
        code = main()
    except BaseException as err:
        if not isinstance(err, SystemExit):
            sys.excepthook(type(err), err, err.__traceback__)
        elif err.code is not None and not isinstance(err.code, int):
            print(err.code, file=sys.stderr)
        code = exit_code_of(err)
    exit_process(code)


def _exit_now() -> None:
    if _armed_code is not None:
        exit_now(_armed_code)


def exit_after_interpreter_cleanup(code: int) -> None:
    """When this interpreter exits (after the code that called this has returned), end with
    `os._exit(code)` once stdio and logging are flushed, skipping the native teardown. The last
    call wins. For processes whose main program is not hvbatch's (submitit's job runner)."""
    global _armed_code
    if _armed_code is None:
        atexit.register(_exit_now)  # registered late, so it runs before the earlier handlers
    _armed_code = code


def exit_code_of(error: BaseException | None) -> int:
    """The status Python itself would exit with after `error` (None: a normal return)."""
    if error is None:
        return 0
    if isinstance(error, SystemExit):
        if error.code is None:
            return 0
        return error.code % 256 if isinstance(error.code, int) else 1
    if isinstance(error, KeyboardInterrupt):
        return 130
    return 1


@contextlib.contextmanager
def task_exits_cleanly() -> Iterator[None]:
    """Around a submitit task's body: when the task process exits, it ends through
    `exit_after_interpreter_cleanup` with the status it would have had. Outside a submitit task
    (no SUBMITIT_EXECUTOR, e.g. a test calling the task in-process) nothing changes."""
    in_task = "SUBMITIT_EXECUTOR" in os.environ
    try:
        yield
    except BaseException as err:
        if in_task:
            exit_after_interpreter_cleanup(exit_code_of(err))
        raise
    if in_task:
        exit_after_interpreter_cleanup(0)


def process_age_s() -> float | None:
    """Seconds since this process started (from /proc; None where it cannot be read)."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime_s = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return max(0.0, uptime_s - start_ticks / os.sysconf("SC_CLK_TCK"))
