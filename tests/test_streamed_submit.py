"""The streamed submit: one validating read keeping arrays, shards from arrays, frozen files from a
second read through spill files. It must make exactly the run the in-memory path makes."""

from __future__ import annotations

import filecmp
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hvbatch.batch.control import commands, frozen, prompts
from hvbatch.batch.control.prompt_index import index_prompts
from hvbatch.batch.control.prompts import PromptFileError, read_prompts
from hvbatch.batch.control.shards import shard_summary, shard_videos
from hvbatch.batch.rundir import RunDir
from hvbatch.cli import main
from hvbatch.config import SamplingConfig, load_config

CONFIG = load_config(overrides=["model=tiny", "sampling.negative_prompt=blurry"])


def _mixed_file(path: Path, explicit_ids: bool) -> Path:
    """Nulls taking defaults, rows of several videos (#10 sorts before #2), and ids where one is
    another plus a space or '!' (which sort before the '#' of the other's video ids)."""
    rng = np.random.default_rng(3)
    n = 700
    columns: dict[str, object] = {
        "prompt": [f"a fox number {i}" for i in range(n)],
        "negative_prompt": pa.array(["ugly"] * n, mask=rng.random(n) < 0.5),
        "height": pa.array(rng.choice([16, 32, 48], n), mask=rng.random(n) < 0.2),
        "num_frames": pa.array(rng.choice([1, 5, 9], n).astype(float), mask=rng.random(n) < 0.2),
        "seed": pa.array(rng.integers(0, 1000, n), mask=rng.random(n) < 0.3),
        "cache_threshold": pa.array(rng.choice([0.05, 0.2], n), mask=rng.random(n) < 0.6),
        "num_videos": np.where(rng.random(n) < 0.1, 12, 1),
    }
    if explicit_ids:
        ids = [None if rng.random() < 0.4 else f"cat{i % 50}" + " x" * (i // 50) for i in range(n)]
        ids[:4] = ["cat", "cat 2", "cat!", "ca"]
        columns["id"] = pa.array(ids)
        columns["num_videos"][:4] = [12, 3, 1, 2]  # type: ignore[index]
    pq.write_table(pa.table(columns), path, row_group_size=150)  # several row groups and batches
    return path


@pytest.mark.parametrize("explicit_ids", [False, True])
def test_the_streamed_path_makes_the_same_run_as_the_table_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, explicit_ids: bool
) -> None:
    monkeypatch.setattr(prompts, "BATCH_ROWS", 64)  # many batches
    monkeypatch.setattr(frozen, "SPILL_BYTES", 20_000)  # many spill files
    path = _mixed_file(tmp_path / "p.parquet", explicit_ids)
    table = read_prompts(path, CONFIG.sampling)
    index = index_prompts(path, CONFIG.sampling)
    assert index.num_videos == table.num_rows > 700
    assert index.largest == table.slice(int(np.argmax(table["cost"].to_numpy())), 1).to_pylist()[0]
    costliest = float(table["cost"].to_numpy().max())
    for max_cost, min_shards in ((costliest * 0.5, 1), (costliest * 7, 1), (1e18, 9)):
        old = shard_videos(table, max_shard_cost=max_cost, min_shards=min_shards)
        layout = index.layout(max_shard_cost=max_cost, min_shards=min_shards)
        assert layout.summary() == pytest.approx(shard_summary(old))
    assert any(entry["warning"] for entry in layout.summary()) is False
    oversize = index.layout(max_shard_cost=costliest * 0.5)
    too_costly = int((table["cost"].to_numpy() > costliest * 0.5).sum())
    assert sum(1 for e in oversize.summary() if e["warning"]) == too_costly > 0

    max_cost = costliest * 7
    old_run, new_run = RunDir(tmp_path / "old"), RunDir(tmp_path / "new")
    commands.create_run(old_run, CONFIG, path, shard_videos(table, max_shard_cost=max_cost), "local")
    streamed = frozen.StreamedShards(index, index.layout(max_shard_cost=max_cost))
    commands.create_run(new_run, CONFIG, path, streamed, "local")
    assert 10 < old_run.num_shards() == new_run.num_shards()
    for shard in range(old_run.num_shards()):
        assert old_run.read_shard(shard).equals(new_run.read_shard(shard), check_metadata=True)
        assert filecmp.cmp(old_run.shard_path(shard), new_run.shard_path(shard), shallow=False)
    assert old_run.all_videos().equals(new_run.all_videos())
    assert old_run.read_run()["num_videos"] == new_run.read_run()["num_videos"] == table.num_rows
    leftovers = [p.name for p in tmp_path.glob("new/**/*") if p.name.startswith(".") or "spill" in p.name]
    assert leftovers == [".hvbatch-claim"]


def test_the_streamed_read_reports_the_same_problems(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(prompts, "BATCH_ROWS", 256)
    rows = 4_000
    columns = {
        "prompt": [f"p{i % 3_000}" for i in range(rows)],  # hashed-id duplicates across batches
        "height": [721 if i % 7 == 0 else 720 for i in range(rows)],
        "id": [None if i % 3 else f"id{i % 900}" for i in range(rows)],
    }
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table(columns), path)
    with pytest.raises(PromptFileError) as table_error:
        read_prompts(path, SamplingConfig())
    with pytest.raises(PromptFileError) as index_error:
        index_prompts(path, SamplingConfig())
    assert index_error.value.problems == table_error.value.problems
    assert len(index_error.value.problems) == 3
    joined = "\n".join(index_error.value.problems)
    # Bounded: the first rows and a count, whatever the number of bad rows.
    assert "column height: 572 rows not a positive multiple of 16 (rows 0, 7, 14, 21, 28, ... (567 more)" in (
        joined
    )
    assert len(joined) < 2_000


def test_a_file_changed_between_the_two_reads_is_refused(tmp_path: Path) -> None:
    path = _mixed_file(tmp_path / "p.parquet", explicit_ids=False)
    index = index_prompts(path, CONFIG.sampling)
    layout = index.layout(max_shard_cost=1e18, min_shards=3)
    table = pq.read_table(path)
    counts = table["num_videos"].to_numpy().copy()
    counts[5] += 1  # other videos than the ones checked and sharded
    pq.write_table(
        table.set_column(table.schema.get_field_index("num_videos"), "num_videos", pa.array(counts)), path
    )
    run = RunDir(tmp_path / "run")
    with pytest.raises(PromptFileError, match="changed while hvbatch read it; nothing was submitted"):
        commands.create_run(run, CONFIG, path, frozen.StreamedShards(index, layout), "local")
    assert not run.exists() and not (run.root / "shards").exists()
    assert sorted(p.name for p in run.root.iterdir()) == [".hvbatch-claim"]


def test_dry_run_and_submit_of_a_streamed_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _mixed_file(tmp_path / "p.parquet", explicit_ids=True)
    overrides = ["model=tiny", "sampling.cache=teacache", "batch.min_shards=5"]
    assert main(["submit", str(path), "--dry-run", *overrides]) == 0
    out = capsys.readouterr().out
    table = read_prompts(path, load_config(overrides=overrides).sampling)
    assert out.startswith(f"{table.num_rows} videos in ")
    assert "with step caching (teacache): ~" in out
    run_dir = tmp_path / "run"
    argv = ["submit", str(path), "--run-dir", str(run_dir), "--executor", "local", *overrides]
    from hvbatch.batch.executors.local import LocalExecutor

    submitted: list[list[int]] = []
    original = LocalExecutor.submit
    try:
        LocalExecutor.submit = lambda self, shards, **kw: submitted.append(shards) or []  # type: ignore[method-assign]
        assert main(argv) == 0
    finally:
        LocalExecutor.submit = original  # type: ignore[method-assign]
    run = RunDir(run_dir)
    shards_line = out.splitlines()[0].split(" in ")[1].split()[0]
    assert run.num_shards() == int(shards_line) == len(submitted[0]) == 5
    assert sum(run.read_shard(s).num_rows for s in range(run.num_shards())) == table.num_rows


MEMORY_PROBE = r"""
import json, sys
from pathlib import Path
from hvbatch.batch.control import commands, frozen
from hvbatch.batch.control.prompt_index import index_prompts
from hvbatch.batch.rundir import RunDir
from hvbatch.config import load_config
frozen.SPILL_BYTES = 4 * 2**20  # a few spill files whatever the rows: their memory is constant
config = load_config(overrides=["model=tiny"])
root = Path(sys.argv[1])
def peak():  # this process's own peak RSS (ru_maxrss would include its parent's, from before exec)
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
base = peak()
index = index_prompts(root / "p.parquet", config.sampling)
layout = index.layout(max_shard_cost=float(index.row_cost.max()) * 1000)
streamed = frozen.StreamedShards(index, layout)
commands.create_run(RunDir(root / "run"), config, root / "p.parquet", streamed, "local")
print(json.dumps({"bytes": (peak() - base) * 1024, "videos": index.num_videos, "shards": layout.num_shards}))
"""


def _peak_growth(folder: Path, rows: int) -> int:
    folder.mkdir()
    prompts = pa.array([f"a red fox {i} walks in the snow" for i in range(rows)])
    pq.write_table(pa.table({"prompt": prompts}), folder / "p.parquet", row_group_size=65_536)
    done = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, str(folder)],
        capture_output=True, text=True, check=True, timeout=300,
    )  # fmt: skip
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["videos"] == rows and result["shards"] == -(-rows // 1000)
    assert json.loads((folder / "run" / "run.json").read_text())["num_videos"] == rows
    return int(result["bytes"])


def test_memory_per_row_is_a_few_dozen_bytes(tmp_path: Path) -> None:
    """index, layout and the frozen files of 100k and 400k rows, each in a subprocess measuring
    its own peak RSS: the growth per extra row (about 60 bytes), well under the in-memory path's
    500-650 bytes."""
    small, large = _peak_growth(tmp_path / "small", 100_000), _peak_growth(tmp_path / "large", 400_000)
    per_row = (large - small) / 300_000
    assert per_row < 150, f"{per_row:.0f} bytes a row ({small / 2**20:.0f} MiB, {large / 2**20:.0f} MiB)"
