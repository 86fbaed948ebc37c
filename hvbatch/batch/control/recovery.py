"""`hvbatch retry`, `cancel` and `retry --repair`: what runs each shard, and telling the truth.

A shard may be submitted again only once no job that may be running it is alive. `JobCensus`
asks the scheduler twice: about the shards' recorded jobs, and (`Executor.find_jobs`) about every
job of the run it still lists, whatever the records say, so a lost or corrupt submission record
never makes a live job look gone. A job found that way that runs one shard (a submitit array
element) is given to the shard its metrics row names and recorded again (`recovered`); one that
names none (still queued), or that may run several (local, plain sbatch), may be running any.

Each job is alive (queued or running), ending (COMPLETING: its processes may still run) or gone
(left the queue, or listed in a terminal state such as CANCELLED). `retry` submits the shards
whose jobs are gone; `retry --wait` first waits for ending jobs to leave the queue; a shard still
ending, or held by a job no record names, is reported and the command exits 1. `cancel` returns
once its jobs have left the queue, or says which are still ending (exit 1).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from hvbatch.batch import ledger
from hvbatch.batch.control.calibration import resubmission_config
from hvbatch.batch.control.frozen import IMAGE_COLUMNS, INDEX_SCHEMA
from hvbatch.batch.control.preflight import RetryOverrides, check_model_files
from hvbatch.batch.executors.base import (
    FoundJob,
    JobPhase,
    JobRecord,
    SchedulerUnavailable,
    record_submission,
    submission_lock,
)
from hvbatch.batch.executors.registry import EXECUTORS, choose_executor, executor_for, live_states
from hvbatch.batch.files import (
    CorruptRunFile,
    read_json,
    read_parquet,
    write_json_atomic,
    write_parquet_atomic,
)
from hvbatch.batch.rundir import RunDir, json_object, read_marker, read_submission
from hvbatch.config import Config, load_config
from hvbatch.text import count

ENDING_WAIT_S = 300.0  # retry --wait: how long jobs may take to leave the queue (KillWait, epilog)
CANCEL_WAIT_S = 120.0  # cancel: the same, before it says which jobs are still ending
POLL_S = 2.0


def unfinished_shards(run: RunDir) -> list[int]:
    """Shards without a completion marker, or whose marker counts failed videos."""
    markers = run.markers()
    return [s for s in range(run.num_shards()) if s not in markers or markers[s].get("failed", 0)]


def _describe(jobs: dict[str, str]) -> str:
    return ", ".join(f"{job} ({state})" for job, state in sorted(jobs.items()))


@dataclass
class JobCensus:
    """For each shard asked about: the jobs not gone that may be running it, and their phase."""

    jobs: dict[int, dict[str, str]] = field(default_factory=dict)
    unrecorded: dict[str, str] = field(default_factory=dict)
    """Jobs of the run in the queue that no readable record names and no metrics row places."""
    recovered: list[JobRecord] = field(default_factory=list)
    """Jobs found in the queue and placed by their metrics rows, but missing from the records."""
    found: dict[str, FoundJob] = field(default_factory=dict)
    """Every job of the run the queue still lists, records or not."""

    @classmethod
    def take(cls, run: RunDir, config: Config, shards: list[int]) -> JobCensus:
        """Raises SchedulerUnavailable when a scheduler cannot say which jobs are alive."""
        shards_of_job: dict[str, set[int]] = {}
        latest: dict[int, JobRecord] = {}
        for submission in run.submissions():
            for data in submission["jobs"]:
                record = JobRecord.from_dict(data)
                latest[record.shard] = record
                shards_of_job.setdefault(record.job_id, set()).add(record.shard)
        states = live_states(run, [latest[s] for s in shards if s in latest], config)
        census = cls(jobs={s: {} for s in shards})
        for shard in shards:
            record = latest.get(shard)
            if record is not None and record.job_id in states:
                census.jobs[shard][record.job_id] = states[record.job_id]
        found = _find_jobs(run, config, {r.executor for r in latest.values()})
        census.found = {job.job_id: job for job in found}
        placeable = [j.job_id for j in found if j.job_id not in shards_of_job and _one_shard(j)]
        placed = _shards_from_metrics(run, placeable)
        for job in found:
            owners = shards_of_job.get(job.job_id) or placed.get(job.job_id, set())
            if not owners:  # still queued, or a job that may run several shards
                census.unrecorded[job.job_id] = job.state
            elif job.job_id not in shards_of_job:
                census.recovered += [job.record(shard) for shard in sorted(owners)]
            for shard in owners & set(shards):
                census.jobs[shard][job.job_id] = job.state
        return census

    def phase(self, shard: int) -> JobPhase:
        """The furthest-from-gone phase of the jobs that may be running the shard."""
        states = [*self.jobs.get(shard, {}).values(), *self.unrecorded.values()]
        return max((JobPhase.of(state) for state in states), default=JobPhase.GONE)

    def own_phase(self, shard: int) -> JobPhase:
        """The same, counting only the jobs known to be the shard's."""
        return max((JobPhase.of(state) for state in self.jobs.get(shard, {}).values()), default=JobPhase.GONE)

    def shards_in(self, phase: JobPhase, shards: Iterable[int]) -> list[int]:
        return [s for s in shards if self.phase(s) == phase]

    def jobs_of(self, shards: Iterable[int]) -> dict[str, str]:
        return {job: state for s in shards for job, state in self.jobs.get(s, {}).items()}


def _find_jobs(run: RunDir, config: Config, kinds: set[str]) -> list[FoundJob]:
    """Every job of the run its executors still list; one scan per kind of queue."""
    with contextlib.suppress(CorruptRunFile):  # --repair rebuilds it; the records' kinds are asked
        kinds = kinds | {str(run.read_run()["executor"])}
    found: dict[str, FoundJob] = {}
    scanned: set[object] = set()
    for kind in sorted(kinds & set(EXECUTORS)):
        executor = EXECUTORS[kind](run, config)
        scan = type(executor).find_jobs  # the sbatch and the submitit executors share squeue's
        if scan not in scanned:
            scanned.add(scan)
            for job in executor.find_jobs():
                found.setdefault(job.job_id, job)
    return list(found.values())


def _one_shard(job: FoundJob) -> bool:
    executor = EXECUTORS.get(job.executor)
    return executor is not None and executor.one_shard_per_job


def _shards_from_metrics(run: RunDir, job_ids: list[str]) -> dict[str, set[int]]:
    """Shards whose attempts (metrics rows) these jobs began."""
    if not job_ids:
        return {}
    wanted, placed = set(job_ids), {}
    for row in run.metrics_rows():
        if str(row["job_id"]) in wanted:
            placed.setdefault(str(row["job_id"]), set()).add(int(row["shard"]))
    return placed


def _census(run: RunDir, config: Config, shards: list[int]) -> JobCensus:
    try:
        return JobCensus.take(run, config, shards)
    except SchedulerUnavailable as err:
        raise SystemExit(
            f"hvbatch retry: cannot tell which jobs of {run.root} are still alive ({err}); nothing was "
            "submitted. Try again once the scheduler answers."
        ) from err


def _wait_while_ending(run: RunDir, config: Config, shards: list[int], census: JobCensus) -> JobCensus:
    """Poll until no job of `shards` is ending (COMPLETING), at most ENDING_WAIT_S."""
    ending = census.shards_in(JobPhase.ENDING, shards)
    jobs = census.jobs_of(ending) | census.unrecorded
    print(
        f"run {run.root}: waiting up to {ENDING_WAIT_S:.0f} s for jobs {_describe(jobs)} to end", flush=True
    )
    deadline = time.monotonic() + ENDING_WAIT_S
    while ending and time.monotonic() < deadline:
        time.sleep(POLL_S)
        census = _census(run, config, shards)
        ending = census.shards_in(JobPhase.ENDING, shards)
    return census


@dataclass
class RetryOutcome:
    submitted: list[int]
    running: list[int]
    """Shards whose job is queued or running: not resubmitted, and nothing is wrong."""
    held: list[int]
    """Shards not resubmitted although they need it: their job is still ending, or may be a job
    that no record names."""


def retry_shards(
    run: RunDir,
    executor: str | None,
    wait: bool,
    overrides: RetryOverrides | None = None,
    check_weights: bool = True,
) -> RetryOutcome:
    """Resubmit the unfinished shards whose jobs are gone (see the module docstring). `overrides`
    (already checked) are saved in the run's config once there is a shard to submit."""
    config = overrides.config if overrides is not None else load_config(run.root / "config.yaml")
    if check_weights:
        check_model_files(config, "resubmitted")
    asked_by = "--executor" if executor else "the run's executor"
    if executor is None and overrides is not None and "batch.executor" in overrides.changes:
        executor, asked_by = config.batch.executor, "batch.executor"
    if wait:  # without the lock: a job's own last step may need it meanwhile
        unfinished = unfinished_shards(run)
        census = _census(run, config, unfinished)
        if census.shards_in(JobPhase.ENDING, unfinished):
            _wait_while_ending(run, config, unfinished, census)
    with submission_lock(run):
        unfinished = unfinished_shards(run)
        census = _census(run, config, unfinished)
        if census.recovered:  # status, cancel and --wait should know them again
            by_kind: dict[str, list[JobRecord]] = {}
            for record in census.recovered:
                by_kind.setdefault(record.executor, []).append(record)
            for kind, records in by_kind.items():
                record_submission(run, records, kind, manual=False, kind="recovered")
        todo = census.shards_in(JobPhase.GONE, unfinished)
        running = [s for s in unfinished if census.own_phase(s) == JobPhase.ALIVE]
        ending = [s for s in unfinished if census.own_phase(s) == JobPhase.ENDING]
        held = [s for s in unfinished if s not in todo and s not in running]
        _report(run, census, running, ending, held)
        if todo:
            choice = choose_executor(executor or run.read_run()["executor"], asked_by)  # before writing
            print(choice.line(), file=sys.stderr, flush=True)
            kind = choice.kind
            if overrides is not None:
                overrides.apply(run)
                print(f"run {run.root}: config.yaml now has {overrides.words()}")
            # Attempts whose job ended unseen (scancel, a lost node) are closed by the next attempt of
            # their shard when it starts (`ledger.reconcile`), not here: retry stays O(shards).
            ledger.reopen_failed_shards(run, todo)
            sized, note = resubmission_config(config, run, todo)  # walltime from the run's own videos
            new = executor_for(kind, run, sized).submit(todo)
            jobs = ", ".join(sorted({r.job_id for r in new}))
            print(f"run {run.root}: resubmitted shards {todo} as {jobs}{note}")
        elif not unfinished:
            print(f"run {run.root}: nothing to retry (every shard is complete)")
        if not todo and overrides is not None:
            print(f"run {run.root}: no shard resubmitted, so the overrides were not applied", file=sys.stderr)
    return RetryOutcome(todo, running, held)


def _report(run: RunDir, census: JobCensus, running: list[int], ending: list[int], held: list[int]) -> None:
    if running:
        print(
            f"run {run.root}: shards {running} still have a queued or running job "
            f"({_describe(census.jobs_of(running))}); they are not resubmitted"
        )
    if ending:
        print(
            f"run {run.root}: the jobs of shards {ending} are still ending "
            f"({_describe(census.jobs_of(ending))}); retry them once they have left the queue "
            f"(`hvbatch retry {run.root} --wait` waits for them)",
            file=sys.stderr,
        )
    if census.unrecorded and held:
        print(
            f"run {run.root}: jobs {_describe(census.unrecorded)} of this run are in the queue but in no "
            f"readable submission record, so they may be running any of shards {held}, which are not "
            f"resubmitted; wait for them to end, or stop them with `hvbatch cancel {run.root}`",
            file=sys.stderr,
        )


def cancel_run(run: RunDir) -> int:
    """Cancel the jobs of the run's unfinished shards (records and queue alike), then wait for
    them to leave the queue; 1 if some are still ending after CANCEL_WAIT_S."""
    config = load_config(run.root / "config.yaml")
    complete = run.completed_shards()
    shards = [s for s in range(run.num_shards()) if s not in complete]
    try:
        census: JobCensus | None = JobCensus.take(run, config, shards)
    except SchedulerUnavailable:
        census = None
    if census is None:
        print(
            "hvbatch cancel: warning: the scheduler did not answer; cancelling every recorded job",
            file=sys.stderr,
        )
        records = list(latest_unfinished_records(run, shards))
    else:
        records = _records_to_cancel(run, census, shards)
    ids = {r.job_id for r in records}
    # First, so that a job finishing after its ranks are killed sees why and does not retry.
    ledger.cancel(run, ids)
    by_kind: dict[str, list[JobRecord]] = {}
    for record in records:
        by_kind.setdefault(record.executor, []).append(record)
    for kind, group in by_kind.items():
        executor_for(kind, run, config).cancel(group)
    ledger.cancel_unstarted(run, [(r.shard, r.job_id, r.executor) for r in records])
    if census is None or not ids:
        print(f"run {run.root}: cancelled {count(len(ids), 'job')}")
        return 0
    left = _wait_until_gone(run, config, shards, ids)
    if left:
        print(
            f"run {run.root}: cancelled {count(len(ids), 'job')}; still ending after {CANCEL_WAIT_S:.0f} s: "
            f"{_describe(left)} (`hvbatch status {run.root}` shows them until they have left the queue)",
            file=sys.stderr,
        )
        return 1
    gone = "it has" if len(ids) == 1 else "all have"
    print(f"run {run.root}: cancelled {count(len(ids), 'job')}; {gone} left the queue")
    return 0


def latest_unfinished_records(run: RunDir, shards: list[int]) -> Iterable[JobRecord]:
    latest: dict[int, JobRecord] = {}
    for submission in run.submissions():
        for data in submission["jobs"]:
            record = JobRecord.from_dict(data)
            latest[record.shard] = record
    return (latest[s] for s in shards if s in latest)


def _records_to_cancel(run: RunDir, census: JobCensus, shards: list[int]) -> list[JobRecord]:
    """One record per job not gone: from the submissions, or as found in the queue."""
    recorded = {r.job_id: r for r in latest_unfinished_records(run, shards)}
    for submission in run.submissions():
        for data in submission["jobs"]:
            recorded.setdefault(str(data["job_id"]), JobRecord.from_dict(data))
    wanted = census.jobs_of(shards) | census.unrecorded
    return [recorded[job] if job in recorded else census.found[job].record(-1) for job in sorted(wanted)]


def _wait_until_gone(run: RunDir, config: Config, shards: list[int], ids: set[str]) -> dict[str, str]:
    deadline = time.monotonic() + CANCEL_WAIT_S
    while True:
        census = JobCensus.take(run, config, shards)
        left = {
            job: state for job, state in (census.jobs_of(shards) | census.unrecorded).items() if job in ids
        }
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(min(POLL_S, 1.0))


# --- repair --------------------------------------------------------------------------------------


def _move_aside(run: RunDir, path: Path) -> Path:
    target = run.root / "corrupt" / path.parent.relative_to(run.root) / path.name
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(path, target)
    return target


def _is_corrupt(read: Callable[[Path], object], path: Path) -> bool:
    try:
        read(path)
    except CorruptRunFile:
        return True
    return False


def _shard_files(run: RunDir) -> list[Path]:
    return sorted((run.root / "shards").glob("shard-*.parquet"))


def _rebuild_run_json(run: RunDir) -> str:
    """run.json from what else the run holds: its shards, the executor of its submissions."""
    shards = _shard_files(run)
    executor = "auto"
    for path in sorted((run.root / "jobs").glob("submission-*.json")):
        if not _is_corrupt(read_submission, path):
            executor = str(read_submission(path)["executor"])
    num_videos = sum(read_parquet(p, ["video_id"]).num_rows for p in shards)
    moved = _move_aside(run, run.run_json)
    write_json_atomic(
        run.run_json,
        {
            "prompts": None,  # not known any more
            "num_shards": len(shards),
            "num_videos": num_videos,
            "executor": executor,
            "created_at": min((p.stat().st_mtime for p in shards), default=time.time()),
            "rebuilt_at": time.time(),
        },
    )
    return f"moved corrupt file to {moved}; rebuilt run.json from the {len(shards)} shard files"


def _rebuild_videos(run: RunDir) -> str:
    """videos.parquet (every video with its shard) from the shard files."""
    tables = []
    for index in range(run.num_shards()):
        shard = run.read_shard(index)
        columns = {name: shard[name] for name in ("video_id", "prompt", "seed")}
        columns["shard"] = pa.array([index] * shard.num_rows, pa.int32())
        for name in IMAGE_COLUMNS:  # (shards written before the image columns have none)
            names = shard.column_names
            columns[name] = shard[name] if name in names else pa.nulls(shard.num_rows, pa.string())
        tables.append(pa.table(columns, schema=INDEX_SCHEMA))
    moved = _move_aside(run, run.videos_path)
    write_parquet_atomic(run.videos_path, pa.concat_tables(tables))
    return f"moved corrupt file to {moved}; rebuilt videos.parquet from the shard files"


def repair_run(run: RunDir) -> list[str]:
    """Move the run's unreadable files to corrupt/ and rebuild those that can be (run.json,
    videos.parquet); what it did, one line each. A corrupt shard file (a frozen input) cannot be
    rebuilt: a ValueError says so and what to do, and nothing is moved."""
    broken_shards = [p for p in _shard_files(run) if _is_corrupt(read_parquet, p)]
    if broken_shards:
        try:
            read_parquet(broken_shards[0])
        except CorruptRunFile as err:
            raise ValueError(str(err)) from err
    done = []
    if run.run_json.is_file() and _is_corrupt(lambda _: run.read_run(), run.run_json):
        done.append(_rebuild_run_json(run))
    if run.videos_path.is_file() and _is_corrupt(read_parquet, run.videos_path):
        done.append(_rebuild_videos(run))
    candidates = [
        *((p, read_marker) for p in (run.root / "done").glob("*.json")),
        *((p, read_submission) for p in (run.root / "jobs").glob("submission-*.json")),
        *((p, _read_object) for p in (run.root / "attempts").glob("*.json")),
        *((p, read_parquet) for p in (run.root / "manifest").glob("*.parquet")),
        *((p, read_parquet) for p in (run.root / "metrics").glob("*.parquet")),
        (run.root / "manifest-cache.parquet", read_parquet),
    ]
    for path, read in candidates:
        if path.is_file() and _is_corrupt(read, path):
            done.append(f"moved corrupt file to {_move_aside(run, path)}")
    return done


def _read_object(path: Path) -> dict[str, object]:
    return json_object(path, read_json(path), {}, (), "an object")
