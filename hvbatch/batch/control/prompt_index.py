"""A prompt file validated in one streamed read, keeping only what sharding needs.

`read_prompts` returns every video as a table (about 500 bytes a video in memory with its Python
and Arrow overheads). `index_prompts` reads the file batch by batch with the same checks and
keeps, per row, its prompt id (8 bytes when it is a hash) and its number of videos, and per video
its cost: about 30 bytes a video. The dry run needs nothing more; `submit` reads the file a second
time (`PromptIndex.video_batches`) to write the frozen shards, with the ids of the first read.
The shards are those `shard_videos` makes of `read_prompts`' table: same videos, same order.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from hvbatch.batch.control.prompts import (
    FLOAT_COLUMNS,
    INT_COLUMNS,
    VIDEO_SCHEMA,
    PromptScan,
    _Batch,
    _expand,
    reread_batches,
    scan_prompts,
    video_cost,
)
from hvbatch.batch.control.shards import ShardLayout, layout_shards
from hvbatch.config import SamplingConfig


@dataclass
class PromptIndex:
    """A validated prompt file: its rows' ids and video counts, and each video's cost (file order)."""

    scan: PromptScan
    defaults: SamplingConfig
    counts: np.ndarray
    """Videos of each row (int32)."""
    cost: np.ndarray
    """Cost of each video, in file order (row, then video_index)."""
    largest: dict[str, Any]
    """The first video (file order) of the highest cost, as a `VIDEO_SCHEMA` row."""
    cost_by_threshold: dict[float, float] = field(default_factory=dict)
    """Total cost of the videos of each `cache_threshold` (for the dry run's step-caching line)."""

    @property
    def num_videos(self) -> int:
        return len(self.cost)

    @property
    def total_cost(self) -> float:
        return float(self.cost.sum())

    def _suffixed(self) -> bool:
        return bool((self.counts != 1).any())

    def video_rows(self) -> np.ndarray:
        """The row of each video."""
        rows = np.arange(len(self.counts), dtype=np.int64)
        return np.repeat(rows, self.counts) if self._suffixed() else rows

    def video_indexes(self) -> np.ndarray:
        """Each video's index among its row's videos."""
        if not self._suffixed():
            return np.zeros(len(self.counts), np.int64)
        starts = np.cumsum(self.counts) - self.counts
        return np.arange(self.num_videos) - np.repeat(starts, self.counts)

    def video_id(self, video: int) -> str:
        row = int(np.searchsorted(np.cumsum(self.counts), video, side="right"))
        prompt_id = self.scan.ids.at(np.array([row])).to_pylist()[0]
        if self.counts[row] == 1:
            return prompt_id
        return f"{prompt_id}#{video - int(np.cumsum(self.counts)[row] - self.counts[row])}"

    def by_id(self) -> np.ndarray:
        """Videos sorted by video_id, as `pc.sort_indices` sorts the ids of `read_prompts`' table.

        A video id is its row's prompt id P, or P#k when the row makes several videos. Ranking rows
        by P, or by P# where the row makes several (so that `a#0` sorts after `a b`, as '#' does
        after ' '), then k by its decimal string, gives that order exactly (ids hold no `#`).
        """
        ids = self.scan.ids
        if not self._suffixed():
            return ids.sorted_rows()
        if ids.strings:
            several = pa.array(self.counts != 1)
            texts = ids.strings_array
            marked = pc.if_else(several, pc.binary_join_element_wise(texts, "", "#"), texts)
            row_order = pc.sort_indices(marked).to_numpy().astype(np.int64)
        else:
            row_order = ids.sorted_rows()  # hashes of one length: no id is a prefix of another
        row_rank = np.empty(len(row_order), np.int64)
        row_rank[row_order] = np.arange(len(row_order))
        del row_order
        top = int(self.counts.max())
        digits = np.arange(top).astype(str)
        index_rank = np.empty(top, np.int64)
        index_rank[np.argsort(digits, kind="stable")] = np.arange(top)
        key = row_rank[self.video_rows()] * top + index_rank[self.video_indexes()]
        return np.argsort(key, kind="stable")

    def layout(self, *, max_shard_cost: float, min_shards: int = 1) -> ShardLayout:
        """The shards `shard_videos` would make of `read_prompts`' table of this file."""
        rows = self.video_rows()
        return layout_shards(
            self.cost,
            self.by_id(),
            None,
            lambda j: (self.video_id(j), int(rows[j])),
            max_shard_cost=max_shard_cost,
            min_shards=min_shards,
        )

    def video_batches(self) -> Iterator[pa.RecordBatch]:
        """Every video again (`VIDEO_SCHEMA`), in file order, read from the file a second time."""
        for b in reread_batches(self.scan, self.defaults):
            yield _expand(b)


class _Collector:
    """Per clean batch: the videos per row, each video's cost, the costliest video, thresholds."""

    def __init__(self) -> None:
        self.counts: list[np.ndarray] = []
        self.costs: list[np.ndarray] = []
        self.largest: dict[str, Any] | None = None
        self.largest_cost = -1.0
        self.by_threshold: dict[float, float] = {}

    def __call__(self, b: _Batch, clean: bool) -> None:
        if not clean:
            return
        nums = b.numbers
        count = nums["num_videos"].astype(np.int32)
        steps = nums["num_inference_steps"]
        row_cost = video_cost(nums["height"], nums["width"], nums["num_frames"], steps)
        self.counts.append(count)
        several = bool((count != 1).any())
        self.costs.append(np.repeat(row_cost, count) if several else row_cost)
        best = int(np.argmax(row_cost))
        if row_cost[best] > self.largest_cost:
            self.largest_cost = float(row_cost[best])
            self.largest = _first_video(b, best, float(row_cost[best]))
        thresholds = nums["cache_threshold"]
        weights = row_cost * count if several else row_cost
        values, inverse = np.unique(thresholds, return_inverse=True)
        for value, total in zip(values.tolist(), np.bincount(inverse, weights=weights).tolist(), strict=True):
            self.by_threshold[value] = self.by_threshold.get(value, 0.0) + total


def _first_video(b: _Batch, i: int, cost: float) -> dict[str, Any]:
    """Row `i`'s first video, as `_expand` makes it."""
    prompt_id = b.ids[i].as_py()
    several = int(b.numbers["num_videos"][i]) != 1
    video = {"video_id": f"{prompt_id}#0" if several else prompt_id, "prompt_id": prompt_id}
    video |= {"row": b.offset + i, "video_index": 0, "prompt": b.prompt[i].as_py()}
    video |= {"negative_prompt": b.negative_prompt[i].as_py()}
    video |= {k: int(b.numbers[k][i]) for k in INT_COLUMNS if k != "num_videos"}
    video |= {k: float(b.numbers[k][i]) for k in FLOAT_COLUMNS}
    video["cost"] = cost
    assert set(video) == set(VIDEO_SCHEMA.names)
    return video


def index_prompts(path: str | Path, defaults: SamplingConfig) -> PromptIndex:
    """Read and validate a prompt file as `read_prompts` does (the same problems, the same ids),
    keeping only the compact `PromptIndex`."""
    collect = _Collector()
    scan = scan_prompts(path, defaults, collect)
    assert collect.largest is not None  # a file without rows is a problem
    return PromptIndex(
        scan,
        defaults,
        np.concatenate(collect.counts),
        np.concatenate(collect.costs),
        collect.largest,
        collect.by_threshold,
    )
