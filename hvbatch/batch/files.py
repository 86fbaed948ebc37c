"""Durable, atomic files: write to a temporary name, fsync, rename, fsync the folder.

The one writer of every file in a run directory. A node that crashes mid-write leaves either the
old file or the new one under the final name, never a short one. Temporary names are unique
(host, pid, random) and created with O_EXCL | O_NOFOLLOW in a folder opened with O_NOFOLLOW, and
the rename or link happens in that same folder: a write never follows a symbolic link it did not
make (a link at the final name is replaced, a folder that is a link is refused).

Readers of the run's small JSON and Parquet files go through `read_json` and
`read_parquet`, which name a corrupt or empty file and say how to repair the run.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import shutil
import socket
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq

PRIVATE_DIR_MODE = 0o700
SHARED_DIR_MODE = 0o755


class CorruptRunFile(ValueError):
    """A run file that cannot be read (empty, truncated, not JSON or Parquet)."""

    def __init__(self, path: Path, cause: BaseException) -> None:
        root = _run_root(path)
        if path.parent.name == "shards":  # a frozen input: nothing else holds all its columns
            fix = (
                "--repair cannot rebuild it (it is the frozen list of that shard's videos): restore it "
                "from a backup, or submit the prompts file again into a new run (`hvbatch submit PROMPTS "
                f"--run-dir NEW`; videos already made in {root / 'videos'} are not reused)"
            )
        else:
            fix = (
                f"`hvbatch retry {root} --repair` moves corrupt files to corrupt/ (rebuilding run.json and "
                "videos.parquet) and redoes what they recorded (videos already made are kept)"
            )
        super().__init__(f"{path} is corrupt or empty ({type(cause).__name__}: {cause}); {fix}")
        self.path = path


def _run_root(path: Path) -> Path:
    for parent in path.parents:
        if (parent / "run.json").is_file():
            return parent
    return path.parent


TMP_SUFFIX = ".tmp"
_FILE_FLAGS = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_NO_HARD_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS}


class DiskFullError(OSError):
    """A write in the run found no space (ENOSPC or EDQUOT); the message names the file."""


class UnsafePath(ValueError):
    """A write that would go through a symbolic link hvbatch did not make."""


def named_by_user(path: Path) -> Path:
    """A path the user typed (`--out`): its folder resolved (links in it are the user's own), its
    last component kept, so that a link there is replaced by the file, never followed."""
    path = path.expanduser()
    return path.parent.resolve() / path.name


def tmp_name(name: str, tag: str = "") -> str:
    """A hidden, unique temporary name beside `name`: `.<name>.[<tag>.]<host>.<pid>.<random>.tmp`."""
    middle = f"{tag}." if tag else ""
    return f".{name}.{middle}{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}{TMP_SUFFIX}"


def tmp_sibling(path: Path, tag: str = "") -> Path:
    return path.with_name(tmp_name(path.name, tag))


def fsync_dir(folder: Path | int) -> None:
    """fsync a folder (a path or an open descriptor); some filesystems cannot, which is not an error."""
    with contextlib.suppress(OSError):
        if isinstance(folder, int):
            os.fsync(folder)
            return
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
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


def open_folder(folder: Path) -> int:
    """A descriptor of `folder` (created if missing), refusing a folder that is a symbolic link:
    every step of a write then happens in this very directory, whatever is renamed meanwhile."""
    make_dirs(folder)
    try:
        return os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as err:
        if folder.is_symlink():
            raise UnsafePath(
                f"refusing to write in {folder}: it is a symbolic link (to {os.readlink(folder)}), which "
                "hvbatch did not make; remove the link"
            ) from err
        raise


@contextlib.contextmanager
def fresh_file(path: Path, tag: str = "") -> Iterator[tuple[int, str, BinaryIO]]:
    """(folder descriptor, temporary name, its file) of a new temporary sibling of `path`, made with
    O_EXCL | O_NOFOLLOW (never an existing file or a link); removed on the way out unless renamed."""
    try:
        dir_fd = open_folder(path.parent)
        try:
            name = tmp_name(path.name, tag)
            handle = os.fdopen(os.open(name, _FILE_FLAGS, 0o666, dir_fd=dir_fd), "w+b")
            try:
                yield dir_fd, name, handle
            finally:
                with contextlib.suppress(OSError):  # flushing what a full disk refused fails again
                    handle.close()
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(name, dir_fd=dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as err:
        if is_disk_full(err) and not isinstance(err, DiskFullError):
            raise DiskFullError(err.errno, f"no space left to write {path} ({err.strerror or err})") from err
        raise


def _flush_durably(handle: BinaryIO) -> None:
    handle.flush()
    os.fsync(handle.fileno())


def write_exclusive(
    path: Path,
    write: Callable[[BinaryIO], None],
    *,
    tag: str = "",
    check: Callable[[BinaryIO], None] | None = None,
) -> bool:
    """`write(file)` to a fresh temporary sibling, fsync it, `check(file)` it, then hard-link it to
    `path`, which never replaces anything (a link at `path` included); False if `path` existed.

    A filesystem without hard links gets a rename unless `path` exists (racy there, and said so).
    """
    with fresh_file(path, tag) as (dir_fd, name, handle):
        write(handle)
        _flush_durably(handle)
        if check is not None:
            check(handle)
        try:
            os.link(name, path.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
        except FileExistsError:
            return False
        except OSError as err:
            if err.errno not in _NO_HARD_LINKS:
                raise
            if os.path.lexists(path):
                return False
            os.replace(name, path.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        fsync_dir(dir_fd)
        return True


def write_json_exclusive(path: Path, payload: Any) -> bool:
    """Write `path` atomically unless it exists (hard link of a temp file); False if it existed."""
    data = json.dumps(payload, indent=2, sort_keys=True).encode()
    return write_exclusive(path, lambda handle: handle.write(data))


def write_atomic(path: Path, write: Callable[[BinaryIO], None], *, durable: bool = True) -> None:
    """`write(file)` to a fresh temporary sibling, fsync it, rename it to `path`, fsync the folder: a
    crash leaves the old file or the new one, never a short one. A symbolic link at `path` is
    replaced by the file (never followed); a folder that is a link is refused (`UnsafePath`).

    `durable=False` skips both fsyncs, for a caller that makes a whole folder durable at once
    afterwards (a final name still never holds a partial file)."""
    with fresh_file(path) as (dir_fd, name, handle):
        write(handle)
        if durable:
            _flush_durably(handle)
        else:
            handle.flush()
        os.replace(name, path.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        if durable:
            fsync_dir(dir_fd)


def _sync_filesystem(folder: Path) -> None:
    """Make every file written under `folder` durable: one syncfs(2) of its filesystem where the
    C library has it, else an fsync of each file."""
    libc = ctypes.CDLL(None, use_errno=True)
    syncfs = getattr(libc, "syncfs", None)
    if syncfs is not None:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
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
    sync. A crash leaves no `folder`, or the whole of it. The temporary folder is made here
    (mkdir fails on anything already there, a link included) and only its owner can write in it,
    so `fill` may create files in it by name."""
    if os.path.lexists(folder):
        raise FileExistsError(folder)
    make_dirs(folder.parent)
    tmp = tmp_sibling(folder)
    tmp.mkdir(mode=SHARED_DIR_MODE)
    try:
        fill(tmp)
        _sync_filesystem(tmp)
        fsync_dir(tmp)
        os.rename(tmp, folder)
        fsync_dir(folder.parent)
    except OSError as err:
        if is_disk_full(err) and not isinstance(err, DiskFullError):
            why = f"no space left to write {folder} ({err.strerror or err})"
            raise DiskFullError(err.errno, why) from err
        raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def adopt_folder(tmp: Path, folder: Path) -> None:
    """A folder filled without fsyncs (`tmp`, beside `folder`'s parent's other entries) made durable
    by one filesystem sync and renamed to `folder`, which must not exist (as `write_folder_atomic`
    does for a folder filled in one call)."""
    if os.path.lexists(folder):
        raise FileExistsError(folder)
    _sync_filesystem(tmp)
    fsync_dir(tmp)
    os.rename(tmp, folder)
    fsync_dir(folder.parent)
    fsync_dir(tmp.parent)


def write_json_atomic(path: Path, payload: Any) -> None:
    data = json.dumps(payload, indent=2, sort_keys=True).encode()
    write_atomic(path, lambda handle: handle.write(data))


def write_text_atomic(path: Path, text: str) -> None:
    data = text.encode("utf-8")
    write_atomic(path, lambda handle: handle.write(data))


def write_parquet_atomic(path: Path, table: pa.Table) -> None:
    write_atomic(path, lambda handle: pq.write_table(table, handle))


def is_disk_full(err: BaseException | None) -> bool:
    """Whether `err`, or an error that caused it, is ENOSPC or EDQUOT (the filesystem is full)."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        err = err.__cause__ or err.__context__
    return False


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
