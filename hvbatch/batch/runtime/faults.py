"""Fault injection: make a chosen rank fail at a chosen video and step, to test and rehearse recovery.

A spec is one or more faults separated by `;`, each a comma-separated list of `key=value`:

    action=kill,rank=1,video=0,step=2,attempt=1

- `action`: `raise` (RuntimeError), `oom` (torch.cuda.OutOfMemoryError), `nan` (the video's guidance
  becomes NaN, so the model itself produces NaN), `hang` (sleep forever), `exit` (os._exit(3)),
  `kill` (SIGKILL to itself), `write-error` (OSError while the mp4 is written), `slow` (a busy
  rank: `seconds` of work at the step), `slow-write` (`seconds` more to write the mp4, before the
  encode starts) and `port-busy` (before the rendezvous the rank listens on the job's
  MASTER_PORT itself, so rank 0's store cannot bind it: a port another process holds; matched by
  `rank`, `attempt` and the job's first unfinished `shard`).
- `rank` (default 0, or `all`), `shard`, `video` (position in the shard's file order, or the video id),
  `step` (denoising step, 1-based; default 1), `attempt` (shard attempt, 1-based): a key left out
  matches everything. `seconds` (default 30) is how long `slow` and `slow-write` take.

Set with the `fault` config key or the HVBATCH_FAULT environment variable (which wins). With no spec
the job holds `None` and never calls into this module.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from dataclasses import dataclass

import torch

ACTIONS = ("raise", "oom", "nan", "hang", "exit", "kill", "write-error", "slow", "slow-write", "port-busy")
ENV_VAR = "HVBATCH_FAULT"
EXIT_CODE = 3


class InjectedFault(RuntimeError):
    """The error an injected `raise` fault throws."""


@dataclass(frozen=True)
class Fault:
    action: str
    rank: int | None = 0  # None: every rank
    shard: int | None = None
    video: str | None = None
    step: int = 1
    attempt: int | None = None
    seconds: float = 30.0

    def matches(self, *, rank: int, shard: int, video_index: int, video_id: str, attempt: int) -> bool:
        return (
            (self.rank is None or self.rank == rank)
            and (self.shard is None or self.shard == shard)
            and (self.video is None or self.video in (str(video_index), video_id))
            and (self.attempt is None or self.attempt == attempt)
        )


def _parse_one(text: str) -> Fault:
    fields: dict[str, str] = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"fault {text!r}: {item!r} is not key=value")
        fields[key.strip()] = value.strip()
    unknown = set(fields) - {"action", "rank", "shard", "video", "step", "attempt", "seconds"}
    if unknown:
        raise ValueError(f"fault {text!r}: unknown keys {sorted(unknown)}")
    action = fields.get("action")
    if action not in ACTIONS:
        raise ValueError(f"fault {text!r}: action must be one of {', '.join(ACTIONS)}")
    try:
        return Fault(
            action=action,
            rank=None if fields.get("rank") == "all" else int(fields.get("rank", 0)),
            shard=int(fields["shard"]) if "shard" in fields else None,
            video=fields.get("video"),
            step=int(fields.get("step", 1)),
            attempt=int(fields["attempt"]) if "attempt" in fields else None,
            seconds=float(fields.get("seconds", 30.0)),
        )
    except ValueError as err:
        raise ValueError(
            f"fault {text!r}: rank, shard, step and attempt are integers, seconds a number ({err})"
        ) from err


def parse_faults(spec: str) -> list[Fault]:
    return [_parse_one(part) for part in spec.split(";") if part.strip()]


@dataclass(frozen=True)
class VideoFaults:
    """The faults that apply to one video on this rank in this attempt."""

    faults: tuple[Fault, ...]

    @property
    def nan(self) -> bool:
        return any(f.action == "nan" for f in self.faults)

    def at_step(self, step: int) -> None:
        for fault in self.faults:
            if fault.step == step and fault.action not in ("nan", "write-error", "slow-write"):
                _fire(fault)

    def at_write(self) -> None:
        for fault in self.faults:
            if fault.action == "slow-write":
                print(f"hvbatch: injecting fault {fault}", flush=True)
                time.sleep(fault.seconds)
        if any(f.action == "write-error" for f in self.faults):
            raise OSError(30, "injected write failure (read-only file system)")


def _fire(fault: Fault) -> None:
    print(f"hvbatch: injecting fault {fault}", flush=True)
    if fault.action == "raise":
        raise InjectedFault(f"injected fault at step {fault.step}")
    if fault.action == "oom":
        raise torch.cuda.OutOfMemoryError("injected out-of-memory")
    if fault.action == "slow":
        time.sleep(fault.seconds)
    if fault.action == "hang":
        while True:
            time.sleep(3600)
    if fault.action == "exit":
        os._exit(EXIT_CODE)
    if fault.action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass(frozen=True)
class FaultInjector:
    faults: tuple[Fault, ...]

    @classmethod
    def from_spec(cls, config_spec: str) -> FaultInjector | None:
        spec = os.environ.get(ENV_VAR, config_spec)
        faults = parse_faults(spec or "")
        return cls(tuple(faults)) if faults else None

    def hold_port(self, addr: str, port: int, *, rank: int, shard: int, attempt: int) -> socket.socket | None:
        """A listening socket on the rendezvous port when a `port-busy` fault matches (else None)."""
        chosen = [
            f
            for f in self.faults
            if f.action == "port-busy"
            and (f.rank is None or f.rank == rank)
            and (f.shard is None or f.shard == shard)
            and (f.attempt is None or f.attempt == attempt)
        ]
        if not chosen:
            return None
        print(f"hvbatch: injecting fault {chosen[0]}", flush=True)
        holder = socket.socket()
        holder.bind((addr, port))
        holder.listen()
        return holder

    def for_video(
        self, *, rank: int, shard: int, video_index: int, video_id: str, attempt: int
    ) -> VideoFaults | None:
        chosen = tuple(
            f
            for f in self.faults
            if f.action != "port-busy"
            and f.matches(rank=rank, shard=shard, video_index=video_index, video_id=video_id, attempt=attempt)
        )
        return VideoFaults(chosen) if chosen else None
