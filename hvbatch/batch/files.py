"""Durable, atomic files: write to a temporary name, fsync, rename, fsync the folder.

A node that crashes mid-write leaves either the old file or the new one under the final name,
never a short one. Readers of the run's small JSON and Parquet files go through `read_json` and
`read_parquet`, which name a corrupt or empty file and say how to repair the run.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import socket
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

PRIVATE_DIR_MODE = 0o700
SHARED_DIR_MODE = 0o755


class CorruptRunFile(ValueError):
    """A run file that cannot be read (empty, truncated, not JSON or Parquet)."""

    def __init__(self, path: Path, cause: BaseException) -> None:
        super().__init__(
            f"{path} is corrupt or empty ({type(cause).__name__}: {cause}); "
            f"`hvbatch retry {_run_root(path)} --repair` moves corrupt files to corrupt/ and redoes "
            "what they recorded (videos already made are kept)"
        )
        self.path = path


def _run_root(path: Path) -> Path:
    for parent in path.parents:
        if (parent / "run.json").is_file():
            return parent
    return path.parent


def tmp_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # some filesystems cannot open or fsync a directory
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs(folder: Path, mode: int = SHARED_DIR_MODE) -> None:
    """Create `folder` and missing parents; parents get `SHARED_DIR_MODE`, never group/world write."""
    missing = [p for p in [folder, *folder.parents] if not p.exists()]
    for parent in reversed(missing):
        with contextlib.suppress(FileExistsError):
            parent.mkdir(mode=mode if parent == folder else SHARED_DIR_MODE)


def _write_bytes_durably(tmp: Path, data: bytes) -> None:
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def write_json_exclusive(path: Path, payload: Any) -> bool:
    """Write `path` atomically unless it exists (hard link of a temp file); False if it existed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_sibling(path)
    _write_bytes_durably(tmp, json.dumps(payload, indent=2, sort_keys=True).encode())
    try:
        os.link(tmp, path)
        fsync_dir(path.parent)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` to a temporary sibling, fsync it, rename it to `path`, fsync the folder: a crash
    leaves the old file or the new one, never a short one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_sibling(path)
    try:
        write(tmp)
        fsync_file(tmp)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def _sync_filesystem(folder: Path) -> None:
    """Make every file written under `folder` durable: one syncfs(2) of its filesystem where the
    C library has it, else an fsync of each file."""
    libc = ctypes.CDLL(None, use_errno=True)
    syncfs = getattr(libc, "syncfs", None)
    if syncfs is not None:
        fd = os.open(folder, os.O_RDONLY)
        try:
            if syncfs(fd) == 0:
                return
        finally:
            os.close(fd)
    for parent, _, names in os.walk(folder):
        for name in names:
            fsync_file(Path(parent) / name)


def write_folder_atomic(folder: Path, fill: Callable[[Path], None]) -> None:
    """`fill(tmp)` writes files into a new temporary sibling folder; they are made durable at once
    (one filesystem sync, not an fsync per file), then the folder is renamed to `folder`, which
    must not exist: `folder` never holds a partial set of files, and thousands of files cost one
    sync. A crash leaves no `folder`, or the whole of it."""
    if folder.exists():
        raise FileExistsError(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_sibling(folder)
    tmp.mkdir()  # fails if it exists: nobody else's folder is filled
    try:
        fill(tmp)
        _sync_filesystem(tmp)
        fsync_dir(tmp)
        os.rename(tmp, folder)
        fsync_dir(folder.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_json_atomic(path: Path, payload: Any) -> None:
    write_atomic(path, lambda tmp: tmp.write_bytes(json.dumps(payload, indent=2, sort_keys=True).encode()))


def write_text_atomic(path: Path, text: str) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_parquet_atomic(path: Path, table: pa.Table) -> None:
    write_atomic(path, lambda tmp: pq.write_table(table, tmp))


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CorruptRunFile(path, err) from err


def read_parquet(path: Path, columns: list[str] | None = None) -> pa.Table:
    """One open, one read: a file replaced meanwhile (a job rewriting its part) is read whole,
    old or new, never its old footer with its new pages."""
    data = path.read_bytes()
    try:  # ParquetFile, not read_table: a few times faster on the run's small files
        parquet = pq.ParquetFile(pa.BufferReader(data))
        if missing := set(columns or ()) - set(parquet.schema_arrow.names):
            raise pa.ArrowInvalid(f"no column {', '.join(sorted(missing))}")
        return parquet.read(columns=columns, use_threads=len(data) > 1 << 20)
    except (pa.ArrowInvalid, OSError) as err:
        raise CorruptRunFile(path, err) from err


def read_parquet_parts(paths: list[Path], schema: pa.Schema) -> list[tuple[Path, pa.Table]]:
    """Each part read as `read_parquet` does, conformed to `schema` (columns an older writer did
    not have are nulls); parts gone since they were listed are skipped."""
    tables = []
    for path in paths:
        try:
            table = read_parquet(path)
        except FileNotFoundError:
            continue  # moved aside or replaced under another name since the listing
        columns = [
            table[f.name].cast(f.type) if f.name in table.column_names else pa.nulls(table.num_rows, f.type)
            for f in schema
        ]
        tables.append((path, pa.Table.from_arrays(columns, schema=schema)))
    return tables
