"""First-frame JPEG thumbnails of the run's mp4s, cached in the run directory between reports."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import imageio_ffmpeg
import pyarrow as pa

from hvbatch.batch.files import CorruptRunFile, read_parquet, write_parquet_atomic
from hvbatch.batch.rundir import RunDir

THUMB_WIDTH = 96
"""Pixels; about 1.5 KB of JPEG for a 16:9 frame, so 10,000 videos embed in ~20 MB of HTML."""
JPEG_QUALITY = 7  # ffmpeg's mjpeg -q:v scale: 2 (best) .. 31
CACHE_NAME = "report-thumbnails.parquet"
CACHE_SCHEMA = pa.schema([("path", pa.string()), ("key", pa.string()), ("jpeg", pa.binary())])


def first_frame_jpeg(mp4: Path, width: int = THUMB_WIDTH) -> bytes | None:
    """The first frame scaled to `width` pixels wide, as JPEG bytes; None if ffmpeg cannot read it."""
    command = [
        imageio_ffmpeg.get_ffmpeg_exe(), "-nostdin", "-v", "error", "-i", str(mp4), "-frames:v", "1",
        "-vf", f"scale={width}:-2", "-f", "image2pipe", "-c:v", "mjpeg", "-q:v", str(JPEG_QUALITY), "-",
    ]  # fmt: skip
    try:
        result = subprocess.run(command, capture_output=True, timeout=120, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout if result.returncode == 0 and result.stdout else None


def _file_key(path: Path) -> str | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return f"{stat.st_size}:{stat.st_mtime_ns}"


def _read_cache(run: RunDir) -> dict[str, tuple[str, bytes]]:
    with contextlib.suppress(CorruptRunFile, FileNotFoundError):  # a bad cache is rebuilt
        table = read_parquet(run.root / CACHE_NAME)
        if table.schema.equals(CACHE_SCHEMA):
            return {row["path"]: (row["key"], row["jpeg"]) for row in table.to_pylist()}
    return {}


def thumbnails(run: RunDir, paths: list[str], workers: int | None = None) -> dict[str, bytes]:
    """JPEG bytes per run-relative mp4 path (unreadable files are left out).

    Thumbnails of files unchanged since the last report (same size and mtime) come from
    `report-thumbnails.parquet`; the others are made by ffmpeg, several at once.
    """
    cache = _read_cache(run)
    keys = {path: _file_key(run.root / path) for path in paths}
    found = {p: cache[p][1] for p, key in keys.items() if key and p in cache and cache[p][0] == key}
    missing = [p for p, key in keys.items() if key and p not in found]
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:  # each thread waits on an ffmpeg process
        made = dict(zip(missing, pool.map(lambda p: first_frame_jpeg(run.root / p), missing), strict=True))
    found |= {path: jpeg for path, jpeg in made.items() if jpeg}
    if missing:
        rows = [{"path": p, "key": keys[p], "jpeg": jpeg} for p, jpeg in found.items()]
        with contextlib.suppress(OSError):  # a read-only run directory: the cache is optional
            write_parquet_atomic(run.root / CACHE_NAME, pa.Table.from_pylist(rows, schema=CACHE_SCHEMA))
    return found


def input_image_jpeg(path: Path, width: int = THUMB_WIDTH) -> bytes | None:
    """A frozen input image scaled to `width` pixels wide, as JPEG bytes; None if unreadable."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as image:
            rgb = ImageOps.exif_transpose(image).convert("RGB")
        height = max(1, round(rgb.height * width / rgb.width))
        out = io.BytesIO()
        rgb.resize((width, height), Image.Resampling.BILINEAR).save(out, "JPEG", quality=80)
    except (OSError, ValueError):
        return None
    return out.getvalue()


def add_input_thumbnails(run: RunDir, videos: list[dict[str, Any]]) -> None:
    """Set each image-to-video video's `input_thumb` to its input image's JPEG bytes (the run's
    frozen copy, made once per distinct image)."""
    made: dict[str, bytes | None] = {}
    for video in videos:
        path = video.get("image_path")
        if path and path not in made:
            made[path] = input_image_jpeg(run.root / path)
        video["input_thumb"] = made.get(path) if path else None


def add_thumbnails(run: RunDir, videos: list[dict[str, Any]]) -> None:
    """Set each done video's `thumb` to its first frame's JPEG bytes (None when unreadable)."""
    made = thumbnails(run, [v["path"] for v in videos if v["path"]])
    for video in videos:
        video["thumb"] = made.get(video["path"]) if video["path"] else None
