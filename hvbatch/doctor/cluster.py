"""Doctor checks of Slurm: the controller, accounting (submitit reads job states with `sacct`), the
partition and its GPUs, the account and QoS (with accounting only), and MaxArraySize.

Everything goes through the Slurm client commands (`scontrol`, `sinfo`, `sacct`, `sacctmgr`) as the
executors use them, with the environment's SLURM_CONF.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass

from hvbatch.config import Config, SlurmConfig
from hvbatch.doctor.checks import Check, one_line

TIMEOUT_S = 30
DEFAULT_MAX_ARRAY_SIZE = 1001
_GPU_GRES = re.compile(r"gpu(?::[^:,(]+)?:(\d+)")


@dataclass(frozen=True)
class _Result:
    returncode: int
    stdout: str
    stderr: str

    @property
    def message(self) -> str:
        return one_line(self.stderr or self.stdout)[:300] or f"exit status {self.returncode}"


def _run(*cmd: str) -> _Result:
    try:
        proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return _Result(124, "", f"`{' '.join(cmd)}` did not answer in {TIMEOUT_S} s")
    except OSError as err:
        return _Result(127, "", f"`{cmd[0]}` cannot run: {err}")
    return _Result(proc.returncode, proc.stdout, proc.stderr)


def check_slurm(config: Config) -> list[Check]:
    """Slurm checks for `batch.executor` (`local`: none; `auto` without a controller: a warning)."""
    executor = config.batch.executor
    if executor == "local":
        return [Check("slurm", "ok", "batch.executor=local: jobs run on this machine, Slurm is not used")]
    missing = [name for name in ("sbatch", "scontrol") if not shutil.which(name)]
    if missing:
        return [_no_slurm(executor, f"{' and '.join(missing)} not on PATH")]
    ping = _run("scontrol", "ping")
    if ping.returncode != 0 or " is UP" not in ping.stdout:
        return [_no_slurm(executor, f"no Slurm controller answers `scontrol ping` ({ping.message})")]
    settings = _show_config()
    version = settings.get("SLURM_VERSION", "?")
    checks = [Check("slurm controller", "ok", f"{one_line(ping.stdout)} (Slurm {version})")]
    accounting = _check_accounting()
    checks.append(accounting)
    checks.append(_check_partition(config.slurm))
    checks.append(_check_node_memory(config))
    accounting_on = accounting.status == "ok"
    checks.append(_check_association("account", config.slurm.account, accounting_on))
    checks.append(_check_association("qos", config.slurm.qos, accounting_on))
    checks.append(_check_array_size(config.slurm, settings))
    return checks


def _no_slurm(executor: str, why: str) -> Check:
    if executor == "slurm":
        fix = (
            "load the Slurm module / set SLURM_CONF so that `scontrol ping` answers, or batch.executor=local"
        )
        return Check("slurm", "fail", f"batch.executor=slurm but {why}", fix)
    fix = "to submit to Slurm, run where `scontrol ping` answers; batch.executor=local silences this"
    return Check("slurm", "warn", f"{why}: batch.executor=auto will run jobs on this machine", fix)


def _show_config() -> dict[str, str]:
    """`scontrol show config` as a dict (empty if it fails)."""
    result = _run("scontrol", "show", "config")
    settings = {}
    for line in result.stdout.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            settings[key.strip()] = value.strip()
    return settings


def _check_accounting() -> Check:
    fix = (
        "the Slurm executors read how jobs ended with sacct: ask the admins to turn accounting on "
        "(AccountingStorageType=accounting_storage/slurmdbd, slurmdbd running), or set batch.executor=local"
    )
    if not shutil.which("sacct"):
        return Check("slurm accounting", "fail", "sacct is not on PATH", fix)
    result = _run("sacct", "-n", "-X", "-S", "now", "-o", "JobID")
    if result.returncode != 0:
        return Check("slurm accounting", "fail", f"`sacct` fails: {result.message}", fix)
    return Check("slurm accounting", "ok", "sacct answers (job accounting is on)")


def _default_partition() -> str | None:
    names = _run("sinfo", "-h", "-o", "%P").stdout.split()
    return next((name.rstrip("*") for name in names if name.endswith("*")), None)


def _partition_names() -> str:
    names = sorted({n.rstrip("*") for n in _run("sinfo", "-h", "-o", "%P").stdout.split()})
    return ", ".join(names) or "none"


def _check_partition(slurm: SlurmConfig) -> Check:
    name, how = slurm.partition, ""
    if not name:
        name, how = _default_partition(), " (the default; slurm.partition is not set)"
        if name is None:
            fix = f"set slurm.partition to one of: {_partition_names()}"
            return Check("slurm partition", "fail", "slurm.partition is not set and there is no default", fix)
    shown = _run("scontrol", "show", "partition", name)
    if shown.returncode != 0:
        detail = f"partition {name!r} does not exist ({shown.message})"
        return Check(
            "slurm partition", "fail", detail, f"set slurm.partition to one of: {_partition_names()}"
        )
    fields = dict(re.findall(r"(\w+)=(\S+)", shown.stdout))
    state, nodes = fields.get("State", "?"), int(fields.get("TotalNodes", "0") or 0)
    gres = _run("sinfo", "-h", "-p", name, "-o", "%G").stdout
    gpus = max((int(n) for n in _GPU_GRES.findall(gres)), default=0)
    detail = f"partition {name}{how} is {state}: {nodes} node(s), up to {gpus} GPUs per node"
    if gpus < slurm.gpus_per_node:
        fix = (
            "set slurm.gpus_per_node (and slurm.tasks_per_node) to what the nodes have, or another partition"
        )
        return Check(
            "slurm partition", "fail", f"{detail}, but slurm.gpus_per_node={slurm.gpus_per_node}", fix
        )
    if nodes < slurm.nodes:
        fix = "lower slurm.nodes, or choose a larger partition"
        return Check("slurm partition", "fail", f"{detail}, but slurm.nodes={slurm.nodes}", fix)
    if state != "UP":
        return Check("slurm partition", "warn", detail, "jobs wait until the partition is UP again")
    return Check("slurm partition", "ok", detail)


def _check_node_memory(config: Config) -> Check:
    """The partition's smallest node memory (`sinfo %m`, MB) against what a job asks for."""
    from hvbatch.parallel.plan import host_memory_for_config, slurm_mem_gb

    name = config.slurm.partition or _default_partition()
    wanted = slurm_mem_gb(config)
    if wanted is None:
        return Check("slurm node memory", "ok", "random-weight preset: the cluster's default memory applies")
    where = ["-p", name] if name else []
    sizes = [
        int(m.rstrip("+"))
        for m in _run("sinfo", "-h", *where, "-o", "%m").stdout.split()
        if m.rstrip("+").isdigit()
    ]
    if not sizes:
        return Check("slurm node memory", "warn", "`sinfo -o %m` gives no node memory", "")
    have_gb = min(sizes) / 1000
    needed = host_memory_for_config(config)
    detail = (
        f"jobs ask for --mem={wanted}G (the model needs ~{needed:.0f} GiB per node: "
        f"{config.slurm.tasks_per_node} ranks, text encoders offloaded={config.model.text_encoder_offload}); "
        f"the smallest node has {have_gb:.0f} GB"
    )
    if wanted > have_gb:
        fix = (
            "the offloaded text encoders take host memory on every rank: use nodes with more memory, "
            "model.text_encoder_offload=keep (more GPU memory: see `hvbatch plan`), or fewer ranks per node"
        )
        return Check("slurm node memory", "warn", detail, fix)
    return Check("slurm node memory", "ok", detail)


def _check_association(kind: str, value: str | None, accounting_on: bool) -> Check:
    """slurm.account / slurm.qos exists in the accounting database."""
    key, check = f"slurm.{kind}", f"slurm {kind}"
    if not value:
        return Check(check, "ok", f"{key} is not set: jobs use your default {kind}")
    if not accounting_on:
        return Check(check, "warn", f"{key}={value} cannot be checked without accounting", "")
    column = "Account" if kind == "account" else "Name"
    result = _run("sacctmgr", "-n", "-P", "show", kind, value, f"format={column}")
    if result.returncode != 0:
        return Check(check, "warn", f"{key}={value}: `sacctmgr show {kind}` fails: {result.message}", "")
    if value not in result.stdout.split():
        fix = f"set {key} to one of yours (sacctmgr show assoc user=$USER format=Account,QOS)"
        return Check(check, "fail", f"{key}={value}: no such {kind} in the accounting database", fix)
    return Check(check, "ok", f"{key}={value} exists")


def _check_array_size(slurm: SlurmConfig, settings: dict[str, str]) -> Check:
    raw = settings.get("MaxArraySize", "")
    cluster = int(raw) if raw.isdigit() else DEFAULT_MAX_ARRAY_SIZE
    if slurm.max_array_size and slurm.max_array_size > cluster:
        detail = f"slurm.max_array_size={slurm.max_array_size} is over the cluster's MaxArraySize={cluster}"
        fix = "unset slurm.max_array_size: arrays are then split at the cluster's limit"
        return Check("slurm array size", "fail", detail + ": sbatch would refuse the arrays", fix)
    limit = slurm.max_array_size or cluster
    return Check(
        "slurm array size",
        "ok",
        f"MaxArraySize={cluster}: runs of more than {limit} shards go in several arrays",
    )
