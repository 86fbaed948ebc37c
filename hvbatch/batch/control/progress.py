"""`--wait`: poll a run until it ends, showing its progress, then summarise it.

On a terminal the progress is one line redrawn in place; in a log (stderr not a TTY) it is a plain
line when the counts have changed and at least `PLAIN_INTERVAL_S` has passed since the last one,
so a week-long run writes a few hundred lines, not one per poll. Rates and ETAs count only what
this wait has seen finish (a `retry --wait` is not credited with the videos of earlier jobs).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO

import pyarrow.compute as pc

from hvbatch.batch import ledger
from hvbatch.batch.control.status import RunReader, format_duration, run_status, video_table
from hvbatch.batch.rundir import RunDir
from hvbatch.text import count

POLL_S = 5.0
PLAIN_INTERVAL_S = 60.0
BAR_WIDTH = 20
MAX_SUMMARY_ERRORS = 3


@dataclass(frozen=True)
class Progress:
    done: int
    failed: int
    total: int
    elapsed_s: float
    videos_per_hour: float | None
    eta_s: float | None
    doing: str | None = None
    """What the run's jobs are doing while no video has ended in this wait (start-up phases)."""

    @classmethod
    def measure(
        cls,
        counts: dict[str, int],
        done_at_start: int,
        elapsed_s: float,
        running: bool,
        doing: str | None = None,
    ) -> Progress:
        """Rate from the videos done since the wait began; no ETA while no job runs, nor once
        nothing is left."""
        total = sum(counts.values())
        new = counts["done"] - done_at_start
        rate = new / elapsed_s * 3600.0 if new > 0 and elapsed_s > 0 else None
        left = total - counts["done"] - counts["failed"]
        eta = left / rate * 3600.0 if left and rate and running else None
        return cls(counts["done"], counts["failed"], total, elapsed_s, rate, eta, doing)


def format_progress(progress: Progress, bar_width: int = 0) -> str:
    """`[#####.....] 120/500 done, 3 failed, 41.2 videos/h, ETA 2h 10m` (bar only if bar_width)."""
    p = progress
    idle = p.doing or ("no video done yet" if p.done + p.failed < p.total else "")
    rate = f"{p.videos_per_hour:.1f} videos/h" if p.videos_per_hour else idle
    rate = f", {rate}" if rate else ""
    eta = f", ETA {format_duration(p.eta_s)}" if p.eta_s is not None else ""
    text = f"{p.done}/{p.total} done, {p.failed} failed{rate}{eta}"
    if not bar_width:
        return text
    filled = bar_width * (p.done + p.failed) // max(1, p.total)
    return f"[{'#' * filled}{'.' * (bar_width - filled)}] {text}"


class ProgressReporter:
    """Shows successive `Progress` values on a stream: a redrawn bar on a TTY, else plain lines."""

    def __init__(
        self,
        stream: TextIO | None = None,
        tty: bool | None = None,
        interval_s: float = PLAIN_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.interval_s = interval_s
        self.clock = clock
        self._last_line_at: float | None = None
        self._last_counts: tuple[int, int] | None = None
        self._drawn = 0  # characters of the bar on screen
        self._last_text = ""
        self.first: Progress | None = None

    def update(self, progress: Progress) -> None:
        self.first = self.first or progress
        counts = (progress.done, progress.failed)
        if self.tty:
            text = format_progress(progress, BAR_WIDTH)
            if text == self._last_text:
                return
            self._last_text = text
            self.stream.write("\r" + text + " " * max(0, self._drawn - len(text)))
            self._drawn = len(text)
        else:
            now = self.clock()
            due = self._last_line_at is None or (
                counts != self._last_counts and now - self._last_line_at >= self.interval_s
            )
            if not due:
                return
            self._last_line_at = now
            self.stream.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {format_progress(progress)}\n")
        self._last_counts = counts
        self.stream.flush()

    def close(self) -> None:
        """End the bar's line, so that what is printed next starts on its own line."""
        if self.tty and self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = 0


def poll_run(reader: RunReader) -> tuple[bool, bool, dict[str, int]]:
    """One look (only new markers and manifest parts are read): (every shard complete, some job
    alive, counts). A scheduler that cannot answer counts as "alive"."""
    complete, alive, counts, _ = poll_run_phases(reader, False, with_phases=False)
    return complete, alive, counts


def poll_run_phases(
    reader: RunReader, before_any_video: bool, with_phases: bool = True
) -> tuple[bool, bool, dict[str, int], str | None]:
    """`poll_run`, and what the running jobs are doing while they start up (`jobs_doing`)."""
    snapshot = reader.snapshot(every_job=True)
    counts, _ = reader.counts(snapshot)
    alive = snapshot.states is None or bool(snapshot.states)
    doing = jobs_doing(reader.run, snapshot.states or {}, before_any_video) if with_phases else None
    return len(snapshot.markers) == reader.num_shards(), alive, counts, doing


def jobs_doing(
    run: RunDir, states: dict[str, str], before_any_video: bool, now: float | None = None
) -> str | None:
    """The start-up phase of the running jobs in words (`ledger.record_phase`): the latest, and
    for how long; before any video has ended in this wait also a phase past start-up, or the
    queue state (`job 12 pending`). None when there is nothing to say."""
    running = sorted(job for job, state in states.items() if state == "RUNNING")
    phases = ledger.job_phases(run, running)
    starting = [record for record in phases if record.get("starting")]
    shown = starting[:1] or (phases[:1] if before_any_video else [])
    if shown:
        record, now = shown[0], time.time() if now is None else now
        since = format_duration(max(0.0, now - float(record.get("at") or now)))
        others = len(starting) - 1 if starting else len(running) - 1
        more = f" (+{count(others, 'other job')} starting)" if starting and others > 0 else ""
        return f"job {record['job_id']}: {record['phase']} [{since}]{more}"
    if not before_any_video or not states:
        return None
    job_id, state = (running[0], "RUNNING") if running else sorted(states.items())[0]
    more = f" (+{count(len(states) - 1, 'other job')})" if len(states) > 1 else ""
    return f"job {job_id} {state.lower()}{', starting' if state == 'RUNNING' else ''}{more}"


def watch_run(
    run: RunDir,
    reporter: ProgressReporter | None = None,
    poll_s: float = POLL_S,
    timeout_s: float | None = None,
    exit_grace_s: float = 120.0,
) -> bool:
    """Poll until every shard is complete and its jobs have exited, or no job is alive.

    True when all shards are complete. Jobs get `exit_grace_s` after the last marker to finish
    writing metrics and exit, so that a `retry` right after `--wait` does not find them alive.
    """
    start = time.time()
    complete_since: float | None = None
    done_at_start: int | None = None
    ended_at_start: int | None = None
    reader = RunReader(run)
    before_any_video = True  # in this wait
    while True:
        complete, alive, counts, doing = poll_run_phases(reader, before_any_video, reporter is not None)
        now = time.time()
        if done_at_start is None:
            done_at_start, ended_at_start = counts["done"], counts["done"] + counts["failed"]
        before_any_video = before_any_video and counts["done"] + counts["failed"] == ended_at_start
        if complete:
            complete_since = complete_since or now
        if reporter is not None:  # the rate stops at the last video: jobs exiting do not lower it
            elapsed = (complete_since or now) - start
            reporter.update(Progress.measure(counts, done_at_start, elapsed, alive, doing))
        if complete:
            if not alive or now - complete_since > exit_grace_s:
                return True
        elif not alive and now - start > poll_s:
            return len(run.completed_shards()) == run.num_shards()
        if timeout_s is not None and now - start > timeout_s:
            return complete
        time.sleep(min(poll_s, 1.0) if complete else poll_s)


def format_summary(run: RunDir, started_at: float, done_at_start: int = 0) -> str:
    """The end of a wait: done and failed (the first errors), time, rate, where the videos are,
    and why the run stopped if it is not complete."""
    status = run_status(run)
    c = status.counts
    total = sum(c.values())
    elapsed = max(0.0, time.time() - started_at)
    new = c["done"] - done_at_start
    rate = f", {new / elapsed * 3600.0:.1f} videos/h" if new > 0 and elapsed > 0 else ""
    lines = [
        f"run {run.root}: {c['done']}/{total} videos done, {c['failed']} failed, "
        f"in {format_duration(elapsed)}{rate}; videos in {run.root / 'videos'}"
    ]
    if c["failed"]:
        table = video_table(run)
        failed = table.filter(pc.equal(table["status"], "failed")).to_pylist()
        lines += [f"  failed {row['video_id']}: {row['error']}" for row in failed[:MAX_SUMMARY_ERRORS]]
        lines.append(f"  (all of them: `hvbatch manifest {run.root} --failed`)")
    return "\n".join([*lines, *status.stopped])


def wait_with_progress(run: RunDir, stream: TextIO | None = None) -> bool:
    """`--wait`: the progress on `stream` (stderr by default), then the summary on stdout.
    Ctrl-C (KeyboardInterrupt) ends the progress line and propagates, without a summary."""
    reporter = ProgressReporter(stream)
    started = time.time()
    try:
        complete = watch_run(run, reporter, poll_s=POLL_S)
    finally:
        reporter.close()
    print(format_summary(run, started, reporter.first.done if reporter.first else 0))
    return complete
