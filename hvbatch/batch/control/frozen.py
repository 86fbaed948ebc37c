"""A run's frozen inputs, written once by `submit`: a Parquet file per shard and `videos.parquet`.

Shards come either as tables in memory (`ShardTables`, from `shard_videos`) or streamed from the
prompt file (`StreamedShards`: a `PromptIndex` and its `ShardLayout`). A streamed shard's videos
are spread over the whole file, so the file's second read deals them into a few spill files, each
holding a range of shards and at most `SPILL_BYTES` of videos; each spill file then becomes its
shards, written by a thread while the next spill file is read. Memory stays at about three
spill files, whatever the size of the run. The shard files are written into a temporary folder,
made durable by one filesystem sync and renamed to `shards/` (`files.write_folder_atomic`):
thousands of shards cost one sync, not an fsync each.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from hvbatch.batch.control.prompt_index import PromptIndex
from hvbatch.batch.control.shards import WARNING_KEY, ShardLayout
from hvbatch.batch.files import write_atomic, write_folder_atomic
from hvbatch.batch.rundir import RunDir

IMAGE_COLUMNS = ("image_source", "image_sha256", "image_path")
INDEX_SCHEMA = pa.schema(
    [("video_id", pa.string()), ("prompt", pa.string()), ("seed", pa.int64()), ("shard", pa.int32())]
    + [(name, pa.string()) for name in IMAGE_COLUMNS]
)
"""`videos.parquet`: every video of the run with its shard, in shard order, and its input image
(as the prompts file names it, its sha256, its frozen file; null for text-to-video)."""
INDEX_ROW_GROUP = 262_144
INDEX_OPTIONS: dict[str, Any] = {
    "use_dictionary": ["shard"],
    "write_statistics": ["shard"],
    "compression": {"video_id": "none", "prompt": "snappy", "seed": "snappy", "shard": "snappy"},
}
"""Ids and prompts are distinct (a dictionary is wasted work), their statistics unused; hex ids do
not compress: a fifth less time writing the index of a large run, for 5% more bytes."""
SPILL_BYTES = 64 * 2**20
SHARD_COLUMN = "__shard"
WRITERS = 1
"""Threads writing shard files while the next spill file is read (more do not help on 2 cores)."""


@dataclass
class ShardGroup:
    """Consecutive shards `first`, `first + 1`, ...: their videos in shard order (`VIDEO_SCHEMA`),
    how many each has, and the warning of any of them."""

    first: int
    videos: pa.Table
    sizes: list[int]
    warnings: dict[int, str]


class FrozenShards(Protocol):
    num_shards: int
    num_videos: int

    def groups(self, scratch: Path) -> Iterator[ShardGroup]:
        """Every shard, in order, in groups; `scratch` is an empty folder to spill into, removed
        afterwards."""
        ...


@dataclass
class ShardTables:
    shards: list[pa.Table]

    @property
    def num_shards(self) -> int:
        return len(self.shards)

    @property
    def num_videos(self) -> int:
        return sum(shard.num_rows for shard in self.shards)

    def groups(self, scratch: Path) -> Iterator[ShardGroup]:
        for index, shard in enumerate(self.shards):
            warning = (shard.schema.metadata or {}).get(WARNING_KEY)
            warnings = {index: warning.decode()} if warning else {}
            yield ShardGroup(index, shard.replace_schema_metadata(None), [shard.num_rows], warnings)


@dataclass
class StreamedShards:
    index: PromptIndex
    layout: ShardLayout

    @property
    def num_shards(self) -> int:
        return self.layout.num_shards

    @property
    def num_videos(self) -> int:
        return self.index.num_videos

    def groups(self, scratch: Path) -> Iterator[ShardGroup]:
        batches = self.index.video_batches()
        first = next(batches)
        per_video = max(1.0, first.nbytes / max(1, first.num_rows))
        bucket_of, bounds = _buckets(self.layout.num_videos, max(1, int(SPILL_BYTES / per_video)))
        paths = [scratch / f"spill-{b:05d}.arrow" for b in range(len(bounds) - 1)]
        _spill(itertools.chain([first], batches), self.layout.shard_of, bucket_of, paths)
        for bucket, path in enumerate(paths):
            lo, hi = bounds[bucket], bounds[bucket + 1]
            table = pa.ipc.open_file(pa.memory_map(str(path))).read_all()  # mapped (kept while used)
            path.unlink()
            order = np.argsort(table[SHARD_COLUMN].to_numpy(), kind="stable")  # file order in a shard
            table = table.drop_columns([SHARD_COLUMN]).take(pa.array(order))
            del order
            sizes = self.layout.num_videos[lo:hi].tolist()
            warnings = {s: w for s, w in self.layout.warnings.items() if lo <= s < hi}
            yield ShardGroup(lo, table, sizes, warnings)
            del table


def _buckets(num_videos: np.ndarray, per_bucket: int) -> tuple[np.ndarray, list[int]]:
    """Shards grouped into consecutive ranges of at most `per_bucket` videos (at least one shard
    each): the range of each shard, and the first shard of each range (and the end)."""
    bounds, total = [0], 0
    for shard, count in enumerate(num_videos.tolist()):
        if total and total + count > per_bucket:
            bounds.append(shard)
            total = 0
        total += count
    bounds.append(len(num_videos))
    bucket_of = np.repeat(np.arange(len(bounds) - 1, dtype=np.int32), np.diff(bounds))
    return bucket_of, bounds


def _spill(
    batches: Iterator[pa.RecordBatch], shard_of: np.ndarray, bucket_of: np.ndarray, paths: list[Path]
) -> None:
    """Each video, with its shard, into the spill file of its shard's range (file order kept)."""
    options = pa.ipc.IpcWriteOptions(compression=None)  # read back memory-mapped, without a copy
    writers: dict[int, pa.ipc.RecordBatchFileWriter] = {}
    start = 0
    try:
        for batch in batches:
            shard = shard_of[start : start + batch.num_rows]
            start += batch.num_rows
            bucket = bucket_of[shard]
            order = np.argsort(shard, kind="stable")  # by shard (so by range): sorted runs for the reread
            tagged = batch.append_column(SHARD_COLUMN, pa.array(shard, pa.int32()))
            sorted_batch = tagged.take(pa.array(order))
            cuts = np.searchsorted(bucket[order], np.arange(len(paths) + 1))
            for b in np.unique(bucket).tolist():
                if b not in writers:
                    writers[b] = pa.ipc.new_file(str(paths[b]), sorted_batch.schema, options=options)
                writers[b].write_batch(sorted_batch.slice(int(cuts[b]), int(cuts[b + 1] - cuts[b])))
    finally:
        for writer in writers.values():
            writer.close()
    assert start == len(shard_of), "the second read of the prompt file found other videos"
    for b, path in enumerate(paths):
        assert b in writers, f"no video for the shards of spill file {path.name}"


def write_frozen_inputs(run: RunDir, frozen: FrozenShards) -> None:
    """`shards/` (atomically, as a whole) and `videos.parquet`, from the shards in order. Shard
    files are written by `WRITERS` threads (Parquet encodes and writes without the GIL)."""

    def fill(folder: Path) -> None:
        scratch = folder / ".spill"
        scratch.mkdir()

        def write_index(handle: BinaryIO) -> None:
            with (
                pq.ParquetWriter(handle, INDEX_SCHEMA, **INDEX_OPTIONS) as writer,
                ThreadPoolExecutor(WRITERS) as pool,
            ):
                writing: list[Future[None]] = []
                for group in frozen.groups(scratch):  # the next group is read while one is written
                    for future in writing:
                        future.result()
                    writing = _write_group(pool, folder, run, group)
                    writer.write_table(_index_rows(group), row_group_size=INDEX_ROW_GROUP)
                for future in writing:
                    future.result()
                if not frozen.num_shards:
                    writer.write_table(INDEX_SCHEMA.empty_table())

        write_atomic(run.videos_path, write_index)
        scratch.rmdir()

    write_folder_atomic(run.root / "shards", fill)


def _write_group(
    pool: ThreadPoolExecutor, folder: Path, run: RunDir, group: ShardGroup
) -> list[Future[None]]:
    futures, start = [], 0
    for shard, size in enumerate(group.sizes, start=group.first):
        table = group.videos.slice(start, size)
        start += size
        if warning := group.warnings.get(shard):
            table = table.replace_schema_metadata({WARNING_KEY: warning.encode()})
        futures.append(pool.submit(_write_shard, folder / run.shard_path(shard).name, table))
    return futures


def _write_shard(path: Path, table: pa.Table) -> None:
    # No dictionaries, statistics or compression: a job reads its shard whole, once; written
    # plain, a file takes half the time for twice the bytes (130 KiB for 800 short prompts).
    pq.write_table(table, path, use_dictionary=False, write_statistics=False, compression="none")


def _index_rows(group: ShardGroup) -> pa.Table:
    columns = [group.videos[name] for name in ("video_id", "prompt", "seed")]
    shards = np.repeat(np.arange(group.first, group.first + len(group.sizes), dtype=np.int32), group.sizes)
    names = group.videos.column_names  # (tables made before the image columns have none)
    images = [
        group.videos[n] if n in names else pa.nulls(group.videos.num_rows, pa.string()) for n in IMAGE_COLUMNS
    ]
    return pa.Table.from_arrays([*columns, pa.array(shards), *images], schema=INDEX_SCHEMA)
