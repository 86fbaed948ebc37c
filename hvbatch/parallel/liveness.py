"""Telling a busy peer from a dead one: heartbeats, and waits that are not collectives.

On a GPU node ranks finish minutes apart: one dp replica's last video ends long after the
other's, and the leader of a sequence-parallel group decodes and writes while its peers wait.
A collective would fail such a wait once `parallel.timeout_s` passes. So every wait outside the
lock-step denoising loop goes through the job's rendezvous store (the TCPStore that
`init_process_group` already runs on rank 0) instead:

- each rank's heartbeat thread bumps a counter in the store every `interval_s`, and says what the
  rank is doing (`video fox step 12/50`, `writing fox`);
- `exchange` publishes this rank's value and waits, without a deadline, until every peer has
  published its own, as long as each peer's counter keeps moving; a peer silent for
  `peer_timeout_s`, or one that reported its own failure, ends the wait with `PeerLostError`.

A peer that is alive but stuck is caught by its own watchdog (`retry.stall_timeout_s`), which
ends its process, so its heartbeat stops too. Collectives keep a short timeout for real hangs.

Every store call goes through `hvbatch.parallel.store.DeadlineStore` with `peer_timeout_s` of
patience: a store that does not answer (rank 0, its host, stopped or hung) ends a wait as a peer
lost within `peer_timeout_s`, and a call that fails is retried meanwhile. The heartbeat thread
likewise rides out store errors (counted, logged once) and stops only when the store has been
silent for `peer_timeout_s`; a busy rank's heartbeat keeps moving, since the thread needs nothing
but the GIL now and then.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from hvbatch.parallel.store import DeadlineStore, StoreUnresponsive

logger = logging.getLogger(__name__)
PREFIX = "hvbatch/"
POLL_S = 0.05
REPORT_PATIENCE_S = 5.0  # a failing rank's last word to its peers: worth a few seconds, no more


class PeerLostError(RuntimeError):
    """A peer stopped sending heartbeats, reported a failure, or the job's store went away."""


class StoreLostError(PeerLostError):
    """The job's store (on rank 0) stopped answering: rank 0 is stopped, hung or gone."""


def _client(host: str, port: int, timeout_s: float) -> dist.TCPStore:
    timeout = timedelta(seconds=timeout_s)
    return dist.TCPStore(host, port, is_master=False, timeout=timeout, wait_for_workers=False)


class Liveness:
    """This rank's heartbeat, and store-based waits for its peers (see the module docstring)."""

    def __init__(
        self,
        store_factory: Callable[[], Any],
        rank: int,
        *,
        interval_s: float,
        peer_timeout_s: float,
        on_wait: Callable[[], None] | None = None,
        where: str = "",
    ) -> None:
        self.rank = rank
        self.interval_s = interval_s
        self.peer_timeout_s = peer_timeout_s
        self.on_wait = on_wait
        self.doing = "starting"
        self.where = where
        self._store = DeadlineStore(store_factory, patience_s=peer_timeout_s, name="waits", where=where)
        # The heartbeat thread's own connection: a wait in progress never delays a beat.
        self._beat_store = DeadlineStore(
            store_factory, patience_s=peer_timeout_s, name="heartbeat", where=where
        )
        self._sequence: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="hvbatch-heartbeat", daemon=True)
        self.heartbeat_error: str | None = None
        """Why the heartbeat thread stopped before `stop`, if it did."""

    @classmethod
    def for_job(cls, host: str, port: int, rank: int, **kwargs: Any) -> Liveness:
        timeout_s, where = kwargs["peer_timeout_s"], f" on {host}:{port} (rank 0)"
        return cls(lambda: _client(host, port, timeout_s), rank, where=where, **kwargs)

    @property
    def store_errors(self) -> int:
        """Store calls that failed and were retried, on both connections."""
        return self._store.errors + self._beat_store.errors

    def start(self) -> Liveness:
        self._call(lambda: self._store.add(f"{PREFIX}hb/{self.rank}", 1))
        self._thread.start()
        return self

    def stop(self, wait_s: float = 2.0) -> None:
        """Stop the heartbeat and close both connections; returns within about `wait_s`."""
        self._stop.set()
        self._beat_store.close(wait_s)  # a beat waiting on the store gives up at once
        if self._thread.is_alive():
            self._thread.join(wait_s)
        self._store.close(wait_s)

    def _beat(self) -> None:
        said = None
        while not self._stop.wait(self.interval_s):
            try:
                self._beat_store.add(f"{PREFIX}hb/{self.rank}", 1)
                if self.doing != said:
                    self._beat_store.set(f"{PREFIX}doing/{self.rank}", self.doing)
                    said = self.doing
            except StoreUnresponsive as err:  # silent for peer_timeout_s: errors were retried meanwhile
                if not self._stop.is_set():
                    self.heartbeat_error = str(err)
                    logger.error("rank %d: heartbeat stopped: %s", self.rank, err)
                return

    def report_failure(self, message: str) -> None:
        """Tell waiting peers at once that this rank is failing (best effort, a few seconds at most)."""
        try:
            patience = min(REPORT_PATIENCE_S, self.peer_timeout_s)
            self._store.call(lambda store: store.set(f"{PREFIX}dead/{self.rank}", message[:500]), patience)
        except StoreUnresponsive:
            logger.debug("could not report the failure to the store", exc_info=True)

    def _call(self, fn: Callable[[], Any]) -> Any:
        """A store call of this rank's waits; a store that stopped answering is a lost peer."""
        try:
            return fn()
        except StoreUnresponsive as err:
            raise StoreLostError(
                f"{err} (retry.peer_timeout_s={self.peer_timeout_s:g}): rank 0, which hosts it, "
                "is stopped, hung or gone"
            ) from err

    def exchange(self, scope: str, ranks: list[int], value: Any = None) -> dict[int, Any]:
        """Publish `value`, wait for every rank of `ranks` to publish theirs, return them all.

        All ranks of `ranks` call `exchange` with the same `scope` in the same order.
        """
        number = self._sequence.get(scope, 0)
        self._sequence[scope] = number + 1
        keys = {rank: f"{PREFIX}x/{scope}/{number}/{rank}" for rank in ranks}

        def exchange() -> dict[int, Any]:
            self._store.set(keys[self.rank], json.dumps(value))
            self._wait_for(keys, ranks)
            values = {rank: json.loads(self._store.get(key)) for rank, key in keys.items()}
            if number:  # everyone has read the previous round: it has published this one
                self._store.delete_key(f"{PREFIX}x/{scope}/{number - 1}/{self.rank}")
            return values

        return self._call(exchange)

    def barrier(self, scope: str, ranks: list[int]) -> None:
        self.exchange(scope, ranks)

    def _wait_for(self, keys: dict[int, str], ranks: list[int]) -> None:
        """Block until every peer's key is set; between arrivals, check that the missing are alive."""
        peers = [rank for rank in ranks if rank != self.rank]
        last_count = {rank: -1 for rank in peers}
        last_change = {rank: time.monotonic() for rank in peers}
        logged = checked = time.monotonic()
        while True:
            waiting = [rank for rank in peers if not self._store.check([keys[rank]])]
            if not waiting:
                return
            # One cheap check of the first missing key per poll; the liveness checks once a second.
            while time.monotonic() - checked < 1.0 and not self._store.check([keys[waiting[0]]]):
                time.sleep(POLL_S)
            now = checked = time.monotonic()
            for rank in waiting:
                self._check_alive(rank, now, last_count, last_change)
            if self.on_wait is not None:
                self.on_wait()  # every peer we wait for is alive: waiting is progress
            if now - logged > 300:
                logged = now
                busy = ", ".join(f"rank {r}: {self._doing(r)}" for r in waiting[:8])
                logger.info("rank %d waiting for %d busy peers (%s)", self.rank, len(waiting), busy)

    def _check_alive(
        self, rank: int, now: float, last_count: dict[int, int], last_change: dict[int, float]
    ) -> None:
        if self._store.check([f"{PREFIX}dead/{rank}"]):
            reason = self._store.get(f"{PREFIX}dead/{rank}").decode(errors="replace")
            raise PeerLostError(f"rank {rank} failed: {reason}")
        count = self._store.add(f"{PREFIX}hb/{rank}", 0)
        if count != last_count[rank]:
            last_count[rank], last_change[rank] = count, now
        elif now - last_change[rank] > self.peer_timeout_s:
            raise PeerLostError(
                f"rank {rank} sent no heartbeat for {now - last_change[rank]:.0f} s "
                f"(retry.peer_timeout_s={self.peer_timeout_s:g}); last seen: {self._doing(rank)}"
            )

    def _doing(self, rank: int) -> str:
        key = f"{PREFIX}doing/{rank}"
        return self._store.get(key).decode(errors="replace") if self._store.check([key]) else "unknown"
