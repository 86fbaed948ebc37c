"""Frames to mp4 (H.264, yuv420p) with imageio-ffmpeg's ffmpeg, written under a temporary name and renamed.

A reader never sees a half-written video under its final name: the encoder writes
`.<name>.<pid>.tmp.mp4` in the same folder, and only a finished file that reads back whole
(`hvbatch.mp4_check`) is renamed into place. The batch runner commits through
`hvbatch.batch.runtime.support.commit_video` instead (hard link, never replacing a video).
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import threading
from fractions import Fraction
from pathlib import Path
from typing import BinaryIO

import imageio.v2 as imageio
import imageio_ffmpeg
import numpy as np
import torch

from hvbatch.config import VideoConfig
from hvbatch.mp4_check import check_mp4_file


def frames_to_uint8(video_BCFHW: torch.Tensor) -> np.ndarray:
    """Decoded video in [0, 1], `[1, 3, F, H, W]` -> `[F, H, W, 3]` uint8 (batch 1 only)."""
    if video_BCFHW.ndim != 5 or video_BCFHW.shape[0] != 1 or video_BCFHW.shape[1] != 3:
        raise ValueError(f"expected a [1, 3, F, H, W] video, got {tuple(video_BCFHW.shape)}")
    pixels = (video_BCFHW[0].float().clamp(0, 1) * 255).round().to(torch.uint8)
    return pixels.permute(1, 2, 3, 0).cpu().numpy()


def _temporary_sibling(path: Path, suffix: str) -> Path:
    return path.with_name(f".{path.stem}.{os.getpid()}.tmp{suffix}")


def write_png(frame_HW3: np.ndarray, path: str | Path) -> Path:
    path = Path(path)
    tmp = _temporary_sibling(path, ".png")
    try:
        imageio.imwrite(tmp, frame_HW3, format="png")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


class EncodeError(RuntimeError):
    """ffmpeg failed, or was killed, while encoding: the file it left is not a video."""


DISK_FULL_TEXTS = ("no space left on device", "disk quota exceeded")
STDERR_KEEP_BYTES = 16 << 10


def _ffmpeg_command(height: int, width: int, config: VideoConfig, target: str) -> list[str]:
    """The command imageio-ffmpeg's writer runs, with mp4 named explicitly (the target may be a
    descriptor's /dev/fd path)."""
    fps = str(Fraction(config.fps).limit_denominator())
    return [
        imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-f", "rawvideo", "-vcodec", "rawvideo",
        "-s", f"{width}x{height}", "-pix_fmt", "rgb24", "-r", fps, "-i", "-", "-an",
        "-vcodec", "libx264", "-pix_fmt", "yuv420p", "-crf", str(config.crf), "-preset", config.preset,
        "-v", "error", "-f", "mp4", target,
    ]  # fmt: skip


def _keep_tail(stream: BinaryIO, tail: bytearray) -> None:
    for chunk in iter(lambda: stream.read(4096), b""):
        tail.extend(chunk)
        del tail[:-STDERR_KEEP_BYTES]


def encode_mp4(
    frames_FHW3: np.ndarray, out: str | Path | BinaryIO, config: VideoConfig | None = None
) -> None:
    """Encode `[F, H, W, 3]` uint8 frames into `out` (a path, or an open file that ffmpeg writes
    through its descriptor); callers make it atomic.

    ffmpeg's exit status and its error output are checked: a killed or failing encoder raises
    `EncodeError`, and a full disk (ENOSPC / EDQUOT in its errors, e.g. `Error writing trailer: No
    space left on device`) raises OSError(ENOSPC), whatever the exit status.
    """
    config = config or VideoConfig()
    if frames_FHW3.dtype != np.uint8 or frames_FHW3.ndim != 4 or frames_FHW3.shape[-1] != 3:
        raise ValueError(f"expected uint8 frames [F, H, W, 3], got {frames_FHW3.dtype} {frames_FHW3.shape}")
    height, width = frames_FHW3.shape[1:3]
    if height % 2 or width % 2:
        raise ValueError(f"yuv420p needs even sizes, got {height}x{width}")
    fds: tuple[int, ...] = ()
    if isinstance(out, (str, Path)):
        target = str(out)
    else:
        fds = (out.fileno(),)
        target = f"/dev/fd/{fds[0]}"
    command = _ffmpeg_command(height, width, config, target)
    process = subprocess.Popen(
        command, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, pass_fds=fds
    )
    assert process.stdin is not None and process.stderr is not None
    tail = bytearray()
    reader = threading.Thread(target=_keep_tail, args=(process.stderr, tail), daemon=True)
    reader.start()
    try:
        for frame in frames_FHW3:
            process.stdin.write(np.ascontiguousarray(frame).data)
        process.stdin.close()
    except (BrokenPipeError, ConnectionResetError):
        pass  # ffmpeg is gone: its exit status says why
    finally:
        with contextlib.suppress(OSError):
            process.stdin.close()
        status = process.wait()
        reader.join(timeout=30)
    _check_encoder(status, bytes(tail).decode("utf-8", "replace"))


def _check_encoder(status: int, stderr: str) -> None:
    errors = " | ".join(line.strip() for line in stderr.splitlines() if line.strip())[-2000:]
    if any(text in stderr.lower() for text in DISK_FULL_TEXTS):
        raise OSError(errno.ENOSPC, f"ffmpeg could not write the mp4: {errors}")
    if status < 0:
        raise EncodeError(
            f"ffmpeg was killed by {signal.Signals(-status).name} while encoding"
            + (f": {errors}" if errors else "")
        )
    if status:
        raise EncodeError(f"ffmpeg exited with status {status}" + (f": {errors}" if errors else ""))


def write_mp4(frames_FHW3: np.ndarray, path: str | Path, config: VideoConfig | None = None) -> Path:
    """Encode `[F, H, W, 3]` uint8 frames to `path` atomically; H and W must be even (yuv420p)."""
    config = config or VideoConfig()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_sibling(path, ".mp4")
    try:
        encode_mp4(frames_FHW3, tmp, config)
        frames, height, width = frames_FHW3.shape[:3]
        check_mp4_file(tmp, frames=frames, width=width, height=height)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    if config.save_first_frame:
        write_png(frames_FHW3[0], path.with_suffix(".png"))
    return path
