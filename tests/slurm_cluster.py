"""A real single-node Slurm cluster for the tests: 8 fake GPUs, accounting through slurmdbd.

Use it from a test module with::

    pytest_plugins = ["tests.slurm_cluster"]

    def test_something(slurm_cluster):        # the session's cluster (started once, stopped at exit)
        run(["sbatch", "--wrap", "true"], slurm_cluster.env)

    def test_with_submitit(slurm_env):        # the same cluster, made the process environment
        submitit.AutoExecutor(folder=...)     # submitit reads SLURM_CONF from os.environ

`scripts/slurm-cluster` does the work (it needs root, and installs Debian's Slurm packages the first
time). A cluster that does not start fails the tests that ask for it: they are never skipped.
`start_cluster`/`stop_cluster` start extra clusters, e.g. one with a small MaxArraySize.

PYTEST_DONT_REWRITE: this module has no assert statements, and test modules import it before
`pytest_plugins` registers it, which would otherwise warn that it cannot be rewritten.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = REPO_ROOT / "scripts" / "slurm-cluster"
START_TIMEOUT_S = 600  # the first start installs the packages
STOP_TIMEOUT_S = 90
CLIENT_TIMEOUT_S = 30
# States after which sacct reports no further change for a job.
TERMINAL_STATES = frozenset(
    {
        "BOOT_FAIL",
        "CANCELLED",
        "COMPLETED",
        "DEADLINE",
        "FAILED",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "PREEMPTED",
        "TIMEOUT",
    }
)


class SlurmClusterError(RuntimeError):
    """The cluster script failed; the message carries its output, with the daemons' log tails."""


@dataclass(frozen=True)
class SlurmCluster:
    dir: Path
    conf: Path
    env: dict[str, str]  # os.environ plus SLURM_CONF and a PATH with the Slurm clients

    def run(self, cmd: Sequence[str], timeout: float = CLIENT_TIMEOUT_S) -> str:
        return run(cmd, self.env, timeout)


def run(cmd: Sequence[str], env: Mapping[str, str], timeout: float = CLIENT_TIMEOUT_S) -> str:
    """Run a Slurm client command (sbatch, sacct, ...) and return its stdout; raise if it fails."""
    try:
        proc = subprocess.run(list(cmd), env=dict(env), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as error:
        raise AssertionError(f"{' '.join(cmd)} did not finish in {timeout} s") from error
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited with {proc.returncode}:\n{proc.stdout}{proc.stderr}")
    return proc.stdout


def _script(*args: str, env: Mapping[str, str], timeout: float) -> str:
    cmd = [str(SCRIPT), *args]
    try:
        proc = subprocess.run(cmd, env=dict(env), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as error:
        output = (error.stderr or b"").decode() if isinstance(error.stderr, bytes) else error.stderr or ""
        raise SlurmClusterError(f"{' '.join(cmd)} did not finish in {timeout} s:\n{_tail(output)}") from error
    if proc.returncode != 0:
        raise SlurmClusterError(f"{' '.join(cmd)} exited with {proc.returncode}:\n{_tail(proc.stderr)}")
    return proc.stdout


def _tail(text: str, lines: int = 80) -> str:
    return "\n".join(text.splitlines()[-lines:])


def _client_env(conf: Path, base: Mapping[str, str]) -> dict[str, str]:
    path = base.get("PATH", "")
    missing = [d for d in ("/usr/bin", "/usr/sbin") if d not in path.split(os.pathsep)]
    return {**base, "SLURM_CONF": str(conf), "PATH": os.pathsep.join([path, *missing]).strip(os.pathsep)}


def start_cluster(directory: Path, max_array_size: int | None = None) -> SlurmCluster:
    """Start a cluster whose files all live under `directory` (new or empty); raise if it fails."""
    env = dict(os.environ)
    if max_array_size is not None:
        env["HVBATCH_SLURM_MAX_ARRAY_SIZE"] = str(max_array_size)
    try:
        _script("start", str(directory), env=env, timeout=START_TIMEOUT_S)
    except SlurmClusterError as error:
        # A failed start stops its daemons itself, but a start killed at the timeout cannot.
        if (directory / ".slurm-cluster").exists():
            try:
                _script("stop", str(directory), env=env, timeout=STOP_TIMEOUT_S)
            except SlurmClusterError as stop_error:
                raise SlurmClusterError(f"{error}\n\nthen stopping failed too:\n{stop_error}") from None
        raise
    directory = directory.resolve()
    conf = directory / "slurm.conf"
    return SlurmCluster(dir=directory, conf=conf, env=_client_env(conf, os.environ))


def stop_cluster(cluster: SlurmCluster) -> None:
    """Cancel the cluster's jobs and stop its daemons; raise if that fails."""
    _script("stop", str(cluster.dir), env=os.environ, timeout=STOP_TIMEOUT_S)


def without_accounting(cluster: SlurmCluster, directory: Path) -> SlurmCluster:
    """The same cluster seen through a copy of its slurm.conf that turns accounting off.

    Client commands read AccountingStorageType from their own slurm.conf: with this one `sacct` and
    `sacctmgr` answer "accounting storage is disabled", as on a cluster without slurmdbd, while the
    controller, partitions and jobs are the running cluster's.
    """
    text = cluster.conf.read_text()
    if "AccountingStorageType=accounting_storage/slurmdbd" not in text:
        raise SlurmClusterError(
            f"{cluster.conf} has no AccountingStorageType=accounting_storage/slurmdbd line"
        )
    text = text.replace(
        "AccountingStorageType=accounting_storage/slurmdbd", "AccountingStorageType=accounting_storage/none"
    )
    directory.mkdir(parents=True, exist_ok=True)
    conf = directory / "slurm.conf"
    conf.write_text(text)
    return SlurmCluster(dir=cluster.dir, conf=conf, env=_client_env(conf, os.environ))


def wait_until(condition: Callable[[], object], timeout: float, what: str, interval: float = 0.3) -> object:
    """Poll `condition` until it returns something truthy, and return that; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def sacct_state(job_id: str, env: Mapping[str, str]) -> str | None:
    """The job's state in accounting (e.g. "COMPLETED", "CANCELLED"), or None if not recorded yet."""
    out = run(["sacct", "-X", "-n", "-P", "-o", "State", "-j", job_id], env).split()
    return out[0] if out else None


def wait_for_sacct_state(job_id: str, env: Mapping[str, str], timeout: float = 30) -> str:
    """Wait until accounting shows the job in a terminal state, and return that state."""

    def terminal_state() -> str | None:
        state = sacct_state(job_id, env)
        return state if state in TERMINAL_STATES else None

    return str(wait_until(terminal_state, timeout, f"job {job_id} to end in sacct"))


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    """The session's cluster, started on first use and stopped when the session ends."""
    directory = tmp_path_factory.mktemp("slurm-cluster")
    try:
        cluster = start_cluster(directory)
    except SlurmClusterError as error:
        failure = f"could not start the Slurm test cluster in {directory}:\n{error}"
    else:
        failure = None
    if failure is not None:  # outside the except block, so pytest shows the message once
        pytest.fail(failure, pytrace=False)
    try:
        yield cluster
    finally:
        stop_cluster(cluster)


@pytest.fixture
def slurm_env(slurm_cluster: SlurmCluster, monkeypatch: pytest.MonkeyPatch) -> SlurmCluster:
    """The session's cluster, with SLURM_CONF and PATH set in os.environ for this test.

    PYTHONPATH gets the repository root, so jobs can import the test modules that submitit
    pickles functions from by reference.
    """
    monkeypatch.setenv("SLURM_CONF", slurm_cluster.env["SLURM_CONF"])
    monkeypatch.setenv("PATH", slurm_cluster.env["PATH"])
    python_path = [str(REPO_ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(python_path))
    return slurm_cluster
