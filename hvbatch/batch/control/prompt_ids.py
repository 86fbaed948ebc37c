"""The problems found in a prompt file, and every row's prompt id kept compactly.

`Problems` collects what is wrong, keyed by where and what, with the first `SHOW_ROWS` rows of
each and a count of all (so a file with millions of bad rows gives a message of a few lines);
`PromptIds` holds the ids of a file's rows (8 bytes a row when they are all hashes) and finds the
ids used by more than one row by sorting them, without a hash table of every id.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

SHOW_ROWS = 5


class PromptFileError(ValueError):
    """A prompt file that cannot be used; `problems` lists every problem, each naming file and column."""

    def __init__(self, path: str | Path, problems: list[str]) -> None:
        self.path = str(path)
        self.problems = list(problems)
        count = f"{len(problems)} problem{'s' if len(problems) > 1 else ''}"
        super().__init__(f"{count} in prompt file {self.path}:\n" + "\n".join(f"  - {p}" for p in problems))


def listed(rows: list[int], count: int | None = None) -> str:
    """`1, 4, 9, 17, 20, ... (95 more)`: the first SHOW_ROWS row numbers of `count` (default len(rows))."""
    more = (len(rows) if count is None else count) - min(len(rows), SHOW_ROWS)
    return ", ".join(map(str, rows[:SHOW_ROWS])) + f", ... ({more:,} more)" * (more > 0)


@dataclass
class _Problem:
    where: str
    what: str
    count: int = 0
    rows: list[int] = field(default_factory=list)
    detail: str = ""


class Problems:
    """Problems keyed by (where, what); row numbers merge across batches (first few kept, all counted)."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self._items: dict[tuple[str, str], _Problem] = {}

    def __bool__(self) -> bool:
        return bool(self._items)

    def add(self, where: str, what: str, rows: np.ndarray | None = None, detail: str = "") -> None:
        item = self._items.setdefault((where, what), _Problem(where, what, detail=detail))
        if rows is not None:
            item.count += len(rows)
            item.rows += [int(r) for r in rows[: SHOW_ROWS - len(item.rows)]]

    def add_mask(
        self, where: str, what: str, mask: np.ndarray, offset: int, hint: Callable[[int], str] | None = None
    ) -> None:
        """Rows `offset + i` where `mask[i]`; `hint(i)` gives the nearest valid values for the first one."""
        local = np.flatnonzero(mask)
        if local.size:
            first = (where, what) not in self._items
            detail = (
                f"nearest valid for row {offset + local[0]}: {hint(int(local[0]))}" if hint and first else ""
            )
            self.add(where, what, local + offset, detail)

    def messages(self) -> list[str]:
        out = []
        for p in self._items.values():
            if not p.count:
                out.append(f"{self.path}: {p.where}: {p.what}")
                continue
            noun = "row" if p.count == 1 else "rows"
            shown = listed(p.rows, p.count)
            detail = f"; {p.detail}" if p.detail else ""
            out.append(f"{self.path}: {p.where}: {p.count:,} {noun} {p.what} ({noun} {shown}{detail})")
        return out

    def raise_if_any(self) -> None:
        if self._items:
            raise PromptFileError(self.path, self.messages())


def hex_ids(digests: bytes) -> pa.Array:
    """8-byte digests (big-endian keys) as 16-hex-digit strings."""
    hexed = pa.py_buffer(digests.hex().encode())
    count = len(digests) // 8
    ends = pa.py_buffer(np.arange(0, 16 * count + 1, 16, dtype=np.int32).tobytes())
    return pa.Array.from_buffers(pa.string(), count, [None, ends, hexed])


class _IdBatch(Protocol):
    ids: pa.Array
    explicit: np.ndarray
    hashes: np.ndarray


class PromptIds:
    """Every row's prompt id, compactly, and the duplicate check over them.

    Without an id column every id is a hash: kept as its 8-byte key (`_hash_ids`; 16 hex digits of
    one length, so the keys sort as the ids do), 8 bytes a row. With one, as strings.
    """

    CHUNK = 1 << 20

    def __init__(self, strings: bool, num_rows: int) -> None:
        self.strings = strings
        self.num_rows = num_rows
        self._chunks: list[pa.Array] = []
        self._explicit: list[np.ndarray] = []
        self.keys = np.zeros(0 if strings else num_rows, np.uint64)
        """uint64 key of each row's id (hashed ids only)."""
        self._sorted: np.ndarray | None = None

    def add(self, b: _IdBatch) -> None:
        """The ids of the batch of rows `b.offset`.. (batches come in file order)."""
        if self.strings:
            self._chunks.append(b.ids)
            self._explicit.append(b.explicit)
        else:
            self.keys[b.offset : b.offset + len(b.hashes)] = b.hashes
        self._sorted = None

    @property
    def strings_array(self) -> pa.ChunkedArray:
        assert self.strings
        return pa.chunked_array(self._chunks, pa.string())

    def explicit(self) -> np.ndarray:
        return np.concatenate(self._explicit) if self.strings and self._explicit else np.zeros(0, bool)

    def at(self, rows: np.ndarray) -> pa.Array:
        """The ids of `rows` (strings)."""
        if self.strings:
            return self.strings_array.take(pa.array(rows, pa.int64())).combine_chunks()
        return hex_ids(self.keys[rows].astype(">u8").tobytes())

    def slice(self, offset: int, length: int) -> pa.Array:
        """The ids of rows offset..offset+length-1."""
        if self.strings:
            return self.strings_array.slice(offset, length).combine_chunks()
        return hex_ids(self.keys[offset : offset + length].astype(">u8").tobytes())

    def sorted_rows(self) -> np.ndarray:
        """Rows in id order (byte-wise, as Arrow sorts strings); int32 when the rows fit."""
        if self._sorted is None:
            # (hash keys are unique, but for duplicates, which are an error: no need for a stable sort)
            order = pc.sort_indices(self.strings_array).to_numpy() if self.strings else np.argsort(self.keys)
            self._sorted = order.astype(np.int32) if self.num_rows < 2**31 else order.astype(np.int64)
        return self._sorted

    def release_order(self) -> None:
        """Forget `sorted_rows` (4 bytes a row) once its user has it."""
        self._sorted = None

    def _duplicate_rows(self) -> np.ndarray:
        """Rows whose id another row has, ascending (adjacent equal ids in id order)."""
        order = self.sorted_rows()
        if len(order) < 2:
            return np.zeros(0, np.int64)
        dup = np.zeros(len(order), bool)
        for start in range(0, len(order) - 1, self.CHUNK):  # bounded temporaries
            stop = min(len(order), start + self.CHUNK + 1)
            if self.strings:
                ids = self.strings_array.take(pa.array(order[start:stop]))
                same = pc.equal(ids.slice(1), ids.slice(0, len(ids) - 1)).to_numpy(zero_copy_only=False)
            else:
                keys = self.keys[order[start:stop]]
                same = keys[1:] == keys[:-1]
            dup[start + 1 : stop] |= same
            dup[start : stop - 1] |= same
        return np.sort(order[dup]).astype(np.int64)

    def check_duplicates(self, problems: Problems) -> None:
        """Ids used by more than one row, grouped as explicit, hashed, or an explicit id equal to a hash."""
        rows = self._duplicate_rows()
        if not len(rows):
            return
        explicit = self.explicit() if self.strings else np.zeros(int(rows.max()) + 1, bool)
        groups: dict[str, list[int]] = {}
        for row, name in zip(rows.tolist(), self.at(rows).to_pylist(), strict=True):
            groups.setdefault(name, []).append(row)
        fixes = {
            "column id": "ids must be unique: change or remove the duplicates",
            "hashed ids": "these rows have the same content (prompt, negative_prompt, seed, sizes, steps, "
            "guidance_scale, flow_shift), so the same videos: remove duplicates (use num_videos for more "
            "videos of a prompt) or give them distinct values in an id column",
            "ids": "an explicit id equals another row's hashed id: change the explicit id",
        }
        kinds: dict[str, list[tuple[str, list[int]]]] = {}
        for name, members in groups.items():
            given = {bool(explicit[r]) for r in members}
            kind = "column id" if given == {True} else "hashed ids" if given == {False} else "ids"
            kinds.setdefault(kind, []).append((name, members))
        for kind, items in kinds.items():
            shown = "; ".join(f"{name!r} in rows {listed(m)}" for name, m in items[:SHOW_ROWS])
            shown += f"; ... ({len(items) - SHOW_ROWS} more ids)" * (len(items) > SHOW_ROWS)
            used_by = sum(len(m) for _, m in items)
            ids_noun = "id" if len(items) == 1 else "ids"
            what = f"{len(items):,} duplicate {ids_noun} shared by {used_by:,} rows ({shown}); {fixes[kind]}"
            problems.add(kind, what)
