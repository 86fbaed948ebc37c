"""The group leader's mp4 writer: video k is encoded, fsynced and linked while video k+1 denoises.

One worker thread and room for one waiting video: `submit` returns once the video is queued and
blocks while another one already waits, so at most two videos' frames are held (the one being
written and the one waiting) and memory stays flat. Each write runs `commit` (attempt-unique
temporary name, fsync, hard link: `support.commit_video`) and then the request's `on_done` with the
outcome, in the worker thread, so a video's manifest row follows its link at once. A write that
fails is an outcome (`failed`, retried like any failed video); an `on_done` that raises (the
manifest cannot be written) stops the writer and is raised by the next `submit` or `drain`, which
ends the attempt; so does a write that finds the disk full (no video's fault). With
`background=False` each `submit` writes at once, with the same outcomes.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from hvbatch.batch.attempt import VideoStatus
from hvbatch.batch.files import is_disk_full
from hvbatch.batch.runtime.faults import VideoFaults
from hvbatch.text import printable

logger = logging.getLogger(__name__)
COMMITTED_ELSEWHERE = "committed-elsewhere"
"""Another attempt linked the video first: this attempt records nothing for it."""

Commit = Callable[[str, np.ndarray, VideoFaults | None], bool]
"""(video id, `[F, H, W, 3]` uint8 frames, faults) -> False when another attempt committed it first."""


@dataclass(frozen=True)
class WriteOutcome:
    status: str
    """`done`, `committed-elsewhere` or `failed`."""
    error: str | None
    seconds: float
    """Time the encode, fsync and link took."""


@dataclass(frozen=True)
class WriteRequest:
    video_id: str
    frames: np.ndarray
    """`[F, H, W, 3]` uint8."""
    faults: VideoFaults | None
    on_done: Callable[[WriteOutcome], None]


class VideoWriter:
    """Writes videos in submission order, in a worker thread unless `background` is False."""

    def __init__(self, commit: Commit, *, background: bool, poll_s: float = 1.0) -> None:
        self.commit, self.background, self.poll_s = commit, background, poll_s
        self.write_seconds = 0.0
        """Time spent encoding, fsyncing and linking."""
        self.waited_seconds = 0.0
        """Time the caller spent blocked on writes (all of `write_seconds` when not in the background)."""
        self._cond = threading.Condition()
        self._waiting: deque[WriteRequest] = deque()
        self._busy = False
        self._closed = False
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        if background:
            self._thread = threading.Thread(target=self._work, name="hvbatch-mp4-writer", daemon=True)
            self._thread.start()

    @property
    def hidden_share(self) -> float | None:
        """Share of the write time the caller did not wait for (None before any write)."""
        if not self.write_seconds:
            return None
        return max(0.0, 1.0 - self.waited_seconds / self.write_seconds)

    def submit(self, request: WriteRequest) -> None:
        if not self.background:
            self._raise_error()
            start = time.perf_counter()
            self._write(request)
            self.waited_seconds += time.perf_counter() - start
            self._raise_error()
            return
        self._wait_until(lambda: not self._waiting)
        with self._cond:
            self._waiting.append(request)
            self._cond.notify_all()

    def drain(self) -> None:
        """Wait until every submitted video is written and recorded."""
        if self.background:
            self._wait_until(lambda: not self._waiting and not self._busy)
        self._raise_error()

    def close(self) -> None:
        """Drain and stop the worker; never raises (an error was logged, or raised by `drain`)."""
        try:
            self.drain()
        except Exception as err:  # the attempt is ending anyway
            logger.error("the mp4 writer stopped: %s: %s", type(err).__name__, err)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=60)

    def _wait_until(self, ready: Callable[[], bool]) -> None:
        start = time.perf_counter()
        with self._cond:
            while not ready() and self._error is None and (self._thread is None or self._thread.is_alive()):
                self._cond.wait(self.poll_s)
            stopped = not ready() and self._error is None
        self.waited_seconds += time.perf_counter() - start
        self._raise_error()
        if stopped:
            raise RuntimeError("the mp4 writer's thread stopped with videos still to write")

    def _raise_error(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"the mp4 writer failed: {self._error}") from self._error

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._closed:
                    self._cond.wait()
                if not self._waiting:
                    return
                request = self._waiting.popleft()
                self._busy = True
                self._cond.notify_all()
            try:
                self._write(request)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()
            if self._error is not None:
                return

    def _write(self, request: WriteRequest) -> None:
        start = time.perf_counter()
        try:
            committed = self.commit(request.video_id, request.frames, request.faults)
            status, error = (VideoStatus.DONE if committed else COMMITTED_ELSEWHERE), None
        except Exception as err:  # the video failed, not the attempt: retried like any failed video
            logger.error("writing video %s failed:\n%s", printable(request.video_id), traceback.format_exc())
            if is_disk_full(err):  # not the video's fault, and the next write would fail too
                self._stop(err)
                return
            status, error = VideoStatus.FAILED, f"{type(err).__name__}: {err}"
        seconds = time.perf_counter() - start
        self.write_seconds += seconds
        try:
            request.on_done(WriteOutcome(str(status), error, seconds))
        except Exception as err:  # handed to the caller's thread
            video = printable(request.video_id)
            logger.error("recording video %s failed:\n%s", video, traceback.format_exc())
            self._stop(err)

    def _stop(self, err: BaseException) -> None:
        """Hand `err` to the caller's thread, which ends the attempt."""
        with self._cond:
            self._error = err
            self._cond.notify_all()
