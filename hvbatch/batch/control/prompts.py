"""A Parquet file of prompts in; one validated row per video out; videos split into cost-balanced shards.

Input columns (only `prompt` is required; a missing optional column, or a null in one, takes the
default from the `SamplingConfig` passed in):

    prompt               string   the text prompt; must not be null, empty or whitespace-only
    id                   string or integer (made a string); default: a hash of the row's content
    negative_prompt      string
    seed                 integer  >= 0; the row's videos get seeds seed, seed+1, ..., seed+n-1;
                                  none: a base seed derived from the prompt id (`seeds.py`)
    height, width        integer  positive multiples of the model family's size multiple (16)
    num_frames           integer  rk+1 for the family's temporal ratio r (4k+1)
    num_inference_steps  integer  >= 1
    guidance_scale       number   >= 0
    flow_shift           number   > 0
    cache_threshold      number   >= 0: the row's `sampling.cache_threshold` (step caching)
    num_videos           integer  1..100,000 (default 1): videos made from the row
    image                path (string), image bytes (binary) or the Hugging Face image struct
                         {bytes, path}: the input image of an image-to-video model
                         (`prompt_images`: checked, sized, hashed into the id, frozen at submit)

Integer columns may be any intN/uintN type, or floats holding whole numbers (pandas writes an
integer column with missing values as floats). Columns with other names are allowed and ignored,
except names close to a known one (`Prompt`, `num_frame`, `steps`, ...), which are refused with the
right name, and `cfg_scale`, which is a per-batch setting (`sampling.cfg_scale`), not per prompt.

The default id is the first 16 hex digits of a BLAKE2b hash of the row's content as written in the
file (prompt, negative_prompt, seed, sizes, steps, guidance_scale, flow_shift; a missing column
counts as null; cache_threshold only where given, so rows without it keep the ids they had before it
existed; texts as UTF-8, numbers exactly: 720 and 720.0 alike, floats by their bits), so a
row keeps its id when rows are reordered, added or removed, and when config defaults change. `num_videos` is
not hashed: rows that differ only in it ask for the same videos and are reported as duplicates.
Explicit ids must be unique, non-empty, at most 200 bytes, and free of `#` and control characters
(`#` separates the video index in video ids). Anything else is fine, slashes and `..` included: file
names are derived from ids safely (`rundir.video_file_name`), never used as paths.

Every problem is collected before anything is returned, and raised as one `PromptFileError`.
"""

from __future__ import annotations

import difflib
import hashlib
import itertools
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from hvbatch.batch.control.prompt_ids import Problems as _Problems
from hvbatch.batch.control.prompt_ids import PromptFileError, PromptIds, hex_ids
from hvbatch.batch.control.prompt_images import (
    IMAGE_BATCH_ROWS,
    IMAGE_COLUMN,
    BatchImages,
    ImageOptions,
    PromptImages,
    image_type_problem,
)
from hvbatch.batch.control.seeds import derived_base_seeds
from hvbatch.config import SamplingConfig
from hvbatch.models.family import LatentGeometry, default_preset, family_for_preset

INT_COLUMNS = ("seed", "height", "width", "num_frames", "num_inference_steps", "num_videos")
FLOAT_COLUMNS = ("guidance_scale", "flow_shift", "cache_threshold")
TEXT_COLUMNS = ("prompt", "negative_prompt")
KNOWN_COLUMNS = ("id", *TEXT_COLUMNS, *INT_COLUMNS, *FLOAT_COLUMNS, IMAGE_COLUMN)
HASHED_COLUMNS = ("prompt", "negative_prompt", "seed", "height", "width", "num_frames")
HASHED_COLUMNS += ("num_inference_steps", "guidance_scale", "flow_shift")
VIDEO_SCHEMA = pa.schema(
    [("video_id", pa.string()), ("prompt_id", pa.string()), ("row", pa.int64()), ("video_index", pa.int32())]
    + [("prompt", pa.string()), ("negative_prompt", pa.string()), ("seed", pa.int64())]
    + [(name, pa.int32()) for name in ("height", "width", "num_frames", "num_inference_steps")]
    + [("guidance_scale", pa.float64()), ("flow_shift", pa.float64()), ("cache_threshold", pa.float64())]
    + [("cost", pa.float64())]
    + [("image_sha256", pa.string()), ("image_path", pa.string()), ("image_source", pa.string())]
)
"""`read_prompts`' output: one row per video, in file order (row, then video_index).

video_id is the prompt id when the row makes one video, else `{prompt_id}#{video_index}`; seed is
the row's seed + video_index; cost = image tokens x steps, image tokens by the model family's latent
geometry (`LatentGeometry.image_tokens`; for the released models ((num_frames-1)//4+1) latent frames
x height/16 x width/16), plus `ImageInput.extra_cost` for a video with an image. image_sha256,
image_path (the frozen file, relative to the run directory) and image_source (as the prompts file
names it) are null for text-to-video."""

BATCH_ROWS = 65_536
MAX_ID_BYTES = 200
MAX_VIDEOS = 100_000
"""Most videos one row may ask for (a guard against a typo expanding into billions of rows)."""
INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1
_CONFIG_NUMBERS = tuple(c for c in (*INT_COLUMNS, *FLOAT_COLUMNS) if c != "num_videos")
_ALIASES = {"steps": "num_inference_steps", "numsteps": "num_inference_steps", "frames": "num_frames"}
_ALIASES |= {"negative": "negative_prompt", "negprompt": "negative_prompt", "guidance": "guidance_scale"}
_ALIASES |= {"shift": "flow_shift", "promptid": "id", "videosperprompt": "num_videos", "text": "prompt"}
_ALIASES |= {"caption": "prompt"}
_PER_BATCH = {"cfg_scale": "a per-batch setting: set sampling.cfg_scale in the config instead"}


# ----------------------------------------------------------------------------------------- columns


def _is_text(t: pa.DataType) -> bool:
    is_view = getattr(pa.types, "is_string_view", lambda _: False)
    if pa.types.is_dictionary(t):
        return _is_text(t.value_type)
    return pa.types.is_string(t) or pa.types.is_large_string(t) or is_view(t)


def _type_problem(name: str, t: pa.DataType) -> str | None:
    """Why a column of type `t` cannot hold `name`, or None when it can."""
    numeric = pa.types.is_integer(t) or pa.types.is_floating(t)
    if pa.types.is_null(t):
        return None
    if name in INT_COLUMNS and not numeric:
        return f"type {t}, expected integers (int8..int64, or floats holding whole numbers)"
    if name in FLOAT_COLUMNS and not numeric:
        return f"type {t}, expected numbers"
    if name in TEXT_COLUMNS and not _is_text(t):
        return f"type {t}, expected strings"
    if name == "id" and not (_is_text(t) or pa.types.is_integer(t)):
        return f"type {t}, expected strings or integers"
    if name == IMAGE_COLUMN:
        return image_type_problem(t)
    return None


def _near_miss(name: str, present: set[str]) -> str | None:
    """The known column `name` looks like a misspelling of (only ones the file lacks), or None."""
    norm = lambda s: s.lower().replace("_", "").replace("-", "").replace(" ", "")
    known = {norm(k): k for k in KNOWN_COLUMNS if k not in present}
    key = norm(name)
    target = known.get(key) or _ALIASES.get(key)
    if target is None:
        close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.85)
        target = known[close[0]] if close else None
    return target if target is not None and target not in present else None


def _check_columns(schema: pa.Schema, problems: _Problems) -> list[str]:
    """Schema-level problems; returns the known columns to read (those with a usable type)."""
    names = list(schema.names)
    present = set(names) & set(KNOWN_COLUMNS)
    usable = []
    for name in dict.fromkeys(names):
        if names.count(name) > 1:
            problems.add(f"column {name}", f"appears {names.count(name)} times; keep one")
        elif name in _PER_BATCH:
            problems.add(f"column {name}", f"is {_PER_BATCH[name]}")
        elif name not in KNOWN_COLUMNS:
            target = _near_miss(name, present)
            if target:
                problems.add(
                    f"column {name}",
                    f"unknown column; did you mean {target}? Rename it to {target} (or, if it holds "
                    "other data, to a name that is not close to a known column)",
                )
        elif why := _type_problem(name, schema.field(name).type):
            problems.add(f"column {name}", why)
        else:
            usable.append(name)
    if "prompt" not in names:
        texts = [n for n in names if _is_text(schema.field(n).type) and n not in KNOWN_COLUMNS]
        hint = f" (string columns found: {', '.join(texts)}; rename the one holding prompts)" if texts else ""
        problems.add("column prompt", f"missing; it is the one required column{hint}")
    return usable


# ------------------------------------------------------------------------------------ value rules


def _nearest(value: int, multiple: int, first: int) -> str:
    """Nearest valid values of the form first + k*multiple (>= first), as `latent_shape` names them."""
    low = max(first, (value - first) // multiple * multiple + first)
    return f"{low} or {low + multiple}" if low < value else f"{low}"


_Rule = tuple[Callable[[np.ndarray], np.ndarray], str, Callable[[int], str] | None]


def _rules(name: str, geometry: LatentGeometry) -> list[_Rule]:
    """(bad-value test, what is wrong, nearest valid values from a value) for a numeric column."""
    m, t = geometry.size_multiple, geometry.temporal_ratio
    big: _Rule = (lambda v: v > INT32_MAX, f"too large (over {INT32_MAX})", None)
    at_least_1: _Rule = (lambda v: v < 1, "less than 1 (must be >= 1)", None)
    not_multiple = lambda v: (v < m) | (v % m != 0)
    not_4k1 = lambda v: (v < 1) | ((v - 1) % t != 0)
    size: _Rule = (not_multiple, f"not a positive multiple of {m}", lambda v: _nearest(v, m, m))
    frames: _Rule = (not_4k1, f"not of the form {t}k+1", lambda v: _nearest(v, t, 1))
    return {
        "height": [size, big],
        "width": [size, big],
        "num_frames": [frames, big],
        "num_inference_steps": [at_least_1, big],
        "num_videos": [at_least_1, (lambda v: v > MAX_VIDEOS, f"too large (over {MAX_VIDEOS})", None)],
        "seed": [(lambda v: v < 0, "negative (must be >= 0)", None)],
        "guidance_scale": [(lambda v: v < 0, "negative (must be >= 0)", None)],
        "flow_shift": [(lambda v: v <= 0, "not positive (must be > 0)", None)],
        "cache_threshold": [(lambda v: v < 0, "negative (must be >= 0)", None)],
    }[name]


def _numbers(arr: pa.Array, name: str, offset: int, problems: _Problems) -> tuple[np.ndarray, np.ndarray]:
    """(values, ok): int64 (float64 for FLOAT_COLUMNS) values, ok = given (not null) and convertible."""
    given = ~arr.is_null().to_numpy(zero_copy_only=False)
    where = f"column {name}"
    if name in FLOAT_COLUMNS or pa.types.is_floating(arr.type):
        f = pc.cast(arr, pa.float64()).fill_null(0.0).to_numpy(zero_copy_only=False)
        finite = np.isfinite(f)
        problems.add_mask(where, "not a finite number", given & ~finite, offset)
        if name in FLOAT_COLUMNS:
            return f + 0.0, given & finite  # + 0.0 turns -0.0 into 0.0 (one id for both)
        whole = finite & (np.floor(np.where(finite, f, 0.0)) == f)
        problems.add_mask(where, "not a whole number", given & finite & ~whole, offset)
        ok = given & whole & (np.abs(np.where(whole, f, 0.0)) <= 2.0**53)
        problems.add_mask(where, "too large (beyond 2**53 in a float column)", given & whole & ~ok, offset)
        return np.where(ok, f, 0.0).astype(np.int64), ok
    if pa.types.is_null(arr.type):
        return np.zeros(len(arr), np.int64), given
    ok = given
    if arr.type == pa.uint64():
        huge = pc.greater(arr, pa.scalar(INT64_MAX, pa.uint64())).fill_null(False)
        huge = huge.to_numpy(zero_copy_only=False)
        problems.add_mask(where, f"too large (over {INT64_MAX})", huge, offset)
        ok = given & ~huge
    values = pc.cast(arr, pa.int64(), safe=False).fill_null(0).to_numpy(zero_copy_only=False)
    return np.where(ok, values, 0), ok


def _check_rules(
    name: str, values: np.ndarray, ok: np.ndarray, offset: int, problems: _Problems, geometry: LatentGeometry
) -> None:
    for test, what, hint in _rules(name, geometry):
        bad = ok & test(values)
        explain = None if hint is None else (lambda i, hint=hint: hint(values[i]))
        problems.add_mask(f"column {name}", what, bad, offset, explain)


def _check_default(
    name: str, value: object, used: int, problems: _Problems, geometry: LatentGeometry
) -> None:
    """Check a config default used by `used` rows (where the column is missing or null)."""
    rows = "row" if used == 1 else "rows"
    where = f"sampling.{name}={value!r} (the config default, used by {used} {rows} where column {name} "
    where += "is missing or null)"
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        return problems.add(where, "is not a finite number")
    if name in INT_COLUMNS and not float(value).is_integer():
        return problems.add(where, "is not a whole number")
    for test, what, hint in _rules(name, geometry):
        if bool(test(np.array([value]))[0]):
            problems.add(where, what + (f" (nearest valid: {hint(int(value))})" if hint else ""))


# ---------------------------------------------------------------------------------------- batches


@dataclass
class _Batch:
    offset: int
    prompt: pa.Array
    negative_prompt: pa.Array
    numbers: dict[str, np.ndarray]
    ids: pa.Array
    explicit: np.ndarray
    """True where the id was given in the file (else hashed)."""
    hashes: np.ndarray
    """uint64 key of each hashed id (`_hash_ids`); 0 where the id was given."""
    seed_given: np.ndarray | None = None
    """True where the row gives a seed; elsewhere `numbers["seed"]` is `sampling.seed`, and the
    row's seed is derived from its id (`row_seeds`)."""
    images: BatchImages | None = None
    """The rows' input images (a file with an image column)."""

    def row_seeds(self) -> np.ndarray:
        """Each row's first video's seed: the file's, or derived from the prompt id (`seeds.py`)."""
        given = self.seed_given if self.seed_given is not None else np.zeros(len(self.ids), bool)
        if given.all():
            return self.numbers["seed"]
        derived = derived_base_seeds(self.ids, self.numbers["seed"])
        return np.where(given, self.numbers["seed"], derived)


def _text(arr: pa.Array) -> pa.Array:
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    if arr.type != pa.string():
        arr = pc.cast(arr, pa.string())
    return arr


def _check_prompts(prompt: pa.Array, offset: int, problems: _Problems) -> np.ndarray:
    """Problems of the prompt column; returns the mask of bad prompts."""
    null = prompt.is_null().to_numpy(zero_copy_only=False)
    blank = pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(prompt)), 0).fill_null(False)
    blank = blank.to_numpy(zero_copy_only=False)
    problems.add_mask("column prompt", "null", null, offset)
    problems.add_mask("column prompt", "empty or whitespace-only", blank, offset)
    return null | blank


def _check_ids(ids: pa.Array, offset: int, problems: _Problems) -> None:
    """Rules for explicit ids (nulls are skipped: those rows get hashed ids)."""
    where = "column id"
    mask = lambda a: a.fill_null(False).to_numpy(zero_copy_only=False)
    blank = mask(pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(ids)), 0))
    problems.add_mask(where, "empty or whitespace-only", blank, offset)
    bad_chars = mask(pc.match_substring_regex(ids, r"[#\x00-\x1f\x7f]"))
    problems.add_mask(where, "containing # or a control character", bad_chars, offset)
    problems.add_mask(where, "equal to . or ..", mask(pc.is_in(ids, pa.array([".", ".."]))), offset)
    long = mask(pc.greater(pc.binary_length(ids), MAX_ID_BYTES))
    problems.add_mask(where, f"longer than {MAX_ID_BYTES} bytes", long, offset)


def _canonical(columns: dict[str, pa.Array | None]) -> pa.Array:
    """One string per row encoding its hashed content unambiguously (texts are length-prefixed);
    a column that is None (missing from the file) is null in every row."""
    parts: list[pa.Array | pa.Scalar] = [pa.scalar("v1")]
    for name in HASHED_COLUMNS:
        arr = columns[name]
        if arr is None:
            parts.append(pa.scalar("~"))
            continue
        if name in TEXT_COLUMNS:
            arr = pc.binary_join_element_wise(pc.cast(pc.binary_length(arr), pa.string()), arr, ":")
        parts.append(pc.fill_null(pc.cast(arr, pa.string()), "~"))
    joined = pc.binary_join_element_wise(*parts, "|")
    threshold = columns.get("cache_threshold")
    if threshold is not None and threshold.null_count < len(threshold):
        as_text = pc.cast(threshold, pa.string())
        with_threshold = pc.binary_join_element_wise(joined, as_text, "|cache_threshold=")
        joined = pc.if_else(threshold.is_valid(), with_threshold, joined)
    image = columns.get(IMAGE_COLUMN)  # the image's sha256, only where the row has one
    if image is not None and image.null_count < len(image):
        with_image = pc.binary_join_element_wise(joined, image, "|image=")
        joined = pc.if_else(image.is_valid(), with_image, joined)
    return joined


def _hash_ids(canonical: pa.Array) -> tuple[pa.Array, np.ndarray]:
    """First 16 hex digits of BLAKE2b(canonical) per row, as a string array and as uint64 keys
    (the same digits as a number: the keys sort as the strings do)."""
    start = canonical.offset
    offsets = np.frombuffer(canonical.buffers()[1], np.int32)[start : start + len(canonical) + 1].tolist()
    data = canonical.buffers()[2].to_pybytes() if canonical.buffers()[2] else b""
    new, digests = hashlib.blake2b(digest_size=8).copy, []  # copying a hash: no keyword parsing
    append = digests.append
    for a, b in itertools.pairwise(offsets):
        h = new()
        h.update(data[a:b])
        append(h.digest())
    joined = b"".join(digests)
    return hex_ids(joined), np.frombuffer(joined, ">u8").astype(np.uint64)


def _read_batch(
    batch: pa.RecordBatch,
    offset: int,
    defaults: SamplingConfig,
    used: dict[str, int],
    problems: _Problems,
    geometry: LatentGeometry,
    ids: pa.Array | None = None,
    images: PromptImages | None = None,
) -> _Batch:
    """Validate one batch, fill defaults (counting their use in `used`), and make every row's id.

    `ids`: the rows' ids when they are known already (a second read of a validated file), which
    skips making them and the checks of the values; their `hashes` are then not set (zeros).
    `images`: the file's image column (checked here on the first read, recalled on the second)."""
    n = batch.num_rows
    names = batch.schema.names
    check = ids is None
    col = lambda name: batch.column(name) if name in names else None
    prompt = _text(col("prompt")) if "prompt" in names else pa.nulls(n, pa.string())
    bad = _check_prompts(prompt, offset, problems) if "prompt" in names and check else np.ones(n, bool)
    negative = _text(col("negative_prompt")) if "negative_prompt" in names else None
    hashed: dict[str, pa.Array | None] = {"prompt": prompt, "negative_prompt": negative}
    unset = n if negative is None else negative.null_count
    used["negative_prompt"] = used.get("negative_prompt", 0) + unset
    numbers: dict[str, np.ndarray] = {}
    given: dict[str, np.ndarray] = {}
    seed_given = np.zeros(n, bool)
    for name in (*INT_COLUMNS, *FLOAT_COLUMNS):
        default = 1 if name == "num_videos" else getattr(defaults, name)
        arr = col(name)
        if arr is None:  # not in the file: the default everywhere (checked once, by `_check_default`)
            used[name] = used.get(name, 0) + n
            numbers[name] = np.full(n, default, np.float64 if name in FLOAT_COLUMNS else np.int64)
            hashed[name] = None
            given[name] = np.zeros(n, bool)
            continue
        given[name] = ~arr.is_null().to_numpy(zero_copy_only=False)
        values, ok = _numbers(arr, name, offset, problems)
        numbers[name] = np.where(ok, values, default)
        seed_given = ok if name == "seed" else seed_given
        used[name] = used.get(name, 0) + arr.null_count
        if not check:
            continue
        _check_rules(name, values, ok, offset, problems, geometry)
        bad |= ~ok & ~arr.is_null().to_numpy(zero_copy_only=False)
        exact = values.view(np.int64) if values.dtype == np.float64 else values  # floats: IEEE-754 bits
        hashed[name] = pa.array(exact, mask=~ok)
    last_seed = INT64_MAX - (np.maximum(numbers["num_videos"], 1) - 1)  # seeds seed..seed+n-1 fit in int64
    seeds_over = numbers["seed"] > last_seed
    problems.add_mask(
        "columns seed, num_videos", "with seed + num_videos - 1 over 2**63-1", seeds_over, offset
    )
    batch_images = None
    if images is not None:
        named = _text(col("id")).to_pylist() if "id" in names and check else None
        batch_images = images.read(batch, offset, named, check, problems, numbers, given)
        bad |= batch_images.bad
        hashed[IMAGE_COLUMN] = batch_images.sha256
    filled_negative = (
        pa.repeat(pa.scalar(defaults.negative_prompt, pa.string()), n)
        if negative is None
        else pc.fill_null(negative, defaults.negative_prompt)
    )
    if ids is not None:
        explicit, no_hashes = np.zeros(n, bool), np.zeros(n, np.uint64)
        recalled = _Batch(offset, prompt, filled_negative, numbers, ids, explicit, no_hashes, seed_given)
        recalled.images = batch_images
        return recalled
    ids = _text(col("id")) if "id" in names else pa.nulls(n, pa.string())
    if "id" in names:
        _check_ids(ids, offset, problems)
    explicit = ~ids.is_null().to_numpy(zero_copy_only=False)
    hashes = np.zeros(n, np.uint64)
    if not explicit.all():
        missing = pa.array(~explicit)
        subset = {k: None if v is None else v.filter(missing) for k, v in hashed.items()}
        canonical = _canonical(subset)
        rows_bad = bad[~explicit]
        if rows_bad.any():  # rows with unusable values get an id of their own (no duplicate noise)
            marks = pc.cast(pa.array(np.flatnonzero(~explicit)[rows_bad] + offset), pa.string())
            canonical = pc.replace_with_mask(canonical, pa.array(rows_bad), marks)
        hashed_ids, keys = _hash_ids(canonical)
        hashes[~explicit] = keys
        ids = hashed_ids if not explicit.any() else pc.replace_with_mask(ids, missing, hashed_ids)
    made = _Batch(offset, prompt, filled_negative, numbers, ids, explicit, hashes, seed_given)
    made.images = batch_images
    return made


def video_cost(
    height: np.ndarray, width: np.ndarray, num_frames: np.ndarray, steps: np.ndarray, geometry: LatentGeometry
) -> np.ndarray:
    """Cost of each video: image tokens (the family's `geometry`) x steps, as float64 (exact below
    2**53: a product of three int32 sizes may overflow int64)."""
    sizes = (v.astype(np.float64) for v in (height, width, num_frames))
    return geometry.image_tokens(*sizes) * steps


def _expand(b: _Batch, geometry: LatentGeometry) -> pa.RecordBatch:
    """One row per video of a validated batch (VIDEO_SCHEMA)."""
    nums, n = b.numbers, len(b.ids)
    count = nums["num_videos"]
    if (count == 1).all():
        take, index, video_id = np.arange(n), np.zeros(n, np.int64), b.ids
        prompt, negative, prompt_id = b.prompt, b.negative_prompt, b.ids
    else:
        take = np.repeat(np.arange(n), count)
        index = np.arange(len(take)) - np.repeat(np.cumsum(count) - count, count)
        indices = pa.array(take)
        prompt, negative, prompt_id = (a.take(indices) for a in (b.prompt, b.negative_prompt, b.ids))
        suffixed = pc.binary_join_element_wise(prompt_id, pc.cast(pa.array(index), pa.string()), "#")
        video_id = pc.if_else(pa.array(count[take] == 1), prompt_id, suffixed)
    h, w, f, steps = (nums[k][take] for k in ("height", "width", "num_frames", "num_inference_steps"))
    arrays = [video_id, prompt_id, pa.array(take + b.offset, pa.int64()), pa.array(index, pa.int32())]
    arrays += [prompt, negative, pa.array(b.row_seeds()[take] + index, pa.int64())]
    arrays += [pa.array(v, pa.int32()) for v in (h, w, f, steps)]
    arrays += [pa.array(nums[k][take], pa.float64()) for k in FLOAT_COLUMNS]
    cost = video_cost(h, w, f, steps, geometry)
    if b.images is None:
        arrays.append(pa.array(cost))
        arrays += [pa.nulls(len(take), pa.string())] * 3
    else:
        assert b.images.extra_cost is not None
        indices = pa.array(take)
        arrays.append(pa.array(cost + b.images.extra_cost[take]))
        arrays += [a.take(indices) for a in (b.images.sha256, b.images.frozen, b.images.source)]
    return pa.RecordBatch.from_arrays(arrays, schema=VIDEO_SCHEMA)


def default_geometry() -> LatentGeometry:
    """The latent geometry of hvbatch's default preset (for callers that name no model)."""
    return family_for_preset(default_preset()).geometry


def _open(path: str | Path) -> pq.ParquetFile:
    """The prompt file, read a column chunk at a time through a small buffer (pyarrow's default
    pre-buffering would keep the whole file in memory until the end of the read)."""
    return pq.ParquetFile(path, pre_buffer=False, buffer_size=1 << 20)


def _batches(parquet: pq.ParquetFile, path: str | Path, columns: list[str]) -> Iterator[pa.RecordBatch]:
    """The file's record batches; a page that cannot be decoded names the file instead of a traceback."""
    size = IMAGE_BATCH_ROWS if IMAGE_COLUMN in columns else BATCH_ROWS
    batches = parquet.iter_batches(batch_size=size, columns=columns)
    while True:
        try:
            batch = next(batches, None)
        except (OSError, pa.ArrowException) as err:
            raise PromptFileError(
                path, [f"{path}: is corrupt: a data page cannot be read ({err}); write the file again"]
            ) from err
        if batch is None:
            return
        yield batch


@dataclass
class PromptScan:
    """What one validating read of a prompt file leaves: its known columns and every row's id."""

    path: Path
    columns: list[str]
    """The known columns with a usable type (what a second read of the file reads)."""
    num_rows: int
    ids: PromptIds
    stamp: tuple[int, int, int] = (0, 0, 0)
    """The file's inode, size and mtime when the scan began: a second read checks them."""
    images: PromptImages | None = None
    """Every row's checked image (a file with an image column)."""


def _stamp(path: str | Path) -> tuple[int, int, int]:
    st = os.stat(path)
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def scan_prompts(
    path: str | Path,
    defaults: SamplingConfig,
    on_batch: Callable[[_Batch, bool], None],
    geometry: LatentGeometry,
    image_options: ImageOptions | None = None,
) -> PromptScan:
    """Validate a prompt file batch by batch, calling `on_batch(batch, clean)` for each (`clean`:
    no problem found so far), then check ids and defaults. Raises one `PromptFileError` listing
    every problem (module docstring), each with the file, the column and the row numbers (0-based
    rows of the file; the first few rows of each problem are listed and all are counted; bad images
    one per line). `image_options`: how images are taken (default: the model takes none)."""
    problems = _Problems(path)
    try:
        stamp = _stamp(path)
        parquet = _open(path)
        schema = parquet.schema_arrow
    except (OSError, pa.ArrowException) as err:
        raise PromptFileError(path, [f"{path}: cannot be read as a Parquet file ({err})"]) from err
    usable = _check_columns(schema, problems)
    if parquet.metadata.num_rows == 0:
        problems.add("file", "has no rows; add at least one prompt")
    used: dict[str, int] = {}
    ids = PromptIds("id" in usable, parquet.metadata.num_rows)
    images = None
    if IMAGE_COLUMN in usable:
        options = image_options or ImageOptions(None)
        images = PromptImages(parquet.metadata.num_rows, options, Path(path).resolve().parent)
    offset = 0
    for batch in _batches(parquet, path, usable) if usable else ():
        b = _read_batch(batch, offset, defaults, used, problems, geometry, images=images)
        ids.add(b)
        on_batch(b, not problems)
        offset += batch.num_rows
    if offset:
        ids.check_duplicates(problems)
    if images is not None:
        images.finish(problems)
    for name, count in used.items():
        if count and (name in usable or name not in schema.names) and name in _CONFIG_NUMBERS:
            _check_default(name, getattr(defaults, name), count, problems, geometry)
    problems.raise_if_any()
    return PromptScan(Path(path), usable, offset, ids, stamp, images)


def changed_while_read(path: Path) -> PromptFileError:
    return PromptFileError(
        path,
        [f"{path}: changed while hvbatch read it; nothing was submitted: remove the half-made run "
         "directory and submit again once the file is complete"],
    )  # fmt: skip


def reread_batches(
    scan: PromptScan, defaults: SamplingConfig, geometry: LatentGeometry
) -> Iterator[_Batch]:
    """The validated file's batches again, in the same order and with the same values and ids as
    the scan's (ids are not made again: they come from `scan.ids`). Raises `PromptFileError` if the
    file changed since the scan (what was checked is not what would be submitted)."""
    changed = changed_while_read(scan.path)
    if _stamp(scan.path) != scan.stamp:
        raise changed
    parquet = _open(scan.path)
    offset, problems = 0, _Problems(scan.path)
    for batch in _batches(parquet, scan.path, scan.columns):
        ids = scan.ids.slice(offset, batch.num_rows)
        b = _read_batch(batch, offset, defaults, {}, problems, geometry, ids=ids, images=scan.images)
        if problems or len(ids) != batch.num_rows:
            raise changed
        yield b
        offset += batch.num_rows
    if offset != scan.num_rows or _stamp(scan.path) != scan.stamp:
        raise changed


def read_prompts(
    path: str | Path,
    defaults: SamplingConfig,
    geometry: LatentGeometry | None = None,
    image_options: ImageOptions | None = None,
) -> pa.Table:
    """Read and validate a prompt Parquet file; return one row per video (schema: `VIDEO_SCHEMA`),
    in file order. Columns, defaults and id rules: the module docstring; problems: `scan_prompts`.
    Sizes are checked and costs counted by the model family's `geometry` (default: that of
    hvbatch's default preset). The whole table is in memory: `prompt_index.index_prompts` keeps
    only what sharding needs."""
    geometry = geometry or default_geometry()
    videos: list[pa.RecordBatch] = []
    def keep(b: _Batch, clean: bool) -> None:
        if clean:
            videos.append(_expand(b, geometry))

    scan_prompts(path, defaults, keep, geometry, image_options)
    return pa.Table.from_batches(videos, VIDEO_SCHEMA)
