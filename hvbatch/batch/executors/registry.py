"""Which executor serves a run: by name for submitting, by each job's record for asking about it."""

from __future__ import annotations

import shutil
from dataclasses import dataclass

from hvbatch.batch.executors.base import (
    EXECUTOR_CLASSES,
    Executor,
    JobRecord,
    RunProbe,
    SchedulerUnavailable,
    latest_records,
)
from hvbatch.batch.executors.local import LocalExecutor
from hvbatch.batch.executors.sbatch import SbatchExecutor
from hvbatch.batch.executors.slurm import SlurmExecutor, probe_slurm_controller, slurm_controller_up
from hvbatch.batch.rundir import RunDir
from hvbatch.config import Config, load_config

EXECUTORS: dict[str, type[Executor]] = EXECUTOR_CLASSES
assert {SlurmExecutor.kind, LocalExecutor.kind, SbatchExecutor.kind} <= set(EXECUTORS)


@dataclass(frozen=True)
class ExecutorChoice:
    """The executor a submission uses and why, said on every submit and retry."""

    kind: str
    why: str
    warning: bool = False
    """`auto` fell back to the local executor although Slurm's commands exist (they failed)."""

    def line(self) -> str:
        prefix = "warning: " if self.warning else ""
        return f"{prefix}executor: {self.kind} ({self.why})"


def choose_executor(kind: str, asked_by: str = "--executor") -> ExecutorChoice:
    """`auto` is Slurm when a controller answers, else local; `slurm` needs sbatch and a controller."""
    if kind == "auto":
        probe = probe_slurm_controller()
        if probe.up:
            return ExecutorChoice("slurm", f"{asked_by}=auto: {probe.why}")
        if probe.command_failed:
            why = (
                f"{asked_by}=auto: {probe.why}; each job's ranks run on this machine. Use --executor "
                "slurm once the controller answers (check SLURM_CONF), or --executor local to mean it"
            )
            return ExecutorChoice("local", why, warning=True)
        return ExecutorChoice("local", f"{asked_by}=auto: {probe.why}, so no Slurm here")
    if kind not in ("slurm", "local"):
        raise ValueError(f"--executor {kind!r}: use auto, slurm or local")
    if kind == "slurm" and not shutil.which("sbatch"):
        raise ValueError(
            "--executor slurm: sbatch is not on PATH (load the Slurm module, or use --executor local)"
        )
    if kind == "slurm" and not slurm_controller_up():
        raise ValueError(
            "--executor slurm: no Slurm controller answers `scontrol ping` (is slurmctld up? "
            "is SLURM_CONF right?); nothing was written. Use --executor local to run on this machine"
        )
    return ExecutorChoice(kind, f"{asked_by}={kind}")


def resolve_executor(kind: str) -> str:
    """The executor `choose_executor` picks, without the reason."""
    return choose_executor(kind).kind


def executor_for(kind: str, run: RunDir, config: Config | None = None) -> Executor:
    config = config if config is not None else load_config(run.root / "config.yaml")
    return EXECUTORS[kind](run, config)


def live_states(run: RunDir, records: list[JobRecord], config: Config | None = None) -> dict[str, str]:
    """Scheduler state of each of `records`' jobs still alive; raises SchedulerUnavailable."""
    states: dict[str, str] = {}
    by_kind: dict[str, list[JobRecord]] = {}
    for record in records:
        by_kind.setdefault(record.executor, []).append(record)
    for kind, group in by_kind.items():
        states |= executor_for(kind, run, config).live(group)
    return states


__all__ = [
    "EXECUTORS",
    "ExecutorChoice",
    "RunProbe",
    "SchedulerUnavailable",
    "choose_executor",
    "executor_for",
    "latest_records",
    "live_states",
    "resolve_executor",
]
