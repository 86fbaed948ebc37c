"""The leader's background mp4 writer: overlap, a queue of one, outcomes recorded after the write."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from hvbatch.batch.runtime.faults import VideoFaults
from hvbatch.batch.runtime.writer import COMMITTED_ELSEWHERE, VideoWriter, WriteOutcome, WriteRequest

FRAMES = np.zeros((1, 2, 2, 3), dtype=np.uint8)


class FakeCommit:
    """Commits block until released; records what happened in order."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.release: dict[str, threading.Event] = {}

    def __call__(self, video_id: str, frames: np.ndarray, faults: VideoFaults | None) -> bool:
        self.events.append(f"write {video_id}")
        gate = self.release.setdefault(video_id, threading.Event())
        assert gate.wait(10)
        if video_id == "broken":
            raise OSError(30, "read-only file system")
        return video_id != "elsewhere"

    def request(self, video_id: str, outcomes: dict[str, WriteOutcome]) -> WriteRequest:
        def on_done(outcome: WriteOutcome) -> None:
            self.events.append(f"row {video_id}")
            outcomes[video_id] = outcome

        return WriteRequest(video_id, FRAMES, None, on_done)


def _eventually(condition: object, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:  # type: ignore[operator]
        time.sleep(0.01)
    assert condition(), condition  # type: ignore[operator]


def test_writes_run_behind_the_caller_with_at_most_one_waiting() -> None:
    commit, outcomes = FakeCommit(), {}
    writer = VideoWriter(commit, background=True, poll_s=0.05)
    writer.submit(commit.request("a", outcomes))  # returns while `a` is being written
    _eventually(lambda: commit.events == ["write a"])
    writer.submit(commit.request("b", outcomes))  # waits in the queue
    third = threading.Thread(target=writer.submit, args=(commit.request("c", outcomes),))
    third.start()
    time.sleep(0.2)
    assert third.is_alive()  # a second waiting video is refused until `a` is done: memory stays flat
    assert commit.events == ["write a"]
    commit.release.setdefault("a", threading.Event()).set()
    third.join(5)
    assert not third.is_alive()
    for name in ("b", "c"):
        commit.release.setdefault(name, threading.Event()).set()
    writer.drain()
    # Each video's outcome is recorded right after its own write, in submission order.
    assert commit.events == ["write a", "row a", "write b", "row b", "write c", "row c"]
    assert all(o.status == "done" and o.error is None for o in outcomes.values())
    assert writer.hidden_share is not None and writer.waited_seconds < writer.write_seconds
    writer.close()


@pytest.mark.parametrize("background", [True, False])
def test_a_failed_write_is_an_outcome_and_a_failed_record_ends_the_writer(background: bool) -> None:
    commit, outcomes = FakeCommit(), {}
    for name in ("broken", "elsewhere", "ok", "later"):
        commit.release[name] = threading.Event()
        commit.release[name].set()
    writer = VideoWriter(commit, background=background, poll_s=0.05)
    writer.submit(commit.request("broken", outcomes))
    writer.submit(commit.request("elsewhere", outcomes))
    writer.drain()
    assert outcomes["broken"].status == "failed"
    assert outcomes["broken"].error == "OSError: [Errno 30] read-only file system"
    assert outcomes["elsewhere"].status == COMMITTED_ELSEWHERE

    def unrecordable(outcome: WriteOutcome) -> None:
        raise OSError("manifest part cannot be written")

    with pytest.raises(RuntimeError, match="mp4 writer failed: manifest part cannot be written"):
        writer.submit(WriteRequest("ok", FRAMES, None, unrecordable))
        writer.drain()
    with pytest.raises(RuntimeError, match="mp4 writer failed"):  # the attempt must end
        writer.submit(commit.request("later", outcomes))
    assert "later" not in outcomes
    writer.close()  # logs, never raises: the attempt is already ending
