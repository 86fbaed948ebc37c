"""Store waits that cannot hang: deadlines, transient errors, a stopped rank 0 and a clean exit.

A TCPStore call against a stopped server blocks in C++ whatever its timeout, so every call goes
through `DeadlineStore`; these tests stop a real store server (SIGSTOP) or make a fake one hang
or fail, with patience (what `retry.peer_timeout_s` gives) of a second or two.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch.distributed as dist

from hvbatch.parallel.liveness import PREFIX, Liveness, PeerLostError, StoreLostError
from hvbatch.parallel.store import DeadlineStore, StoreUnresponsive, calls_in_flight

REPO = Path(__file__).resolve().parents[1]
SERVER = (
    "import sys, time, torch.distributed as d; from datetime import timedelta; "
    "s = d.TCPStore('127.0.0.1', 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=5)); "
    "print(s.port, flush=True); time.sleep(600)"
)


class FlakyStore:
    """One "connection" to a shared HashStore; calls fail while `failing` is set, or block while
    `blocking` is set (as against a stopped server)."""

    def __init__(self, shared: dist.HashStore, failing: threading.Event, blocking: threading.Event) -> None:
        self.shared, self.failing, self.blocking = shared, failing, blocking

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.shared, name)

        def call(*args: Any) -> Any:
            while self.blocking.is_set():
                time.sleep(0.01)
            if self.failing.is_set():
                raise RuntimeError("Connection reset by peer")
            return method(*args)

        return call


@pytest.fixture
def flaky() -> Iterator[tuple[Any, threading.Event, threading.Event, list[int]]]:
    shared, failing, blocking = dist.HashStore(), threading.Event(), threading.Event()
    connections: list[int] = []

    def connect() -> FlakyStore:
        connections.append(1)
        return FlakyStore(shared, failing, blocking)

    yield connect, failing, blocking, connections
    blocking.clear()  # release any worker still stuck in a call
    deadline = time.monotonic() + 5
    while calls_in_flight() and time.monotonic() < deadline:
        time.sleep(0.01)


def _store_threads() -> int:
    return sum(1 for t in threading.enumerate() if t.name.startswith("hvbatch-store-"))


def test_a_call_that_hangs_ends_within_the_patience_and_leaks_one_thread(flaky: Any) -> None:
    connect, _, blocking, connections = flaky
    store = DeadlineStore(connect, patience_s=0.5, name="test")
    store.set("k", "v")
    threads_before = _store_threads()
    blocking.set()
    started = time.monotonic()
    with pytest.raises(StoreUnresponsive, match="has not answered"):
        store.check(["k"])
    assert 0.4 < time.monotonic() - started < 2.0
    # While the abandoned call is stuck, further calls fail at once and start no new thread.
    for _ in range(5):
        started = time.monotonic()
        with pytest.raises(StoreUnresponsive):
            store.get("k")
        assert time.monotonic() - started < 0.2
    assert _store_threads() == threads_before  # the stuck worker, nothing more
    blocking.clear()  # the server answers again: the stuck call returns, its worker exits
    deadline = time.monotonic() + 5
    while True:
        with contextlib.suppress(StoreUnresponsive):  # until the stuck worker has exited
            if store.check(["k"]):
                break
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert store.get("k") == b"v"
    assert len(connections) == 2  # the abandoned connection was not reused
    store.close()


def test_transient_errors_are_retried_counted_and_logged_once(
    flaky: Any, caplog: pytest.LogCaptureFixture
) -> None:
    connect, failing, _, connections = flaky
    store = DeadlineStore(connect, patience_s=5.0, name="test")
    store.add("n", 1)
    failing.set()
    threading.Timer(1.2, failing.clear).start()
    with caplog.at_level(logging.WARNING, logger="hvbatch.parallel.store"):
        assert store.add("n", 1) == 2  # retried until the errors stopped
    assert store.errors >= 2
    assert len(connections) >= 3  # a failed connection is replaced
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2, messages  # the outage once, and its end
    assert "Connection reset by peer" in messages[0] and "answers again" in messages[1]
    failing.set()  # errors for longer than the patience: the caller is told
    store.patience_s = 0.6
    with pytest.raises(StoreUnresponsive, match="last error: RuntimeError: Connection reset"):
        store.add("n", 1)
    store.close()


def test_heartbeat_survives_transient_store_errors(flaky: Any) -> None:
    connect, failing, _, _ = flaky
    kwargs = {"interval_s": 0.05, "peer_timeout_s": 2.0}
    rank0 = Liveness(connect, 0, **kwargs).start()
    rank1 = Liveness(connect, 1, **kwargs).start()
    key = f"{PREFIX}hb/0"
    try:
        failing.set()  # 1.2 s of errors, well under the peer timeout
        time.sleep(1.2)
        failing.clear()
        before = rank1._store.add(key, 0)
        time.sleep(0.5)
        assert rank1._store.add(key, 0) > before  # rank 0's heartbeat came back
        assert rank0._thread.is_alive() and rank0.heartbeat_error is None
        assert rank0.store_errors > 0
        # A wait through the same kind of outage: rank 0 is not taken for dead.
        threading.Timer(0.2, failing.set).start()
        threading.Timer(1.4, failing.clear).start()
        threading.Timer(1.8, lambda: rank0.exchange("s", [0, 1], "from 0")).start()
        assert rank1.exchange("s", [0, 1], "from 1") == {0: "from 0", 1: "from 1"}
        # Errors for longer than the peer timeout: the heartbeat stops, and says why.
        failing.set()
        deadline = time.monotonic() + 6
        while rank0._thread.is_alive():
            assert time.monotonic() < deadline, "the heartbeat did not give up"
            time.sleep(0.05)
        assert "has not answered" in (rank0.heartbeat_error or "")
    finally:
        failing.clear()
        rank0.stop()
        rank1.stop()


@pytest.fixture
def server() -> Iterator[tuple[subprocess.Popen[str], int]]:
    proc = subprocess.Popen([sys.executable, "-c", SERVER], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    port = int(proc.stdout.readline())
    yield proc, port
    proc.kill()
    proc.wait()


def _client(port: int) -> dist.TCPStore:
    return dist.TCPStore(
        "127.0.0.1", port, is_master=False, wait_for_workers=False, timeout=timedelta(seconds=2)
    )


def test_a_stopped_store_host_ends_a_wait_within_the_peer_timeout(
    server: tuple[subprocess.Popen[str], int],
) -> None:
    proc, port = server
    waiting = Liveness(
        lambda: _client(port), 1, interval_s=0.1, peer_timeout_s=2.0, where=" (rank 0)"
    ).start()
    busy = Liveness(lambda: _client(port), 0, interval_s=0.1, peer_timeout_s=2.0).start()
    try:
        # Rank 0 is busy for 3 s (longer than the peer timeout) but its heartbeat moves: waited for.
        threading.Timer(3.0, lambda: busy.exchange("end", [0, 1])).start()
        started = time.monotonic()
        waiting.exchange("end", [0, 1])
        assert time.monotonic() - started > 2.5
        busy.stop()
        os.kill(proc.pid, signal.SIGSTOP)  # the store's host stops: its server thread too
        started = time.monotonic()
        with pytest.raises(StoreLostError, match="has not answered for 2 s") as caught:
            waiting.exchange("next", [0, 1])
        assert time.monotonic() - started < 2.0 + 1.5
        assert isinstance(caught.value, PeerLostError)
        assert "retry.peer_timeout_s=2" in str(caught.value) and "stopped, hung or gone" in str(caught.value)
        started = time.monotonic()
        waiting.report_failure("giving up")  # the store is known silent: no second wait
        waiting.stop()
        assert time.monotonic() - started < 3.0
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        waiting.stop()
        busy.stop()


EXIT_RACE = """
import os, signal, subprocess, sys, time
from datetime import timedelta
import torch.distributed as dist
from hvbatch.parallel.liveness import Liveness
from hvbatch.process import run_then_exit

port, server_pid, how, kill_after_s = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
def client():
    return dist.TCPStore("127.0.0.1", port, is_master=False, wait_for_workers=False,
                         timeout=timedelta(seconds=1))
liveness = Liveness(client, 1, interval_s=0.05, peer_timeout_s=30.0).start()
os.kill(server_pid, signal.SIGSTOP)
time.sleep(0.5)  # the heartbeat is now inside a store call that cannot return
liveness.stop(wait_s=0.2)

class SlowFinalisation:  # keeps the interpreter finalising while the stuck call returns
    def __del__(self):
        time.sleep(1.5)

slow = SlowFinalisation()
# The server dies later: the stuck call returns (connection reset) then, during the exit.
subprocess.Popen(["sh", "-c", f"sleep {kill_after_s}; kill -9 {server_pid}"])
if how == "hvbatch-entry-point":
    run_then_exit(lambda: 0)
"""


@pytest.mark.parametrize(
    ("how", "kill_after_s", "code"),
    [("hvbatch-entry-point", 0.5, 0), ("plain-exit", 4.0, 1)],
)
def test_a_store_call_stuck_at_exit_never_aborts_the_process(
    server: tuple[subprocess.Popen[str], int], tmp_path: Path, how: str, kill_after_s: float, code: int
) -> None:
    # Before: the heartbeat thread's call returned during interpreter finalisation, and the process
    # died with `terminate called without an active exception` (exit 134). Now an hvbatch process
    # ends with os._exit; any other process waits up to 2 s for the call to return before
    # finalising, else ends with os._exit(1) and says why.
    proc, port = server
    script = tmp_path / "exit_race.py"
    script.write_text(textwrap.dedent(EXIT_RACE))
    env = dict(os.environ, PYTHONPATH=str(REPO))
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, str(script), str(port), str(proc.pid), how, str(kill_after_s)],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert "terminate called" not in result.stderr, result.stderr[-2000:]
    assert result.returncode == code, result.stderr[-2000:]
    if code:
        assert "a store call never returned" in result.stdout
    assert time.monotonic() - started < 30


RENDEZVOUS = """
import sys, torch
from hvbatch.parallel.launch import DistEnv, init_distributed
env = DistEnv(rank=1, world_size=2, local_rank=0, local_world_size=1, master_addr="127.0.0.1",
              master_port=int(sys.argv[1]))
init_distributed(env, torch.device("cpu"), backend="gloo", timeout_s=2.0)
print("joined")
"""


def test_a_rendezvous_with_a_stopped_rank_0_ends_the_process(
    server: tuple[subprocess.Popen[str], int],
) -> None:
    # init_process_group talks to rank 0's store inside torch, where a stopped server blocks it
    # past its timeout: the process ends at the rendezvous deadline (2 s x 1.2 + 5 s) instead.
    proc, port = server
    os.kill(proc.pid, signal.SIGSTOP)
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", RENDEZVOUS, str(port)],
        capture_output=True, text=True, timeout=120, env=dict(os.environ, PYTHONPATH=str(REPO)),
    )  # fmt: skip
    assert result.returncode == 1 and "joined" not in result.stdout, result.stderr[-2000:]
    assert "rank 1: the rendezvous with rank 0 at 127.0.0.1" in result.stderr, result.stderr[-2000:]
    assert "did not finish within 7 s" in result.stderr
    assert time.monotonic() - started < 7.4 + 20  # the deadline, plus starting Python and torch
