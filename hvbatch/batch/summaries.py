"""Per-part summaries: what `status` needs of a manifest or metrics part, in a small file beside it.

Reading a Parquet part costs about a millisecond, most of it Parquet's own overhead; a running
run of a million videos has some 16,000 open parts and `status` (and every `--wait` poll) would
read them all. So whoever writes a part writes, right after it, `NAME.summary.json` beside
`NAME.parquet`: the part's stamp (inode, size and mtime after its rename) and

    manifest parts   the shard's videos it records done (a bitmap over their indices in the shard
                     file), those whose failure is final (index and time), the last done time;
    metrics parts    the metrics row itself.

A reader trusts a summary only when its stamp is the part's stamp now, so a summary never claims
what its part does not hold: a part replaced after its summary (a crash between the two writes, a
writer that could not write the summary) or a summary that is missing, corrupt or of another
version is ignored and the part itself is read (`PartTally.of_table`, the same reduction).
Summaries are an optimisation: deleting them all loses nothing.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from hvbatch.batch.attempt import VideoStatus
from hvbatch.batch.files import write_json_atomic

logger = logging.getLogger(__name__)
VERSION = 1
SUFFIX = ".summary.json"
READ_BYTES = 1 << 14
_raw_decode = json.JSONDecoder().raw_decode  # (`json.loads` without its per-call checks)


def summary_path(part: Path) -> Path:
    """`NAME.summary.json` beside `NAME.parquet`."""
    return part.with_name(part.name.removesuffix(".parquet") + SUFFIX)


def stamp_of(st: os.stat_result) -> tuple[int, int, int]:
    return (st.st_ino, st.st_size, st.st_mtime_ns)


@dataclass(frozen=True)
class PartTally:
    """What one manifest part says about its shard's videos (by index in the shard file)."""

    done: int
    """Bitmap: bit i set when the part has a `done` row for the shard's video i."""
    failed: tuple[tuple[int, float], ...]
    """(index, finished_at) of each `failed` row that is final."""
    last_done_at: float | None

    @classmethod
    def of_table(cls, table: pa.Table, index_of: Mapping[str, int]) -> PartTally:
        done, failed, last = 0, [], None
        columns = (table[name].to_pylist() for name in ("video_id", "status", "final", "finished_at"))
        for video_id, status, final, finished_at in zip(*columns, strict=True):
            index = index_of.get(video_id)
            if index is None:  # not a video of this shard: nothing to say about it
                continue
            if status == VideoStatus.DONE:
                done |= 1 << index
                last = max(last or 0.0, finished_at or 0.0)
            elif status == VideoStatus.FAILED and final:
                failed.append((index, float(finished_at or 0.0)))
        return cls(done, tuple(failed), last)

    def to_json(self) -> dict[str, Any]:
        failed = [list(f) for f in self.failed]
        return {"done": format(self.done, "x"), "failed": failed, "last": self.last_done_at}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PartTally:
        failed = tuple((int(i), float(t)) for i, t in data["failed"]) if data["failed"] else ()
        last = data["last"]
        if not (last is None or isinstance(last, (int, float))):
            raise TypeError(f"last done time {last!r}")
        return cls(int(data["done"], 16), failed, None if last is None else float(last))


def shard_index(video_ids: list[str]) -> dict[str, int]:
    """Index of each video id in its shard file."""
    return {video_id: i for i, video_id in enumerate(video_ids)}


def _write(part: Path, payload: dict[str, Any]) -> None:
    """The summary of `part`, just written: its stamp now and `payload`. A summary that cannot be
    written is removed instead (readers then read the part), never left naming an old stamp."""
    path = summary_path(part)
    try:
        stamp = stamp_of(os.stat(part))
        write_json_atomic(path, {"version": VERSION, "part": part.name, "stamp": list(stamp)} | payload)
    except OSError as err:
        logger.warning("cannot write the summary of %s (%s); readers will read the part", part, err)
        try:
            path.unlink(missing_ok=True)
        except OSError:
            logger.warning("cannot remove the old summary %s either; it names the part's old stamp", path)


def write_part_summary(part: Path, table: pa.Table, index_of: Mapping[str, int]) -> None:
    """After writing the manifest part `part` (its rows `table`, of the shard whose video indices
    are `index_of`)."""
    _write(part, {"kind": "manifest"} | PartTally.of_table(table, index_of).to_json())


def write_metrics_summary(part: Path, table: pa.Table) -> None:
    """After writing the metrics part `part` (one row, `table`)."""
    _write(part, {"kind": "metrics", "row": table.to_pylist()[0]})


def _load(path: str) -> Any:
    """JSON from a small file: os-level calls only, one read for a summary of usual size (a reader
    opens thousands of these)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        data = os.read(fd, READ_BYTES)
        if len(data) == READ_BYTES:  # a long list of failures: read the rest
            chunks = [data]
            while chunk := os.read(fd, READ_BYTES):
                chunks.append(chunk)
            data = b"".join(chunks)
    finally:
        os.close(fd)
    text = data.decode()
    value, end = _raw_decode(text)  # (a summary starts with its object: no leading blanks)
    if text[end:].strip():
        raise ValueError(f"{path}: more after the JSON value")
    return value


def read_summary(part: str | Path, stamp: tuple[int, int, int], kind: str) -> dict[str, Any] | None:
    """The summary of `part` if it is of `kind` and names `stamp`; None if missing, corrupt, of
    another version or stale."""
    part = os.fspath(part)
    try:
        data = _load(part.removesuffix(".parquet") + SUFFIX)
        if (
            data["version"] != VERSION
            or data["kind"] != kind
            or data["stamp"] != list(stamp)
            or data["part"] != part.rpartition(os.sep)[2]
        ):
            return None
    except (OSError, ValueError, KeyError, TypeError):  # (TypeError: JSON that is not an object)
        return None
    return data


def read_part_tally(part: str | Path, stamp: tuple[int, int, int]) -> PartTally | None:
    data = read_summary(part, stamp, "manifest")
    try:
        return None if data is None else PartTally.from_json(data)
    except (KeyError, TypeError, ValueError):
        return None


def read_metrics_row(part: str | Path, stamp: tuple[int, int, int]) -> dict[str, Any] | None:
    data = read_summary(part, stamp, "metrics")
    row = None if data is None else data.get("row")
    return row if isinstance(row, dict) and isinstance(row.get("shard"), int) else None
