"""Small filesystems that fill up on demand (a real tmpfs mount: the suite runs as root), and a
hook that mounts them inside a run directory right after `submit` creates it."""

from __future__ import annotations

import contextlib
import errno
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from hvbatch.batch.control import commands
from hvbatch.batch.rundir import RunDir

FILLER = "filler.bin"


@contextlib.contextmanager
def small_filesystem(where: Path, size_kib: int = 1024) -> Iterator[Path]:
    """A tmpfs of `size_kib` mounted at `where` (created if missing), unmounted on the way out."""
    where.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_kib}k,mode=0755", "tmpfs", str(where)], check=True
    )
    try:
        yield where
    finally:
        # Ranks killed a moment ago may still hold a file open there: fall back to a lazy unmount.
        if subprocess.run(["umount", str(where)], check=False, capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(where)], check=True)


def fill(where: Path) -> Path:
    """Take every free block of the filesystem at `where` (a filler file, written until ENOSPC)."""
    filler = where / FILLER
    with filler.open("ab", buffering=0) as handle:
        for chunk in (1 << 16, 1 << 12, 1):
            with contextlib.suppress(OSError):
                while True:
                    handle.write(b"\0" * chunk)
    probe = where / ".probe"
    with pytest.raises(OSError) as err, probe.open("wb", buffering=0) as handle:
        handle.write(b"\0" * 8192)
    probe.unlink(missing_ok=True)
    assert err.value.errno == errno.ENOSPC
    return filler


def mount_in_new_runs(
    monkeypatch: pytest.MonkeyPatch, stack: contextlib.ExitStack, folders: dict[str, int],
    then: Callable[[RunDir], Any] | None = None,
) -> None:  # fmt: skip
    """When `submit` has created its run directory (and before any job starts), mount a small
    filesystem of `folders[name]` KiB at RUN/<name>; `then(run)` runs after."""
    create_run = commands.create_run

    def create_and_mount(run: RunDir, *args: Any, **kwargs: Any) -> None:
        create_run(run, *args, **kwargs)
        for name, size_kib in folders.items():
            stack.enter_context(small_filesystem(run.root / name, size_kib))
        if then is not None:
            then(run)

    monkeypatch.setattr(commands, "create_run", create_and_mount)


def wait_for(condition: Callable[[], Any], timeout_s: float = 240.0, poll_s: float = 0.05) -> Any:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        with contextlib.suppress(Exception):  # a part being replaced, a folder not made yet
            value = condition()
            if value:
                return value
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {condition}")


FAKE_FFMPEG = """#!/bin/bash
# A stand-in for ffmpeg: its Nth run does what MODES[N] says, then it runs the real one.
n=$(cat {state} 2>/dev/null || echo 0); echo $((n + 1)) > {state}
modes=({modes})
out="${{@: -1}}"
case "${{modes[$n]:-real}}" in
  kill)  # an OOM kill in the middle of the encode: a few bytes written, then SIGKILL
    head -c 20000 > /dev/null; printf 'partial mp4' > "$out"; kill -9 $$ ;;
  short)  # exits 0 but leaves half a file (what a full disk did to the old writer)
    {real} "${{@:1:$(($# - 1))}}" {state}.whole.mp4 || exit 1
    head -c $(( $(stat -c %s {state}.whole.mp4) / 2 )) {state}.whole.mp4 > "$out"; exit 0 ;;
  enospc)  # exits 0 after reporting a failed write
    cat > /dev/null; echo "Error writing trailer: No space left on device" >&2; exit 0 ;;
  *) exec {real} "$@" ;;
esac
"""


def fake_ffmpeg(monkeypatch: pytest.MonkeyPatch, folder: Path, modes: list[str]) -> Path:
    """Point IMAGEIO_FFMPEG_EXE (inherited by the jobs) at a script whose first runs fail as `modes` say."""
    import imageio_ffmpeg

    real = imageio_ffmpeg.get_ffmpeg_exe()
    script = folder / "ffmpeg"
    state = folder / "ffmpeg-runs"
    script.write_text(FAKE_FFMPEG.format(state=state, modes=" ".join(modes), real=real))
    script.chmod(0o755)
    monkeypatch.setenv("IMAGEIO_FFMPEG_EXE", str(script))
    return state
