"""Which executor serves a run: by name for submitting, by each job's record for asking about it."""

from __future__ import annotations

import shutil

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
from hvbatch.batch.executors.slurm import SlurmExecutor, slurm_controller_up
from hvbatch.batch.rundir import RunDir
from hvbatch.config import Config, load_config

EXECUTORS: dict[str, type[Executor]] = EXECUTOR_CLASSES
assert {SlurmExecutor.kind, LocalExecutor.kind, SbatchExecutor.kind} <= set(EXECUTORS)


def resolve_executor(kind: str) -> str:
    """`auto` is Slurm when a controller answers, else local; `slurm` needs sbatch and a controller."""
    if kind == "auto":
        return "slurm" if slurm_controller_up() else "local"
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
    return kind


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
    "RunProbe",
    "SchedulerUnavailable",
    "executor_for",
    "latest_records",
    "live_states",
    "resolve_executor",
]
