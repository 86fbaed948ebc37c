"""Is this mp4 whole? Its frame count and size, read from the container's boxes (no decoding).

A whole mp4 written by ffmpeg is `ftyp`, `mdat` (the frames) and `moov` (the index, written last),
each box inside the file. `check_mp4` reads only the box headers and the `moov` box (a few KB for
720p x 129 frames), finds the video track, and checks that its sample table names `frames`
samples whose bytes all lie inside the file, and the expected width and height. A file cut short
anywhere (no `moov`, a box running past the end, a chunk past the end) fails, as does a file
with fewer frames than were encoded. The H.264 payload itself is not decoded: a bit flipped
inside a frame is not seen (ffmpeg never writes one; the failures here are short files).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

MAX_MOOV_BYTES = 64 << 20
"""A larger index is not one hvbatch wrote (129 frames need ~3 KB)."""


class InvalidVideo(ValueError):
    """An mp4 that is not whole: the message says what is wrong."""


@dataclass(frozen=True)
class Mp4Summary:
    frames: int
    width: int
    height: int
    size_bytes: int


@dataclass(frozen=True)
class _Box:
    kind: bytes
    start: int  # offset of the box header
    payload: int  # offset of its payload
    end: int


def _boxes(data: bytes, start: int, end: int, base: int = 0) -> Iterator[_Box]:
    """The boxes laid end to end in `data[start:end]` (offsets reported + `base`)."""
    pos = start
    while pos < end:
        if end - pos < 8:
            raise InvalidVideo(f"a box header at byte {base + pos} is cut short")
        size, kind = struct.unpack_from(">I4s", data, pos)
        header = 8
        if size == 1:
            if end - pos < 16:
                raise InvalidVideo(f"a box header at byte {base + pos} is cut short")
            (size,) = struct.unpack_from(">Q", data, pos + 8)
            header = 16
        elif size == 0:
            size = end - pos
        if size < header or pos + size > end:
            raise InvalidVideo(f"box {kind.decode('latin-1')!r} at byte {base + pos} runs past its end")
        yield _Box(kind, base + pos, base + pos + header, base + pos + size)
        pos += size


def _top_level(handle: BinaryIO, file_size: int) -> list[_Box]:
    boxes = []
    pos = 0
    while pos < file_size:
        handle.seek(pos)
        header = handle.read(16)
        if len(header) < 8:
            raise InvalidVideo(f"the file ends inside a box header at byte {pos}")
        size, kind = struct.unpack_from(">I4s", header)
        length = 8
        if size == 1:
            if len(header) < 16:
                raise InvalidVideo(f"the file ends inside a box header at byte {pos}")
            (size,) = struct.unpack_from(">Q", header, 8)
            length = 16
        elif size == 0:
            size = file_size - pos
        if size < length:
            raise InvalidVideo(f"box {kind.decode('latin-1')!r} at byte {pos} has an invalid size {size}")
        if pos + size > file_size:
            raise InvalidVideo(
                f"the file is cut short: its {kind.decode('latin-1')!r} box needs {pos + size} bytes, "
                f"the file has {file_size}"
            )
        boxes.append(_Box(kind, pos, pos + length, pos + size))
        pos += size
    return boxes


def _child(data: bytes, box: _Box, kind: bytes, base: int) -> _Box | None:
    return next((b for b in _boxes(data, box.payload - base, box.end - base, base) if b.kind == kind), None)


def _path(data: bytes, box: _Box, kinds: list[bytes], base: int) -> _Box | None:
    for kind in kinds:
        found = _child(data, box, kind, base)
        if found is None:
            return None
        box = found
    return box


def _video_tables(moov: bytes, base: int) -> dict[bytes, bytes]:
    """The sample-table boxes (stsd, stsz, stsc, stco / co64) of the first video track."""
    for trak in _boxes(moov, 0, len(moov), base):
        if trak.kind != b"trak":
            continue
        hdlr = _path(moov, trak, [b"mdia", b"hdlr"], base)
        if hdlr is None or moov[hdlr.payload - base + 8 : hdlr.payload - base + 12] != b"vide":
            continue
        stbl = _path(moov, trak, [b"mdia", b"minf", b"stbl"], base)
        if stbl is None:
            raise InvalidVideo("the video track has no sample table")
        children = _boxes(moov, stbl.payload - base, stbl.end - base, base)
        return {b.kind: moov[b.payload - base : b.end - base] for b in children}
    raise InvalidVideo("the file has no video track")


def _chunk_ends(tables: dict[bytes, bytes], sizes: list[int]) -> Iterator[tuple[int, int]]:
    """(offset, end) of each chunk of samples, from stsc runs and stco / co64 offsets."""
    if b"stco" in tables:
        (count,) = struct.unpack_from(">I", tables[b"stco"], 4)
        offsets = list(struct.unpack_from(f">{count}I", tables[b"stco"], 8))
    elif b"co64" in tables:
        (count,) = struct.unpack_from(">I", tables[b"co64"], 4)
        offsets = list(struct.unpack_from(f">{count}Q", tables[b"co64"], 8))
    else:
        raise InvalidVideo("the video track has no chunk offsets")
    (runs,) = struct.unpack_from(">I", tables[b"stsc"], 4)
    entries = [struct.unpack_from(">III", tables[b"stsc"], 8 + 12 * i) for i in range(runs)]
    sample = 0
    for index, offset in enumerate(offsets, start=1):
        per_chunk = next((n for first, n, _ in reversed(entries) if first <= index), 0)
        chunk = sizes[sample : sample + per_chunk]
        if len(chunk) < per_chunk:
            raise InvalidVideo("the chunk table names more samples than the track has")
        sample += per_chunk
        yield offset, offset + sum(chunk)
    if sample != len(sizes):
        raise InvalidVideo(f"the chunk table holds {sample} of the track's {len(sizes)} samples")


def read_mp4(handle: BinaryIO) -> Mp4Summary:
    """Frame count and size of an mp4 after checking it is whole; raises InvalidVideo if not."""
    file_size = os.fstat(handle.fileno()).st_size
    boxes = _top_level(handle, file_size)
    moov = next((b for b in boxes if b.kind == b"moov"), None)
    if moov is None:
        raise InvalidVideo(f"the file ({file_size} bytes) has no moov box: the encoder never finished it")
    if moov.end - moov.payload > MAX_MOOV_BYTES:
        raise InvalidVideo(f"its moov box of {moov.end - moov.payload} bytes is not one hvbatch wrote")
    handle.seek(moov.payload)
    data = handle.read(moov.end - moov.payload)
    try:
        tables = _video_tables(data, moov.payload)
        sample_size, count = struct.unpack_from(">II", tables[b"stsz"], 4)
        if sample_size:
            sizes = [sample_size] * count
        else:
            sizes = list(struct.unpack_from(f">{count}I", tables[b"stsz"], 12))
        entry = tables[b"stsd"][8:]  # version, flags and entry count, then the first sample entry
        width, height = struct.unpack_from(">HH", entry, 8 + 24)
        ends = list(_chunk_ends(tables, sizes))
    except (KeyError, struct.error) as err:
        raise InvalidVideo(f"its video track's sample table is incomplete ({err})") from err
    mdats = [b for b in boxes if b.kind == b"mdat"]
    for offset, end in ends:
        if not any(m.payload <= offset and end <= m.end for m in mdats):
            raise InvalidVideo(f"a chunk of frames at bytes {offset}..{end} lies outside the file's data")
    return Mp4Summary(frames=count, width=width, height=height, size_bytes=file_size)


def check_mp4(handle: BinaryIO, *, frames: int, width: int, height: int) -> Mp4Summary:
    """`read_mp4`, and the frame count and size must be the expected ones."""
    summary = read_mp4(handle)
    if summary.frames != frames:
        raise InvalidVideo(f"the mp4 holds {summary.frames} frames, not {frames}")
    if (summary.width, summary.height) != (width, height):
        raise InvalidVideo(f"the mp4 is {summary.width}x{summary.height}, not {width}x{height}")
    return summary


def check_mp4_file(path: Path, *, frames: int, width: int, height: int) -> Mp4Summary:
    """`check_mp4` of a file (never through a symbolic link)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as handle:
        return check_mp4(handle, frames=frames, width=width, height=height)
