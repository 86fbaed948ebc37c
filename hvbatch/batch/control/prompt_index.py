"""A prompt file validated in one streamed read, keeping only what sharding needs.

`read_prompts` returns every video as a table (500 to 800 bytes a video in memory with its Python
and Arrow overheads). `index_prompts` reads the file batch by batch with the same checks and
keeps, per row, its prompt id (8 bytes when it is a hash), its number of videos and its videos'
cost: about 20 bytes a row. The dry run needs nothing more; `submit` reads the file a second
time (`PromptIndex.video_batches`) to write the frozen shards, with the ids of the first read.
The shards are those `shard_videos` makes of `read_prompts`' table: same videos, same order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from hvbatch.batch.control.prompt_ids import SHOW_ROWS, listed
from hvbatch.batch.control.prompt_images import ImageOptions
from hvbatch.batch.control.prompts import (
    FLOAT_COLUMNS,
    INT_COLUMNS,
    VIDEO_SCHEMA,
    PromptScan,
    _Batch,
    _expand,
    changed_while_read,
    default_geometry,
    reread_batches,
    scan_prompts,
    video_cost,
)
from hvbatch.batch.control.shards import MAX_COST_GROUPS, ShardLayout, layout_shards
from hvbatch.config import SamplingConfig
from hvbatch.models.family import LatentGeometry

MAX_STEP_COUNTS = 4096
"""Distinct step counts `PromptIndex.rows_by_steps` keeps."""

@dataclass
class PromptIndex:
    """A validated prompt file: its rows' ids, video counts and costs; its videos follow (file order:
    row, then video_index)."""

    scan: PromptScan
    defaults: SamplingConfig
    geometry: LatentGeometry
    counts: np.ndarray
    """Videos of each row (int32)."""
    row_cost: np.ndarray
    """Cost of each of a row's videos (float64)."""
    largest: dict[str, Any]
    """The first video (file order) of the highest cost, as a `VIDEO_SCHEMA` row."""
    cost_by_threshold: dict[float, float] = field(default_factory=dict)
    """Total cost of the videos of each `cache_threshold` (for the dry run's step-caching line)."""
    distinct_costs: np.ndarray | None = None
    """The costs that occur (None if too many to list)."""
    rows_by_steps: dict[int, tuple[list[int], int]] = field(default_factory=dict)
    """Per step count that occurs (the first `MAX_STEP_COUNTS`): its first rows (up to `SHOW_ROWS`)
    and how many rows have it."""
    num_videos: int = 0
    total_cost: float = 0.0

    def step_problems(self, problems_for: Callable[[int], list[str]]) -> list[str]:
        """`problems_for(steps)` of each step count the rows ask for, each naming the column and its
        rows (a distilled model's fixed step counts are per row, as the other sampling settings)."""
        found = []
        for steps, (rows, num_rows) in sorted(self.rows_by_steps.items()):
            for problem in problems_for(steps):
                where = f"column num_inference_steps, row{'s' * (num_rows > 1)} {listed(rows, num_rows)}"
                found.append(f"{self.scan.path}: {where}: {problem}")
        return found

    def __post_init__(self) -> None:
        self.num_videos = int(self.counts.sum(dtype=np.int64))
        self.total_cost = float(np.dot(self.row_cost, self.counts))
        self._starts: np.ndarray | None = None

    def _suffixed(self) -> bool:
        return self.num_videos != len(self.counts)

    def _video_dtype(self) -> type:
        return np.int32 if self.num_videos < 2**31 else np.int64

    def starts(self) -> np.ndarray:
        """The first video of each row."""
        if self._starts is None:
            ends = np.cumsum(self.counts, dtype=np.int64)
            self._starts = (ends - self.counts).astype(self._video_dtype())
        return self._starts

    def video_costs(self) -> np.ndarray:
        return np.repeat(self.row_cost, self.counts) if self._suffixed() else self.row_cost

    def video_rows(self) -> np.ndarray:
        """The row of each video."""
        rows = np.arange(len(self.counts), dtype=self._video_dtype())
        return np.repeat(rows, self.counts) if self._suffixed() else rows

    def video_id(self, video: int) -> str:
        row = int(np.searchsorted(self.starts(), video, side="right")) - 1
        prompt_id = self.scan.ids.slice(row, 1)[0].as_py()
        return prompt_id if self.counts[row] == 1 else f"{prompt_id}#{video - int(self.starts()[row])}"

    def by_id(self) -> np.ndarray:
        """Videos sorted by video_id, as `pc.sort_indices` sorts the ids of `read_prompts`' table.

        A video id is its row's prompt id P, or P#k when the row makes several videos. Rows ranked
        by P, or by P# where the row makes several (so that `a#0` sorts after `a b`, as '#' does
        after ' '), each followed by its videos with k in the order of its decimal string, give
        that order exactly (ids hold no `#`).
        """
        ids = self.scan.ids
        if not self._suffixed():
            by_rows = ids.sorted_rows()
            ids.release_order()
            return by_rows
        if ids.strings:
            several = pa.array(self.counts != 1)
            texts = ids.strings_array
            marked = pc.if_else(several, pc.binary_join_element_wise(texts, "", "#"), texts)
            row_order = pc.sort_indices(marked).to_numpy().astype(self._video_dtype())
            del marked
        else:
            row_order = ids.sorted_rows()  # hashes of one length: no id is a prefix of another
        ids.release_order()
        counts = self.counts[row_order]
        by_id = np.repeat(self.starts()[row_order], counts)
        del row_order
        for count in np.unique(counts[counts > 1]).tolist():  # each row's videos in k's string order
            digit_order = np.argsort(np.arange(count).astype(str), kind="stable").astype(by_id.dtype)
            here = np.repeat(counts == count, counts)
            by_id[here] += np.tile(digit_order, int(here.sum()) // count)
        return by_id

    def layout(self, *, max_shard_cost: float, min_shards: int = 1) -> ShardLayout:
        """The shards `shard_videos` would make of `read_prompts`' table of this file."""
        return layout_shards(
            self.video_costs(),
            self.by_id(),
            None,
            lambda j: (self.video_id(j), int(np.searchsorted(self.starts(), j, side="right")) - 1),
            max_shard_cost=max_shard_cost,
            min_shards=min_shards,
            distinct_costs=self.distinct_costs,
        )

    def video_batches(self) -> Iterator[pa.RecordBatch]:
        """Every video again (`VIDEO_SCHEMA`), in file order, read from the file a second time
        (`reread_batches`: the same file, or `PromptFileError`)."""
        for b in reread_batches(self.scan, self.defaults, self.geometry):
            rows = slice(b.offset, b.offset + len(b.ids))
            if not np.array_equal(b.numbers["num_videos"], self.counts[rows]):
                raise changed_while_read(self.scan.path)
            yield _expand(b, self.geometry)


class _Collector:
    """Per clean batch: the videos and cost of each row, the costliest video, thresholds."""

    def __init__(self, num_rows: int, geometry: LatentGeometry) -> None:
        self.geometry = geometry
        self.counts = np.zeros(num_rows, np.int32)
        self.row_cost = np.zeros(num_rows, np.float64)
        self.largest: dict[str, Any] | None = None
        self.largest_cost = -1.0
        self.by_threshold: dict[float, float] = {}
        self.distinct: set[float] | None = set()
        self.rows_by_steps: dict[int, tuple[list[int], int]] = {}

    def __call__(self, b: _Batch, clean: bool) -> None:
        if not clean:
            return
        nums = b.numbers
        count = nums["num_videos"]
        steps = nums["num_inference_steps"]
        row_cost = video_cost(nums["height"], nums["width"], nums["num_frames"], steps, self.geometry)
        if b.images is not None and b.images.extra_cost is not None:
            row_cost = row_cost + b.images.extra_cost
        rows = slice(b.offset, b.offset + len(count))
        values, num_rows = np.unique(steps, return_counts=True)
        for value, n in zip(values.tolist(), num_rows.tolist(), strict=True):
            if value not in self.rows_by_steps and len(self.rows_by_steps) >= MAX_STEP_COUNTS:
                continue  # a guard on memory: the job still checks each video's steps
            shown, total = self.rows_by_steps.get(value, ([], 0))
            if len(shown) < SHOW_ROWS:
                shown += (np.flatnonzero(steps == value)[: SHOW_ROWS - len(shown)] + b.offset).tolist()
            self.rows_by_steps[value] = (shown, total + n)
        self.counts[rows] = count
        self.row_cost[rows] = row_cost
        best = int(np.argmax(row_cost))
        if row_cost[best] > self.largest_cost:
            self.largest_cost = float(row_cost[best])
            self.largest = _first_video(b, best, float(row_cost[best]))
        if self.distinct is not None:
            self.distinct.update(np.unique(row_cost).tolist())
            self.distinct = self.distinct if len(self.distinct) <= MAX_COST_GROUPS else None
        values, inverse = np.unique(nums["cache_threshold"], return_inverse=True)
        totals = np.bincount(inverse, weights=row_cost * count)
        for value, total in zip(values.tolist(), totals.tolist(), strict=True):
            self.by_threshold[value] = self.by_threshold.get(value, 0.0) + total


def _first_video(b: _Batch, i: int, cost: float) -> dict[str, Any]:
    """Row `i`'s first video, as `_expand` makes it."""
    prompt_id = b.ids[i].as_py()
    several = int(b.numbers["num_videos"][i]) != 1
    video = {"video_id": f"{prompt_id}#0" if several else prompt_id, "prompt_id": prompt_id}
    video |= {"row": b.offset + i, "video_index": 0, "prompt": b.prompt[i].as_py()}
    video |= {"negative_prompt": b.negative_prompt[i].as_py()}
    video |= {k: int(b.numbers[k][i]) for k in INT_COLUMNS if k != "num_videos"}
    video["seed"] = int(b.row_seeds()[i])
    video |= {k: float(b.numbers[k][i]) for k in FLOAT_COLUMNS}
    video["cost"] = cost
    images = b.images
    has = images is not None and bool(images.has[i])
    for name, column in (("image_sha256", "sha256"), ("image_path", "frozen"), ("image_source", "source")):
        video[name] = getattr(images, column)[i].as_py() if has else None
    assert set(video) == set(VIDEO_SCHEMA.names)
    return video


def index_prompts(
    path: str | Path,
    defaults: SamplingConfig,
    geometry: LatentGeometry | None = None,
    image_options: ImageOptions | None = None,
) -> PromptIndex:
    """Read and validate a prompt file as `read_prompts` does (the same problems, the same ids, the
    same sizes and costs by the family's `geometry`), keeping only the compact `PromptIndex` (and,
    with an image column, `PromptImages`: 42 bytes a row)."""
    geometry = geometry or default_geometry()
    try:
        num_rows = pq.ParquetFile(path).metadata.num_rows
    except (OSError, pa.ArrowException):
        num_rows = 0  # scan_prompts names the problem
    collect = _Collector(num_rows, geometry)
    scan = scan_prompts(path, defaults, collect, geometry, image_options)
    assert collect.largest is not None  # a file without rows is a problem
    counts, costs, largest = collect.counts, collect.row_cost, collect.largest
    distinct = None if collect.distinct is None else np.array(sorted(collect.distinct))
    by_threshold, by_steps = collect.by_threshold, collect.rows_by_steps
    return PromptIndex(scan, defaults, geometry, counts, costs, largest, by_threshold, distinct, by_steps)
