"""Frames to mp4 (H.264, yuv420p) through imageio-ffmpeg, written under a temporary name and renamed.

A reader never sees a half-written video under its final name: the encoder writes
`.<name>.<pid>.tmp.mp4` in the same folder, and only a finished file is renamed into place.
"""

from __future__ import annotations

import os
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import torch

from hvbatch.config import VideoConfig


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


def encode_mp4(frames_FHW3: np.ndarray, path: str | Path, config: VideoConfig | None = None) -> None:
    """Encode `[F, H, W, 3]` uint8 frames straight into `path` (callers make it atomic)."""
    config = config or VideoConfig()
    if frames_FHW3.dtype != np.uint8 or frames_FHW3.ndim != 4 or frames_FHW3.shape[-1] != 3:
        raise ValueError(f"expected uint8 frames [F, H, W, 3], got {frames_FHW3.dtype} {frames_FHW3.shape}")
    height, width = frames_FHW3.shape[1:3]
    if height % 2 or width % 2:
        raise ValueError(f"yuv420p needs even sizes, got {height}x{width}")
    writer = imageio.get_writer(
        path,
        format="FFMPEG",
        fps=config.fps,
        codec="libx264",
        pixelformat="yuv420p",
        quality=None,
        macro_block_size=1,
        ffmpeg_params=["-crf", str(config.crf), "-preset", config.preset],
        ffmpeg_log_level="error",
    )
    with writer:
        for frame in frames_FHW3:
            writer.append_data(frame)


def write_mp4(frames_FHW3: np.ndarray, path: str | Path, config: VideoConfig | None = None) -> Path:
    """Encode `[F, H, W, 3]` uint8 frames to `path` atomically; H and W must be even (yuv420p)."""
    config = config or VideoConfig()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_sibling(path, ".mp4")
    try:
        encode_mp4(frames_FHW3, tmp, config)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    if config.save_first_frame:
        write_png(frames_FHW3[0], path.with_suffix(".png"))
    return path
