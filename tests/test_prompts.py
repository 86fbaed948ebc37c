"""Prompt files: validation (exact rows in messages), defaults, expansion, ids, sharding, speed."""

from __future__ import annotations

import hashlib
import heapq
import math
import re
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hvbatch.batch.control import prompts, shards
from hvbatch.batch.control.prompts import VIDEO_SCHEMA, PromptFileError, read_prompts
from hvbatch.batch.control.shards import max_shard_cost_for_walltime, shard_summary, shard_videos
from hvbatch.config import SamplingConfig
from tests.helpers import image_tokens, latent_shape

DEFAULTS = SamplingConfig()


def write(tmp_path: Path, columns: dict[str, object], name: str = "prompts.parquet") -> Path:
    path = tmp_path / name
    pq.write_table(pa.table(columns), path)
    return path


def problems_of(path: Path, defaults: SamplingConfig = DEFAULTS) -> list[str]:
    with pytest.raises(PromptFileError) as info:
        read_prompts(path, defaults)
    assert isinstance(info.value, ValueError)
    return info.value.problems


def only_problem(path: Path, defaults: SamplingConfig = DEFAULTS) -> str:
    problems = problems_of(path, defaults)
    assert len(problems) == 1, problems
    return problems[0]


def videos(n: int, cost: float = 10.0) -> pa.Table:
    """A minimal videos table (the columns shard_videos reads) with n videos of equal cost."""
    return pa.table(
        {
            "video_id": [f"v{i:06d}" for i in range(n)],
            "row": pa.array(range(n), pa.int64()),
            "video_index": pa.array([0] * n, pa.int32()),
            "cost": pa.array([cost] * n, pa.float64()),
        }
    )


# --------------------------------------------------------------------------------- reading


def test_defaults_fill_missing_columns_and_schema_is_exact(tmp_path: Path) -> None:
    defaults = SamplingConfig(height=544, width=960, num_frames=65, num_inference_steps=30, seed=7)
    defaults.negative_prompt, defaults.guidance_scale, defaults.flow_shift = "blurry", 5.0, 9.0
    table = read_prompts(write(tmp_path, {"prompt": ["a cat", "a dog"]}), defaults)
    assert table.schema == VIDEO_SCHEMA
    row = table.to_pylist()[1]
    assert row["prompt"] == "a dog" and row["negative_prompt"] == "blurry" and row["row"] == 1
    assert (row["height"], row["width"], row["num_frames"], row["num_inference_steps"]) == (544, 960, 65, 30)
    assert (row["guidance_scale"], row["flow_shift"], row["video_index"]) == (5.0, 9.0, 0)
    assert row["video_id"] == row["prompt_id"] and re.fullmatch(r"[0-9a-f]{16}", row["prompt_id"])
    # No seed column: a seed derived from the prompt id and sampling.seed (README "Prompts").
    assert row["seed"] == derived_seed(row["prompt_id"], salt=7) != table.to_pylist()[0]["seed"]
    assert row["cost"] == 17 * 34 * 60 * 30


def derived_seed(prompt_id: str, salt: int = 0) -> int:
    """The documented rule (README "Prompts"), written out independently of `seeds.py`."""
    digest = hashlib.blake2b(f"{salt}:{prompt_id}".encode(), digest_size=8, person=b"hvbatch-seed").digest()
    return int.from_bytes(digest[:4], "big")


def test_nulls_in_optional_columns_take_defaults(tmp_path: Path) -> None:
    columns = {
        "prompt": ["a", "b"],
        "negative_prompt": [None, "ugly"],
        "seed": [None, 3],
        "height": [None, 544],
        "width": [960, None],
        "num_frames": [None, 33],
        "num_inference_steps": [None, 20],
        "guidance_scale": [None, 1.5],
        "flow_shift": [2.0, None],
        "num_videos": [None, 1],
    }
    rows = read_prompts(write(tmp_path, columns), DEFAULTS).to_pylist()
    keys = [k for k in columns if k != "num_videos"]
    assert [tuple(r[k] for k in keys) for r in rows] == [
        ("a", "", derived_seed(rows[0]["prompt_id"]), 720, 960, 129, 50, 6.0, 2.0),
        ("b", "ugly", 3, 544, 1280, 33, 20, 1.5, 7.0),
    ]


def test_num_videos_expands_with_consecutive_seeds(tmp_path: Path) -> None:
    columns = {
        "prompt": ["a", "b", "c", "d"],
        "id": ["x", "y", "z", "w"],
        "seed": [10, None, 5, None],
        "num_videos": [3, 1, 2, 2],
    }
    rows = read_prompts(write(tmp_path, columns), DEFAULTS).to_pylist()
    got = [(r["video_id"], r["prompt_id"], r["row"], r["video_index"], r["seed"]) for r in rows]
    assert got == [
        ("x#0", "x", 0, 0, 10),
        ("x#1", "x", 0, 1, 11),
        ("x#2", "x", 0, 2, 12),
        ("y", "y", 1, 0, derived_seed("y")),  # no seed: derived from the prompt id
        ("z#0", "z", 2, 0, 5),
        ("z#1", "z", 2, 1, 6),
        ("w#0", "w", 3, 0, derived_seed("w")),
        ("w#1", "w", 3, 1, derived_seed("w") + 1),
    ]
    assert len({derived_seed("y"), derived_seed("w"), derived_seed("w", salt=1)}) == 3


def test_cost_is_image_tokens_times_steps(tmp_path: Path) -> None:
    sizes = [(720, 1280, 129, 50), (544, 960, 65, 30), (16, 32, 1, 1), (480, 848, 33, 7)]
    columns = {"prompt": [f"p{i}" for i in range(4)]}
    for j, key in enumerate(("height", "width", "num_frames", "num_inference_steps")):
        columns[key] = [s[j] for s in sizes]
    table = read_prompts(write(tmp_path, columns), DEFAULTS)
    assert table.column("cost").to_pylist() == [image_tokens(h, w, f) * n for h, w, f, n in sizes]
    assert table.column("cost")[0].as_py() == 118_800 * 50


def test_ids_are_stable_hashes_of_content(tmp_path: Path) -> None:
    base = {"prompt": ["a cat", "a dog", "a fox"], "height": [720, None, 544], "seed": [1, 2, None]}
    base["guidance_scale"] = [6, None, 7]
    ids = read_prompts(write(tmp_path, base, "a.parquet"), DEFAULTS).column("prompt_id").to_pylist()
    again = read_prompts(write(tmp_path, base, "b.parquet"), DEFAULTS).column("prompt_id").to_pylist()
    assert ids == again and len(set(ids)) == 3
    reordered = {k: v[::-1] for k, v in base.items()} | {"notes": ["x", "y", "z"]}
    table = read_prompts(write(tmp_path, reordered, "c.parquet"), SamplingConfig(seed=9, height=480))
    assert table.column("prompt_id").to_pylist() == ids[::-1]  # content as written: defaults do not count
    as_floats = base | {"height": [720.0, None, 544.0], "guidance_scale": [6.0, None, 7.0]}
    assert (
        read_prompts(write(tmp_path, as_floats, "d.parquet"), DEFAULTS).column("prompt_id").to_pylist() == ids
    )
    changed = base | {"seed": [1, 2, 3]}
    changed_ids = (
        read_prompts(write(tmp_path, changed, "e.parquet"), DEFAULTS).column("prompt_id").to_pylist()
    )
    assert changed_ids[:2] == ids[:2] and changed_ids[2] != ids[2]


def test_integer_id_column_and_partial_ids(tmp_path: Path) -> None:
    rows = read_prompts(write(tmp_path, {"prompt": ["a", "b"], "id": [42, -3]}), DEFAULTS).to_pylist()
    assert [r["prompt_id"] for r in rows] == ["42", "-3"]
    mixed = read_prompts(
        write(tmp_path, {"prompt": ["a", "b"], "id": ["first", None]}, "m.parquet"), DEFAULTS
    )
    first, second = mixed.column("prompt_id").to_pylist()
    assert first == "first" and re.fullmatch(r"[0-9a-f]{16}", second)


def test_text_types_dictionary_and_large_string(tmp_path: Path) -> None:
    columns = {
        "prompt": pa.array(["a", "b", "a2"]).dictionary_encode(),
        "negative_prompt": pa.array(["n", None, "m"], pa.large_string()),
        "height": pa.array([720, 544, 480], pa.uint16()),
    }
    rows = read_prompts(write(tmp_path, columns), DEFAULTS).to_pylist()
    assert [(r["prompt"], r["negative_prompt"], r["height"]) for r in rows] == [
        ("a", "n", 720),
        ("b", "", 544),
        ("a2", "m", 480),
    ]


def test_unknown_columns_are_ignored(tmp_path: Path) -> None:
    columns = {"prompt": ["a"], "category": ["animals"], "score": [0.5], "source_url": ["http://x"]}
    table = read_prompts(write(tmp_path, columns), DEFAULTS)
    assert table.schema == VIDEO_SCHEMA and table.num_rows == 1
    # a near-miss name is only refused while the column it resembles is absent
    both = {"prompt": ["a"], "seed": [3], "seeds": [[1, 2]], "Prompt": ["other"]}
    assert read_prompts(write(tmp_path, both, "both.parquet"), DEFAULTS).column("seed").to_pylist() == [3]


# ------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("column", "values", "message"),
    [
        ("height", [720, 721, 0, 736, 100], "column height: 3 rows not a positive multiple of 16 "
         "(rows 1, 2, 4; nearest valid for row 1: 720 or 736)"),
        ("width", [1280, 1279], "column width: 1 row not a positive multiple of 16 "
         "(row 1; nearest valid for row 1: 1264 or 1280)"),
        ("height", [2**31], "column height: 1 row too large (over 2147483647) (row 0)"),
        ("num_frames", [129, 128, 1, 0], "column num_frames: 2 rows not of the form 4k+1 "
         "(rows 1, 3; nearest valid for row 1: 125 or 129)"),
        ("num_inference_steps", [50, 0, -1], "column num_inference_steps: 2 rows less than 1 (must be >= 1) "
         "(rows 1, 2)"),
        ("num_videos", [1, 0], "column num_videos: 1 row less than 1 (must be >= 1) (row 1)"),
        ("num_videos", [1, 100_001], "column num_videos: 1 row too large (over 100000) (row 1)"),
        ("seed", [5, -1], "column seed: 1 row negative (must be >= 0) (row 1)"),
        ("seed", pa.array([1, 2**63], pa.uint64()), "column seed: 1 row too large (over 9223372036854775807) "
         "(row 1)"),
        ("guidance_scale", [6.0, -0.5], "column guidance_scale: 1 row negative (must be >= 0) (row 1)"),
        ("guidance_scale", [float("nan"), 1.0], "column guidance_scale: 1 row not a finite number (row 0)"),
        ("flow_shift", [0.0, 7.0, -1.0], "column flow_shift: 2 rows not positive (must be > 0) (rows 0, 2)"),
        ("height", [720.0, 720.5], "column height: 1 row not a whole number (row 1)"),
        ("num_frames", [float("inf"), 129.0], "column num_frames: 1 row not a finite number (row 0)"),
        ("height", ["720", "544"], "column height: type string, expected integers (int8..int64, or floats "
         "holding whole numbers)"),
        ("guidance_scale", [True, False], "column guidance_scale: type bool, expected numbers"),
        ("negative_prompt", [1, 2], "column negative_prompt: type int64, expected strings"),
        ("id", [1.5, 2.5], "column id: type double, expected strings or integers"),
        ("id", ["a\nb", "ok/..", "x#1"], "column id: 2 rows containing # or a control character "
         "(rows 0, 2)"),
        ("id", ["  ", "ok", ".."], "column id: 1 row empty or whitespace-only (row 0)"),
        ("id", ["ok", "x" * 201], "column id: 1 row longer than 200 bytes (row 1)"),
        ("id", ["ok", ".."], "column id: 1 row equal to . or .. (row 1)"),
    ],
)  # fmt: skip
def test_each_rule_names_file_column_and_rows(
    tmp_path: Path, column: str, values: object, message: str
) -> None:
    n = len(values)  # type: ignore[arg-type]
    columns = {"prompt": [f"prompt {i}" for i in range(n)], column: values}
    problems = problems_of(write(tmp_path, columns))
    assert f"{tmp_path / 'prompts.parquet'}: {message}" in problems, problems


def test_prompt_rules_and_many_rows_are_counted(tmp_path: Path) -> None:
    prompt = ["ok", None, " \t", "", "fine", None]
    problems = problems_of(write(tmp_path, {"prompt": prompt, "id": ["1", "2", "3", "4", "5", "6"]}))
    path = tmp_path / "prompts.parquet"
    assert problems == [
        f"{path}: column prompt: 2 rows null (rows 1, 5)",
        f"{path}: column prompt: 2 rows empty or whitespace-only (rows 2, 3)",
    ]
    heights = [721] * 8 + [720]
    message = only_problem(write(tmp_path, {"prompt": [f"p{i}" for i in range(9)], "height": heights}))
    assert message.endswith(
        "column height: 8 rows not a positive multiple of 16 (rows 0, 1, 2, 3, 4, ... (3 more); "
        "nearest valid for row 0: 720 or 736)"
    )


def test_row_numbers_count_across_batches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(prompts, "BATCH_ROWS", 4)
    heights = [720] * 12
    for bad in (1, 6, 9, 11):
        heights[bad] = 700
    columns = {"prompt": [f"p{i}" for i in range(12)], "height": heights}
    message = only_problem(write(tmp_path, columns))
    assert message.endswith(
        "4 rows not a positive multiple of 16 (rows 1, 6, 9, 11; nearest valid for row 1: 688 or 704)"
    )
    columns = {
        "prompt": [f"p{i}" for i in range(10)],
        "id": ["a", "b", "c", "d", "e", "a", "f", "g", "b", "h"],
    }
    message = only_problem(write(tmp_path, columns, "dup.parquet"))
    assert "column id: 2 duplicate ids shared by 4 rows ('a' in rows 0, 5; 'b' in rows 1, 8)" in message


def test_seed_overflow_duplicate_columns_and_explicit_id_equal_to_a_hash(tmp_path: Path) -> None:
    columns = {"prompt": ["a", "b"], "seed": pa.array([2**63 - 1, 5], pa.int64()), "num_videos": [2, 1]}
    assert only_problem(write(tmp_path, columns)).endswith(
        "columns seed, num_videos: 1 row with seed + num_videos - 1 over 2**63-1 (row 0)"
    )
    path = tmp_path / "twice.parquet"
    pq.write_table(pa.Table.from_arrays([pa.array(["a"]), pa.array(["b"])], names=["prompt", "prompt"]), path)
    assert problems_of(path)[0] == f"{path}: column prompt: appears 2 times; keep one"
    hashed = read_prompts(write(tmp_path, {"prompt": ["b"]}, "b.parquet"), DEFAULTS).column("prompt_id")[0]
    clash = write(tmp_path, {"prompt": ["a", "b"], "id": [hashed.as_py(), None]}, "clash.parquet")
    assert only_problem(clash).endswith(
        f"ids: 1 duplicate id shared by 2 rows ('{hashed}' in rows 0, 1); an explicit id equals another "
        "row's hashed id: change the explicit id"
    )


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    columns = {
        "prompt": ["a", "  ", "c", "d"],
        "height": [720, 721, 720, 720],
        "num_frames": [129, 129, 2, 129],
        "id": ["x", "y", "x", "z"],
        "seeds": [1, 2, 3, 4],
    }
    path = write(tmp_path, columns)
    problems = problems_of(path)
    assert len(problems) == 5, problems
    assert all(p.startswith(f"{path}: ") for p in problems)
    joined = "\n".join(problems)
    for part in (
        "column seeds: unknown column; did you mean seed?",
        "column prompt: 1 row empty or whitespace-only (row 1)",
        "column height: 1 row not a positive multiple of 16 (row 1; nearest valid for row 1: 720 or 736)",
        "column num_frames: 1 row not of the form 4k+1 (row 2; nearest valid for row 2: 1 or 5)",
        "column id: 1 duplicate id shared by 2 rows ('x' in rows 0, 2)",
    ):
        assert part in joined
    with pytest.raises(PromptFileError, match=r"5 problems in prompt file .*prompts\.parquet:\n  - "):
        read_prompts(path, DEFAULTS)


def test_duplicate_hashed_ids_name_both_rows(tmp_path: Path) -> None:
    columns = {"prompt": ["a", "b", "a", "a"], "seed": [1, 1, 1, 2], "num_videos": [1, 1, 4, 1]}
    message = only_problem(write(tmp_path, columns))
    assert "hashed ids: 1 duplicate id shared by 2 rows ('" in message and "' in rows 0, 2)" in message
    assert "give them distinct values in an id column" in message
    columns["id"] = ["p", None, "q", None]
    read_prompts(write(tmp_path, columns, "fixed.parquet"), DEFAULTS)  # explicit ids resolve it


def test_near_miss_column_names_are_refused(tmp_path: Path) -> None:
    columns = {"Prompt": ["a"], "num_frame": [129], "steps": [30], "cfg_scale": [3.0]}
    problems = problems_of(write(tmp_path, columns))
    joined = "\n".join(problems)
    assert "column Prompt: unknown column; did you mean prompt? Rename it to prompt" in joined
    assert "column num_frame: unknown column; did you mean num_frames?" in joined
    assert "column steps: unknown column; did you mean num_inference_steps?" in joined
    assert "column cfg_scale: is a per-batch setting: set sampling.cfg_scale in the config instead" in joined
    assert "column prompt: missing; it is the one required column (string columns found: Prompt;" in joined
    assert len(problems) == 5


def test_invalid_defaults_are_reported_when_used(tmp_path: Path) -> None:
    path = write(tmp_path, {"prompt": ["a", "b"], "height": [720, None]})
    assert problems_of(path, SamplingConfig(height=721, width=1000)) == [
        f"{path}: sampling.height=721 (the config default, used by 1 row where column height is missing or "
        "null): not a positive multiple of 16 (nearest valid: 720 or 736)",
        f"{path}: sampling.width=1000 (the config default, used by 2 rows where column width is missing or "
        "null): not a positive multiple of 16 (nearest valid: 992 or 1008)",
    ]
    unused = write(tmp_path, {"prompt": ["a"], "height": [720], "width": [1280]}, "full.parquet")
    assert read_prompts(unused, SamplingConfig(height=721, width=1000)).num_rows == 1


def test_unreadable_and_empty_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad.parquet"
    bad.write_text("not parquet")
    assert only_problem(bad).startswith(f"{bad}: cannot be read as a Parquet file")
    assert only_problem(tmp_path / "missing.parquet").startswith(
        f"{tmp_path / 'missing.parquet'}: cannot be read"
    )
    empty = write(tmp_path, {"prompt": pa.array([], pa.string())}, "empty.parquet")
    assert only_problem(empty) == f"{empty}: file: has no rows; add at least one prompt"


def test_nearest_values_agree_with_latent_shape() -> None:
    for value in (0, 5, 15, 17, 721, 1279, 1300):
        with pytest.raises(ValueError, match=re.escape(f"nearest valid: {prompts._nearest(value, 16, 16)})")):
            latent_shape(value, 16, 1)
    for frames in (0, 2, 4, 128, 130):
        with pytest.raises(ValueError, match=re.escape(f"nearest valid: {prompts._nearest(frames, 4, 1)})")):
            latent_shape(16, 16, frames)


# --------------------------------------------------------------------------------- sharding


def check_partition(table: pa.Table, shards: list[pa.Table]) -> None:
    ids = [v for s in shards for v in s.column("video_id").to_pylist()]
    assert sorted(ids) == sorted(table.column("video_id").to_pylist())  # each video exactly once
    total = sum(s["cost"] for s in shard_summary(shards))
    assert total == pytest.approx(float(np.sum(table.column("cost").to_numpy())), rel=1e-12)
    for shard in shards:
        keys = list(
            zip(shard.column("row").to_pylist(), shard.column("video_index").to_pylist(), strict=True)
        )
        assert keys == sorted(keys)  # file order inside a shard


def test_sharding_equal_videos_is_balanced() -> None:
    table = videos(1003)
    shards = shard_videos(table, max_shard_cost=1000.0)  # 100 videos of cost 10 per shard at most
    assert len(shards) == 11
    sizes = [s.num_rows for s in shards]
    assert max(sizes) - min(sizes) <= 1 and max(sizes) <= 100
    check_partition(table, shards)
    assert [s["index"] for s in shard_summary(shards)] == list(range(11))
    assert shard_summary(shards)[0]["cost"] == 10.0 * sizes[0] and shard_summary(shards)[0]["warning"] is None


def test_sharding_is_deterministic_and_respects_the_limit() -> None:
    rng = np.random.default_rng(0)
    costs = rng.choice([118_800.0, 61_200.0, 23_256.0, 8_160.0], 5000) * rng.choice([30, 50], 5000)
    table = videos(5000).set_column(3, "cost", pa.array(costs))
    limit = 20 * 118_800 * 50
    shards = shard_videos(table, max_shard_cost=limit, min_shards=3)
    check_partition(table, shards)
    loads = [s["cost"] for s in shard_summary(shards)]
    assert max(loads) <= limit and len(shards) >= math.ceil(sum(loads) / limit)
    assert max(loads) / min(loads) < 1.01
    again = shard_videos(table, max_shard_cost=limit, min_shards=3)
    assert [s.column("video_id").to_pylist() for s in again] == [
        s.column("video_id").to_pylist() for s in shards
    ]
    shuffled = table.take(pa.array(rng.permutation(5000)))  # same videos in another order: same shards
    other = shard_videos(shuffled, max_shard_cost=limit, min_shards=3)
    assert [s.column("video_id").to_pylist() for s in other] == [
        s.column("video_id").to_pylist() for s in shards
    ]


def test_sharding_min_shards_and_big_videos() -> None:
    assert [s.num_rows for s in shard_videos(videos(10), max_shard_cost=1e9, min_shards=4)] == [3, 3, 2, 2]
    assert len(shard_videos(videos(3), max_shard_cost=1e9, min_shards=8)) == 3
    assert shard_videos(videos(0), max_shard_cost=1.0) == []
    # items of 0.4 x the limit: two fit per shard, three do not, so LPT needs 5 shards for 10
    assert [s.num_rows for s in shard_videos(videos(10, cost=4.0), max_shard_cost=10.0)] == [2] * 5


def test_oversize_video_gets_its_own_shard_with_a_warning() -> None:
    table = videos(6).set_column(3, "cost", pa.array([5.0, 50.0, 5.0, 5.0, 70.0, 5.0]))
    shards = shard_videos(table, max_shard_cost=20.0)
    summary = shard_summary(shards)
    assert [s.column("video_id").to_pylist() for s in shards] == [
        ["v000000", "v000002", "v000003", "v000005"],
        ["v000001"],
        ["v000004"],
    ]
    assert summary[0]["warning"] is None
    assert summary[2]["warning"].startswith("video v000004 (row 4) costs 70, more than max_shard_cost=20:")
    assert summary[1]["cost"] == 50.0 and summary[1]["warning"] is not None


def test_bulk_lpt_equals_heap_greedy() -> None:
    rng = np.random.default_rng(1)
    for k in (1, 3, 17, 64):
        costs = np.sort(rng.choice([1.0, 2.0, 3.0, 7.0, 40.0], 3000) * rng.integers(1, 4, 3000))[::-1]
        heap, expected = [(0.0, s) for s in range(k)], []
        for c in costs:
            load, s = heap[0]
            heapq.heapreplace(heap, (load + c, s))
            expected.append(s)
        assert shards._lpt(costs, k).tolist() == expected


def test_max_shard_cost_for_walltime() -> None:
    assert max_shard_cost_for_walltime(60, 0.5, 4, reserve_s=600) == (3600 - 600) * 4 / 0.5
    with pytest.raises(
        ValueError, match=r"a walltime of 10 min \(600 s\) leaves no time after the reserve of 900 s"
    ):
        max_shard_cost_for_walltime(10, 0.5, 1, reserve_s=900)
    with pytest.raises(
        ValueError, match="seconds_per_cost_unit must be > 0, got 0; num_dp_groups must be >= 1"
    ):
        max_shard_cost_for_walltime(10, 0, 0, reserve_s=0)
    with pytest.raises(ValueError, match="max_shard_cost must be a positive number"):
        shard_videos(videos(2), max_shard_cost=0.0)


# ---------------------------------------------------------------------------------- speed


def test_200k_rows_read_validate_and_shard_quickly(tmp_path: Path) -> None:
    n = 200_000
    rng = np.random.default_rng(0)
    columns = {
        "prompt": [f"a red fox number {i} walks in the snow" for i in range(n)],
        "height": pa.array(rng.choice([480, 544, 720], n), mask=rng.random(n) < 0.1),
        "num_frames": rng.choice([33, 65, 129], n),
        "num_inference_steps": rng.choice([30, 50], n).astype(float),
        "num_videos": np.where(rng.random(n) < 0.05, 2, 1),
    }
    path = write(tmp_path, columns)
    start = time.perf_counter()
    table = read_prompts(path, DEFAULTS)
    shards = shard_videos(table, max_shard_cost=100 * 118_800 * 50)
    elapsed = time.perf_counter() - start
    assert table.num_rows == n + int(np.sum(columns["num_videos"] == 2))
    assert sum(s.num_rows for s in shards) == table.num_rows
    assert elapsed < 15, f"{elapsed:.1f} s"


def test_true_cfg_doubles_the_work_and_a_cfg_group_shares_it(tmp_path: Path) -> None:
    """Shards are sized for two CFG branches per video, divided by the GPUs of the video's group."""
    from hvbatch.batch.control.commands import gpu_seconds_per_cost
    from hvbatch.config import load_config

    plain = load_config(None, ["model=tiny"])
    cfg = load_config(None, ["model=tiny", "sampling.cfg_scale=5"])
    assert gpu_seconds_per_cost(cfg) == 2 * gpu_seconds_per_cost(plain)
