"""Plain sbatch jobs: the run's jobs as scripts from `slurm/`, and what runs inside them.

`render` fills a template; the user submits it. Inside the job, `register` (before srun) records
the job in the run on its first start, as `retry` would (closing stale attempts, reopening shards
with failed videos, a fresh budget); every rank runs `run_shard` (srun's entry point, `hvbatch
run-shard`); `finish` (after srun) records how the attempt ended and, while attempts are left,
submits the same script again for the failed shard, beginning after the backoff.

Every value that reaches the script is shell-quoted, whatever the config or the path contains.
`#SBATCH` lines are read by sbatch's own parser, not by the shell: a line break there would end the
comment and run the rest as a command, and a backslash escapes the next character even inside single
quotes, so values with control characters are refused and backslashes are doubled.
"""

from __future__ import annotations

import importlib.resources
import logging
import math
import os
import re
import shlex
import signal
import string
import subprocess
import sys
from pathlib import Path

from hvbatch.batch import ledger
from hvbatch.batch.attempt import AttemptKey
from hvbatch.batch.control.calibration import resubmission_config
from hvbatch.batch.executors.base import Executor, JobRecord, RunProbe, record_submission, submission_lock
from hvbatch.batch.executors.slurm import (
    SlurmQueue,
    SlurmShardJob,
    job_id_from_environment,
    srun_outcome,
    submission_environment,
)
from hvbatch.batch.rundir import RunDir
from hvbatch.config import Config, load_config
from hvbatch.parallel.plan import slurm_mem_gb

logger = logging.getLogger(__name__)
KIND_VAR = "HVBATCH_SUBMISSION_KIND"

TEMPLATES = ("node", "multinode", "array")
EXIT_REQUEUED = 143


def _template_text(name: str) -> str:
    if name not in TEMPLATES:
        raise ValueError(f"--template {name!r}: use one of {', '.join(TEMPLATES)}")
    return (importlib.resources.files("hvbatch.slurm_templates") / f"{name}.sbatch").read_text()


def _sbatch_value(value: str, what: str) -> str:
    """`value` quoted for an `#SBATCH` line (sbatch reads it back exactly); refuse control characters."""
    if any(ord(ch) < 32 or 127 <= ord(ch) < 160 for ch in value):
        raise ValueError(f"{what} {value!r} contains a line break or control character")
    return shlex.quote(value).replace("\\", "\\\\")


def _log_dir(run: RunDir) -> str:
    log_dir = str(run.root / "logs")
    if "\\" in log_dir:  # sbatch drops backslashes from --output paths
        raise ValueError(f"{run.root}: sbatch cannot write job logs under a path with a backslash")
    return _sbatch_value(log_dir.replace("%", "%%"), "run directory")  # %% is a literal % in --output


def _sbatch_options(config: Config) -> str:
    s = config.slurm
    options = {"partition": s.partition, "account": s.account, "qos": s.qos, "constraint": s.constraint}
    mem_gb = slurm_mem_gb(config)  # slurm.mem_gb, or the memory model's host memory per node
    if mem_gb:
        options["mem"] = f"{mem_gb}G"
    if s.cpus_per_task:
        options["cpus-per-task"] = str(s.cpus_per_task)
    options.update(s.additional_parameters)
    lines = []
    for key, value in options.items():
        if value is None:
            continue
        if not key.replace("-", "").replace("_", "").isalnum():
            raise ValueError(f"slurm option name {key!r} is not a valid sbatch option")
        flag = key.replace("_", "-")  # as submitit writes additional_parameters: mail_user -> --mail-user
        text = str(value)
        lines.append(f"#SBATCH --{flag}" + (f"={_sbatch_value(text, f'slurm option {key}')}" if text else ""))
    return "\n".join(lines)


def render(run: RunDir, template: str, shards: list[int]) -> str:
    """The sbatch script for `shards` of `run` from one of the `slurm/` templates (the walltime sized
    from the run's own finished videos once it has some: `calibration.resubmission_config`)."""
    config = load_config(run.root / "config.yaml")
    if not shards:  # an empty --array=%N would be read as --array=0
        raise ValueError(f"{run.root}: every shard is complete; nothing to render")
    num_shards = run.num_shards()
    bad = [shard for shard in shards if not 0 <= shard < num_shards]
    if bad or len(set(shards)) != len(shards):
        raise ValueError(f"--shards {shards}: give distinct shard indices in 0..{num_shards - 1}")
    config = resubmission_config(config, run, shards)[0]
    s = config.slurm
    values = {
        "job_name": _sbatch_value(f"hvbatch-{run.root.name}", "run directory name"),
        "nodes": str(int(s.nodes)),
        "tasks_per_node": str(int(s.tasks_per_node)),
        "gpus_per_node": str(int(s.gpus_per_node)),
        "time_min": str(math.ceil(s.time_min)),
        "signal_delay_s": str(int(config.retry.signal_delay_s)),
        "log_dir": _log_dir(run),
        "extra_sbatch": _sbatch_options(config),
        "setup": "\n".join(s.setup),  # the user's own shell lines, verbatim by design
        "python": shlex.quote(sys.executable),
        "run_dir": shlex.quote(str(run.root)),
        "shards": " ".join(str(int(shard)) for shard in shards),
        "array": ",".join(str(int(shard)) for shard in shards) + f"%{int(s.array_parallelism)}",
    }
    return string.Template(_template_text(template)).substitute(values)


class SbatchExecutor(SlurmQueue, Executor):
    """Jobs from the plain sbatch templates: the user submits them; squeue, sacct and scancel as Slurm."""

    kind = "sbatch"

    def submit(self, shards: list[int], *, delay_s: float = 0.0, manual: bool = True) -> list[JobRecord]:
        raise ValueError(
            f"plain sbatch jobs are submitted by hand: `hvbatch sbatch {self.run.root} --out job.sbatch`, "
            "then `sbatch job.sbatch` (or `hvbatch retry --executor slurm`)"
        )


def _key() -> AttemptKey:
    return AttemptKey.slurm(job_id_from_environment(), int(os.environ.get("SLURM_RESTART_COUNT", "0")))


def register(run_dir: str, shards: list[int]) -> bool:
    """Before srun: on the job's first start, record it as a manual submission of `shards`."""
    run = RunDir(run_dir).require()
    key = _key()
    with submission_lock(run):
        known = {str(r["job_id"]) for s in run.submissions() for r in s["jobs"]}
        if key.job_id in known:
            return False  # a requeue of a job already recorded
        ledger.reconcile(run, shards, RunProbe(run), key)
        ledger.reopen_failed_shards(run, shards)
        manual = os.environ.get(KIND_VAR, "manual") != "auto"
        records = [JobRecord(shard, key.job_id, SbatchExecutor.kind) for shard in shards]
        record_submission(run, records, SbatchExecutor.kind, manual=manual)
    return True


def run_shard(run_dir: str, shards: list[int]) -> None:
    """srun's entry point on every rank; on USR2 (walltime or preemption) rank 0 records why and
    requeues the job, which resumes from the manifest."""
    run_dir = str(Path(run_dir).resolve())
    config = load_config(Path(run_dir) / "config.yaml")
    job = SlurmShardJob(config.slurm.time_min, config.retry.signal_delay_s)

    def on_usr2(signum: int, frame: object) -> None:
        if os.environ.get("SLURM_PROCID", "0") != "0" or "SLURM_JOB_ID" not in os.environ:
            return
        job.record_interruption()
        subprocess.run(["scontrol", "requeue", os.environ["SLURM_JOB_ID"]], check=False, timeout=60)
        sys.exit(EXIT_REQUEUED)

    signal.signal(signal.SIGUSR2, on_usr2)
    from hvbatch.batch.runtime.job import run_shards_job

    run_shards_job(run_dir, shards, RunProbe(RunDir(run_dir)), on_shard=job._set_active)


def _job_script() -> str | None:
    """This job's batch script, from `scontrol show job` (None if it is gone)."""
    try:
        out = subprocess.run(
            ["scontrol", "show", "job", os.environ["SLURM_JOB_ID"]],
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"\bCommand=(\S+)", out)
    return match.group(1) if match and Path(match.group(1)).is_file() else None


def resubmit_self(shards: list[int], delay_s: float, time_min: float | None = None) -> None:
    """Submit this job's script again for `shards`, beginning after `delay_s` (an automatic retry);
    `time_min` overrides the script's walltime (sized from the run's own finished videos)."""
    script = _job_script()
    if script is None:  # the script is gone: Slurm's own requeue delay is the backoff
        subprocess.run(["scontrol", "requeue", os.environ["SLURM_JOB_ID"]], check=False, timeout=60)
        return
    command = ["sbatch", f"--begin=now+{int(delay_s)}", f"--export=ALL,{KIND_VAR}=auto"]
    if time_min is not None:
        command.append(f"--time={math.ceil(time_min)}")
    if "SLURM_ARRAY_TASK_ID" in os.environ:
        command.append(f"--array={','.join(str(s) for s in shards)}")
    with submission_environment():
        subprocess.run([*command, script], check=False, timeout=60)


def finish(run_dir: str, exit_code: int, log_offset: int, shards: list[int]) -> dict[int, ledger.ShardFate]:
    """After srun: record how the attempt ended; retry the shard while attempts are left."""
    run = RunDir(run_dir)
    config = load_config(run.root / "config.yaml")
    exit_code, state = srun_outcome(exit_code, log_offset)

    def resubmit(todo: list[int], delay_s: float) -> None:
        sized = resubmission_config(config, run, todo)[0]
        time_min = sized.slurm.time_min if sized.slurm.time_min < config.slurm.time_min else None
        resubmit_self(todo, delay_s, time_min)

    return ledger.finish(
        run, config.retry, shards, _key(), exit_code, scheduler_state=state, resubmit=resubmit
    )


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    if len(args) >= 3 and args[0] == "register":
        register(args[1], [int(a) for a in args[2:]])
        return 0
    if len(args) >= 5 and args[0] == "finish":
        fates = finish(args[1], int(args[2]), int(args[3] or 0), [int(a) for a in args[4:]])
        print(f"hvbatch: attempt finished: {ledger.dumps_fates(fates)}", flush=True)
        return 0
    usage = "register RUN_DIR SHARD... | finish RUN_DIR STATUS LOG_OFFSET SHARD..."
    print(f"usage: python -m hvbatch.batch.executors.sbatch {usage}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
