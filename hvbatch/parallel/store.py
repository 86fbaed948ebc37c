"""Store calls with a deadline the caller enforces itself.

A TCPStore client call against a server that is stopped (SIGSTOP) or hung blocks in C++ for as
long as the server stays so, whatever the store's own timeout: `check`, `get` and `add` were
measured blocked past 95 s with a 2 s timeout. Rank 0 hosts the job's store, so one stopped rank
0 would hold every other rank until the 30-minute stall watchdog.

`DeadlineStore` runs each call on a worker thread that owns the connection, and waits for it
with a timeout:

- A call that fails (connection reset or refused) is retried on a new connection after a short
  pause; a call that does not return is abandoned. Either way the call raises `StoreUnresponsive`
  once the store has not answered for `patience_s` (what `retry.peer_timeout_s` allows a peer):
  the caller's wait is bounded by the store's silence, never by how long a peer is busy (the
  store's server is a C++ thread that answers while its rank decodes or loads weights).
- A hung C++ call cannot be cancelled. Its worker is abandoned with its connection, and while it
  is still stuck the store refuses new calls at once instead of starting another worker: at most
  one stuck thread and one socket per `DeadlineStore`, however long the outage. A worker whose
  call returns late exits by itself.
- Workers are daemon threads, so they never hold up the process's exit; hvbatch's processes end
  through `hvbatch.process` (`os._exit` after Python's clean-up), so a call that returns during
  interpreter finalisation cannot abort the process either. `close` stops the worker and waits
  for it briefly; an atexit hook ends a process that still has a call in flight the same way.

Errors are counted (`errors`); the first of an outage is logged, and so is the recovery.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)
RETRY_PAUSE_S = 0.5
MIN_TRY_S = 0.5  # what a call gets when an outage already used up the patience
CLOSE_WAIT_S = 2.0
IN_CALL_JOIN_S = 0.2  # a worker in a call: a healthy store answers in milliseconds


class StoreUnresponsive(RuntimeError):
    """The store did not answer within the caller's patience (its host stopped, hung or gone)."""


@dataclass
class _Call:
    fn: Callable[[Any], Any]
    done: threading.Event = field(default_factory=threading.Event)
    value: Any = None
    error: BaseException | None = None


class _Worker:
    """A thread that owns one store connection and runs calls on it, one at a time."""

    def __init__(self, connect: Callable[[], Any], name: str) -> None:
        self.connect = connect
        self.calls: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self.in_call = False
        self.thread = threading.Thread(target=self._run, name=f"hvbatch-store-{name}", daemon=True)
        with _WORKERS_LOCK:
            _WORKERS.add(self)
        self.thread.start()

    def _run(self) -> None:
        client = None
        try:
            while (call := self.calls.get()) is not None:
                self.in_call = True
                try:
                    client = client if client is not None else self.connect()
                    call.value = call.fn(client)
                except BaseException as err:
                    call.error, client = err, None  # a failed connection is not reused
                finally:
                    self.in_call = False
                    call.done.set()
        finally:
            with _WORKERS_LOCK:
                _WORKERS.discard(self)

    def stop(self) -> None:
        self.calls.put(None)


_WORKERS: set[_Worker] = set()  # the live workers, abandoned ones included
_WORKERS_LOCK = threading.Lock()


class DeadlineStore:
    """`set`, `get`, `add`, `check`, `delete_key` of a store, each bounded by `patience_s` of
    silence from the store (see the module docstring). Use from one thread at a time."""

    def __init__(self, connect: Callable[[], Any], *, patience_s: float, name: str, where: str = "") -> None:
        self.connect, self.patience_s, self.name, self.where = connect, patience_s, name, where
        self.errors = 0
        self._outage_since: float | None = None  # the first unanswered call of an ongoing outage
        self._worker: _Worker | None = None
        self._current: _Call | None = None
        self._abandoned: _Worker | None = None
        self._closed = threading.Event()
        self._outage_logged = False

    def set(self, key: str, value: str | bytes) -> None:
        self.call(lambda store: store.set(key, value))

    def get(self, key: str) -> bytes:
        return self.call(lambda store: store.get(key))

    def add(self, key: str, amount: int) -> int:
        return int(self.call(lambda store: store.add(key, amount)))

    def check(self, keys: list[str]) -> bool:
        return bool(self.call(lambda store: store.check(keys)))

    def delete_key(self, key: str) -> bool:
        return bool(self.call(lambda store: store.delete_key(key)))

    def call(self, fn: Callable[[Any], Any], patience_s: float | None = None) -> Any:
        """`fn(store)` on the worker's connection; retried until the store has been failing or
        silent for `patience_s` (default: the store's), then `StoreUnresponsive`."""
        patience = self.patience_s if patience_s is None else patience_s
        outage_start = self._outage_since if self._outage_since is not None else time.monotonic()
        deadline = outage_start + patience
        last_error: BaseException | None = None
        tried = False
        while not self._closed.is_set():
            left = deadline - time.monotonic()
            if tried and left <= 0:
                break
            if self._abandoned is not None and self._abandoned.thread.is_alive():
                break  # an earlier call is still stuck in the store: it has not answered since
            self._abandoned = None
            worker = self._worker = self._worker or _Worker(self.connect, self.name)
            call = self._current = _Call(fn)
            worker.calls.put(call)
            tried = True
            self._outage_since = outage_start  # until it answers
            if not call.done.wait(max(left, MIN_TRY_S)) or self._closed.is_set():
                self._abandon(worker)
                break
            if call.error is None:
                self._answered()
                return call.value
            last_error = call.error
            self._note_error(call.error)
            self._closed.wait(min(RETRY_PAUSE_S, max(0.0, deadline - time.monotonic())))
        raise self._unresponsive(outage_start, last_error)

    def _answered(self) -> None:
        self._outage_since = None
        if self._outage_logged:
            logger.warning("store %s%s answers again (after %d errors)", self.name, self.where, self.errors)
            self._outage_logged = False

    def _note_error(self, error: BaseException) -> None:
        self.errors += 1
        if not self._outage_logged:
            self._outage_logged = True
            first_line = str(error).splitlines()[0][:300] if str(error) else ""
            logger.warning(
                "store %s%s: %s: %s (retrying for up to %g s)",
                self.name, self.where, type(error).__name__, first_line, self.patience_s,
            )  # fmt: skip

    def _abandon(self, worker: _Worker) -> None:
        """Leave a worker stuck in a call: it exits when (if) the call returns."""
        worker.stop()
        self._abandoned, self._worker = worker, None

    def _unresponsive(self, outage_start: float, last_error: BaseException | None) -> StoreUnresponsive:
        if self._closed.is_set():
            return StoreUnresponsive(f"store {self.name}{self.where} was closed")
        silent = time.monotonic() - outage_start
        text = str(last_error).splitlines()[0][:200] if str(last_error) else ""
        cause = f"; last error: {type(last_error).__name__}: {text}"
        return StoreUnresponsive(
            f"the job's store{self.where} has not answered for {silent:.0f} s"
            + (cause if last_error is not None else "")
        )

    def close(self, wait_s: float = CLOSE_WAIT_S) -> None:
        """Stop the worker (a caller waiting in another thread gets `StoreUnresponsive` at once)."""
        self._closed.set()
        if self._current is not None:  # wake a caller waiting for its call
            self._current.done.set()
        worker, self._worker = self._worker, None
        if worker is not None:
            worker.stop()
            worker.thread.join(min(wait_s, IN_CALL_JOIN_S) if worker.in_call else wait_s)


@contextlib.contextmanager
def exit_unless_done_within(timeout_s: float, what: str) -> Iterator[None]:
    """For a blocking call that cannot be given a deadline of its own (`init_process_group`
    talks to rank 0's store inside torch): if it has not returned after `timeout_s`, say what
    hung and end the process (exit 1), as srun or the local supervisor then ends the attempt."""
    done = threading.Event()

    def watch() -> None:
        if not done.wait(timeout_s):
            from hvbatch import process

            print(
                f"hvbatch: {what} did not finish within {timeout_s:.0f} s; exiting",
                file=sys.stderr,
                flush=True,
            )
            process.exit_now(1)

    threading.Thread(target=watch, name="hvbatch-deadline", daemon=True).start()
    try:
        yield
    finally:
        done.set()


def calls_in_flight() -> int:
    """Store calls still running in some worker (abandoned ones included)."""
    with _WORKERS_LOCK:
        return sum(1 for worker in _WORKERS if worker.in_call)


def _exit_if_a_call_is_stuck() -> None:
    """At interpreter exit: a call still in the store would abort finalisation when it returns."""
    from hvbatch import process

    if process.exit_is_armed():
        return  # the process ends with os._exit anyway
    deadline = time.monotonic() + CLOSE_WAIT_S
    while calls_in_flight() and time.monotonic() < deadline:
        time.sleep(0.05)
    if calls_in_flight():
        print("hvbatch: a store call never returned; exiting without interpreter teardown", flush=True)
        process.exit_now(1)


atexit.register(_exit_if_a_call_is_stuck)
