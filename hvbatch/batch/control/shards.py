"""Deterministic, cost-balanced shards of the videos of a run, sized to fit a job's walltime."""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

WARNING_KEY = b"hvbatch.warning"
"""Schema-metadata key of a shard's warning (a video too costly for one job's walltime)."""


def _deal(loads: np.ndarray, c: float, m: int) -> np.ndarray | None:
    """Shards that greedy gives m items of cost c > 0, in order, without a heap operation per item.

    Greedy takes the smallest (load, shard) each time, so its picks are the m smallest "slots"
    (loads[s] + j*c, s) over all shards s and j >= 0. Every slot below the final average load is
    generated (about m + k), sorted, and the first m kept; None if float rounding left one out.
    """
    k = len(loads)
    level = (float(loads.sum()) + m * c) / k
    counts = np.ceil((level - loads) / c).clip(0).astype(np.int64) + 1
    shard = np.repeat(np.arange(k), counts)
    slot = np.arange(len(shard)) - np.repeat(np.cumsum(counts) - counts, counts)
    value = loads[shard] + slot * c
    pick = np.lexsort((shard, value))[:m]
    last_value, last_shard = value[pick[-1]], shard[pick[-1]]
    after = loads + counts * c  # each shard's first slot not generated
    complete = (after > last_value) | ((after == last_value) & (np.arange(k) > last_shard))
    return shard[pick] if len(pick) == m and complete.all() else None


DEAL_CHUNK = 1 << 20
"""Most items `_deal` takes at once (its temporaries are a few times this many)."""


def _lpt(costs: np.ndarray, k: int) -> np.ndarray:
    """Shard of each item (costs sorted descending) by longest-processing-time-first greedy.

    Each item goes to the least-loaded shard, the lowest index on ties. Long runs of equal costs
    are dealt in bulk by `_deal` (the same result: greedy is sequential, so a run dealt in pieces
    is the run dealt at once), short ones with a heap.
    """
    assign = np.empty(len(costs), np.int32 if k < 2**31 else np.int64)
    loads = np.zeros(k)
    heap: list[tuple[float, int]] | None = None
    bounds = [0, *(np.flatnonzero(costs[1:] != costs[:-1]) + 1).tolist(), len(costs)]
    pieces = [piece for start, end in itertools.pairwise(bounds) for piece in _pieces(start, end)]
    for start, end in pieces:
        c = float(costs[start])
        dealt = _deal(loads, c, end - start) if c > 0 and end - start >= max(32, k // 8) else None
        if dealt is not None:
            assign[start:end] = dealt
            loads += np.bincount(dealt, minlength=k) * c
            heap = None
            continue
        if heap is None:
            heap = list(zip(loads.tolist(), range(k), strict=True))
            heapq.heapify(heap)
        for i in range(start, end):
            load, s = heap[0]
            heapq.heapreplace(heap, (load + c, s))
            assign[i] = s
        np.add.at(loads, assign[start:end], c)
    return assign


def _pieces(start: int, end: int) -> list[tuple[int, int]]:
    return [(a, min(end, a + DEAL_CHUNK)) for a in range(start, end, DEAL_CHUNK)]


def _pack(costs: np.ndarray, limit: float, min_count: int) -> np.ndarray:
    """LPT assignment (costs sorted descending, each <= limit) into the fewest shards, at least
    `min_count` (at most one per item), whose loads all stay within `limit`: from a lower bound,
    galloping up, then bisecting."""
    n = len(costs)
    lower = max(min_count, math.ceil(float(costs.sum()) / limit), int((costs > limit / 2).sum()), 1)
    best: list[tuple[int, np.ndarray]] = []  # the fewest shards found to fit, and their assignment

    def fits(k: int) -> bool:
        assign = _lpt(costs, k)
        ok = float(np.bincount(assign, weights=costs, minlength=k).max()) <= limit
        if ok and (not best or k < best[0][0]):
            best[:] = [(k, assign)]
        return ok

    lo = hi = min(lower, n)
    if not fits(lo):
        step = 1
        while not fits(hi := min(n, lo + step)):  # one shard per item (hi == n) always fits
            lo, step = hi, step * 2
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if fits(mid) else (mid, hi)
    assert best and best[0][0] == hi
    return best[0][1]


MAX_COST_GROUPS = 256


def _by_cost(
    cost: np.ndarray, by_id: np.ndarray, distinct: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """`by_id` stably sorted by cost, descending, and the costs in that order. With few distinct
    costs (batches have a few sizes and step counts), one pass per cost instead of a sort."""
    keyed = cost[by_id]
    if distinct is None or len(distinct) > MAX_COST_GROUPS:
        np.negative(keyed, out=keyed)
        order = by_id[np.argsort(keyed, kind="stable")]
        return order, cost[order]
    values = np.sort(distinct)[::-1]
    pieces = [by_id[keyed == value] for value in values.tolist()]
    counts = [len(piece) for piece in pieces]
    assert sum(counts) == len(by_id), "a cost missing from distinct_costs"
    return np.concatenate(pieces), np.repeat(values, counts)


def _check_limits(max_shard_cost: float, min_shards: int) -> None:
    if not (math.isfinite(max_shard_cost) and max_shard_cost > 0):
        raise ValueError(f"max_shard_cost must be a positive number, got {max_shard_cost!r}")
    if min_shards < 1:
        raise ValueError(f"min_shards must be >= 1, got {min_shards}")


def _oversize_warning(video_id: str, row: int, cost: float, max_shard_cost: float) -> str:
    return (
        f"video {video_id} (row {row}) costs {cost:,.0f}, more than max_shard_cost={max_shard_cost:,.0f}: "
        "it has a shard of its own and may not finish in the job's walltime; raise the walltime "
        "or make the video smaller, shorter or with fewer steps"
    )


@dataclass
class ShardLayout:
    """Which shard each video goes to, and each shard's size: what `shard_videos` decides, as arrays."""

    shard_of: np.ndarray
    """Shard of each video, in the positions of the videos given (int32)."""
    num_videos: np.ndarray
    cost: np.ndarray
    """Per shard: its videos and their total cost."""
    warnings: dict[int, str] = field(default_factory=dict)
    """Shards holding one video costlier than max_shard_cost, and what to do about it."""

    @property
    def num_shards(self) -> int:
        return len(self.num_videos)

    def summary(self) -> list[dict[str, object]]:
        """As `shard_summary`: per shard `index`, `num_videos`, `cost` and `warning`."""
        return [
            {"index": i, "num_videos": int(n), "cost": float(c), "warning": self.warnings.get(i)}
            for i, (n, c) in enumerate(zip(self.num_videos.tolist(), self.cost.tolist(), strict=True))
        ]


def layout_shards(
    cost: np.ndarray,
    by_id: np.ndarray,
    file_order: np.ndarray | None,
    describe: Callable[[int], tuple[str, int]],
    *,
    max_shard_cost: float,
    min_shards: int = 1,
    distinct_costs: np.ndarray | None = None,
) -> ShardLayout:
    """The shards of videos given as arrays (`shard_videos` says how they are chosen).

    `cost`: each video's cost; `by_id`: the videos' positions sorted by video_id; `file_order`: their
    positions in file order (row, then video_index), None when they are given in file order;
    `describe(position)`: (video_id, row) of a video, for the warning of one too costly;
    `distinct_costs`: the costs that occur, when known (a sort of every video is then not needed).
    """
    _check_limits(max_shard_cost, min_shards)
    n = len(cost)
    if not (np.isfinite(cost).all() and (cost >= 0).all()):
        raise ValueError("videos table has a negative, infinite or null cost; pass read_prompts' output")
    order, sorted_cost = _by_cost(cost, by_id, distinct_costs)  # cost descending, then video_id
    del by_id
    over = int((sorted_cost > max_shard_cost).sum())
    shard = np.empty(n, np.int32 if n < 2**31 else np.int64)
    shard[order[:over]] = np.arange(over)
    if over < n:
        shard[order[over:]] = over + _pack(sorted_cost[over:], max_shard_cost, min_shards - over)
    oversize = order[:over].tolist()
    del order, sorted_cost
    in_file_order = shard if file_order is None else shard[file_order]
    # Shards numbered by their first video in file order (a shard left empty gets no number).
    first = np.full(int(shard.max()) + 1, n, np.int64)
    np.minimum.at(first, in_file_order, np.arange(n, dtype=shard.dtype))
    del in_file_order
    used = np.flatnonzero(first < n)
    number = np.zeros(len(first), np.int32)
    number[used[np.argsort(first[used], kind="stable")]] = np.arange(len(used))
    shard_of = number[shard]
    del shard
    warnings = {}
    for j in oversize:
        video_id, row = describe(j)
        warnings[int(shard_of[j])] = _oversize_warning(video_id, row, float(cost[j]), max_shard_cost)
    counts = np.bincount(shard_of, minlength=len(used))
    return ShardLayout(shard_of, counts, np.bincount(shard_of, weights=cost, minlength=len(used)), warnings)


def shard_videos(videos: pa.Table, *, max_shard_cost: float, min_shards: int = 1) -> list[pa.Table]:
    """Split videos (`read_prompts` output) into cost-balanced shards, deterministically.

    Videos are sorted by cost descending (ties: video_id) and dealt longest-processing-time-first
    into the fewest shards, at least `min_shards` (fewer only when there are fewer videos), whose
    total cost stays within `max_shard_cost`. A video costing more than `max_shard_cost` gets a
    shard of its own, whose schema metadata carries a warning (`shard_summary` reports it). Shards
    are numbered by their first video in file order; inside a shard, videos keep file order (row,
    then video_index). The same table gives the same shards on every machine.
    """
    _check_limits(max_shard_cost, min_shards)
    missing = {"video_id", "row", "video_index", "cost"} - set(videos.schema.names)
    if missing:
        raise ValueError(f"videos table lacks columns {sorted(missing)}; pass read_prompts' output")
    if videos.num_rows == 0:
        return []
    videos = videos.combine_chunks()  # cheap, and take() on one chunk is faster
    cost = videos.column("cost").to_numpy()
    by_id = pc.sort_indices(videos.column("video_id")).to_numpy()
    file_order = np.lexsort((videos.column("video_index").to_numpy(), videos.column("row").to_numpy()))
    ids, rows = videos.column("video_id"), videos.column("row")
    layout = layout_shards(
        cost,
        by_id,
        file_order,
        lambda j: (ids[j].as_py(), rows[j].as_py()),
        max_shard_cost=max_shard_cost,
        min_shards=min_shards,
    )
    final = file_order[np.argsort(layout.shard_of[file_order], kind="stable")]
    table = videos.take(pa.array(final))
    ends = np.cumsum(layout.num_videos).tolist()
    shards = [table.slice(a, b - a) for a, b in itertools.pairwise([0, *ends])]
    for index, warning in layout.warnings.items():
        shards[index] = shards[index].replace_schema_metadata({WARNING_KEY: warning.encode()})
    return shards


def shard_summary(shards: list[pa.Table]) -> list[dict[str, object]]:
    """Per shard: `index`, `num_videos`, `cost` (total, float) and `warning` (str, or None)."""
    out: list[dict[str, object]] = []
    for index, shard in enumerate(shards):
        warning = (shard.schema.metadata or {}).get(WARNING_KEY)
        total = pc.sum(shard.column("cost")).as_py() or 0.0
        warning = warning.decode() if warning else None
        out.append({"index": index, "num_videos": shard.num_rows, "cost": float(total), "warning": warning})
    return out


def max_shard_cost_for_walltime(
    walltime_min: float, seconds_per_cost_unit: float, num_dp_groups: int, reserve_s: float
) -> float:
    """The cost a shard may have to finish in a job's walltime: (walltime*60 - reserve_s) *
    num_dp_groups / seconds_per_cost_unit.

    `seconds_per_cost_unit`: seconds one dp group takes per cost unit (image token x step);
    `reserve_s`: time kept back for loading the models, writing the last videos and the imbalance
    between dp groups (up to one video). Raises ValueError when nothing fits.
    """
    problems = [
        f"{name} must be {rule}, got {value!r}"
        for name, value, rule, ok in (
            ("walltime_min", walltime_min, "> 0", walltime_min > 0),
            ("seconds_per_cost_unit", seconds_per_cost_unit, "> 0", seconds_per_cost_unit > 0),
            ("num_dp_groups", num_dp_groups, ">= 1", num_dp_groups >= 1),
            ("reserve_s", reserve_s, ">= 0", reserve_s >= 0),
        )
        if not (ok and math.isfinite(value))
    ]
    if problems:
        raise ValueError("cannot size shards: " + "; ".join(problems))
    budget_s = walltime_min * 60 - reserve_s
    if budget_s <= 0:
        raise ValueError(
            f"a walltime of {walltime_min:g} min ({walltime_min * 60:g} s) leaves no time after the "
            f"reserve of {reserve_s:g} s: raise the walltime above {reserve_s / 60:g} min or lower the "
            "reserve"
        )
    return budget_s * num_dp_groups / seconds_per_cost_unit
