"""Run-directory helpers: safe names, atomic parts, the manifest cache."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pyarrow as pa

from hvbatch.batch.rundir import MANIFEST_SCHEMA, RunDir, video_file_name, write_parquet_atomic


def test_video_file_names_are_safe_and_unique() -> None:
    ids = ["a/b", "a_b", "../../etc/passwd", "two words", "é清", "", ".", "x" * 500, "a\\b", "a\nb"]
    names = [video_file_name(i) for i in ids]
    assert len(set(names)) == len(ids)
    for name in names:
        assert "/" not in name and "\\" not in name and "\n" not in name and not name.startswith(".")
        assert name.endswith(".mp4") and len(name) < 100
        assert name.isascii()


def _row(video_id: str, status: str = "done") -> dict[str, object]:
    return {name: None for name in MANIFEST_SCHEMA.names} | {
        "video_id": video_id,
        "status": status,
        "shard": 0,
    }


def test_manifest_cache_follows_rewritten_parts(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    for key in ("a", "b"):
        write_parquet_atomic(
            run.manifest_part(0, key, 0), pa.Table.from_pylist([_row(f"{key}1")], MANIFEST_SCHEMA)
        )
    assert sorted(run.manifest_rows()["video_id"].to_pylist()) == ["a1", "b1"]
    assert (tmp_path / "manifest-cache.parquet").is_file()
    time.sleep(0.01)  # a later mtime, as a job rewriting its part after its next video
    rows = [_row("b1"), _row("b2", "failed")]
    write_parquet_atomic(run.manifest_part(0, "b", 0), pa.Table.from_pylist(rows, MANIFEST_SCHEMA))
    write_parquet_atomic(run.manifest_part(1, "c", 0), pa.Table.from_pylist([_row("c1")], MANIFEST_SCHEMA))
    assert sorted(run.manifest_rows()["video_id"].to_pylist()) == ["a1", "b1", "b2", "c1"]
    assert sorted(run.manifest_rows(0)["video_id"].to_pylist()) == ["a1", "b1", "b2"]
    assert not [p for p in os.listdir(tmp_path / "manifest") if p.startswith(".")]  # no temporaries left
