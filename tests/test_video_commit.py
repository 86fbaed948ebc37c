"""A final name only ever holds a whole video: the commit, its checks, a full disk, quarantine.

The disk-full cases write on a real tmpfs the test mounts (the suite runs as root). The end-to-end
versions through the local executor are in tests/test_faults_outside.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from hvbatch.batch.attempt import AttemptKey
from hvbatch.batch.files import (
    DiskFullError,
    read_json,
    read_parquet,
    write_json_atomic,
    write_parquet_atomic,
)
from hvbatch.batch.rundir import MANIFEST_SCHEMA, RunDir
from hvbatch.batch.runtime.support import commit_video, recover_orphans, remove_dead_temporaries
from hvbatch.config import SamplingConfig, VideoConfig
from hvbatch.mp4_check import InvalidVideo, check_mp4_file, read_mp4
from hvbatch.video import EncodeError, encode_mp4
from tests.disk_helpers import fake_ffmpeg, fill, small_filesystem

KEY = AttemptKey.parse("job7.a0")
FRAMES = np.random.default_rng(0).integers(0, 255, (5, 48, 64, 3), dtype=np.uint8)


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) if folder.is_dir() else []


def test_the_container_check_reads_frames_and_size_and_refuses_every_cut(tmp_path: Path) -> None:
    whole = tmp_path / "v.mp4"
    encode_mp4(FRAMES, whole)
    summary = check_mp4_file(whole, frames=5, width=64, height=48)
    assert (summary.frames, summary.width, summary.height) == (5, 64, 48)
    data = whole.read_bytes()
    cut = tmp_path / "cut.mp4"
    for length in [
        0,
        8,
        48,
        16384 % len(data),
        *range(100, len(data), max(1, len(data) // 40)),
        len(data) - 1,
    ]:
        cut.write_bytes(data[:length])
        with pytest.raises(InvalidVideo):
            check_mp4_file(cut, frames=5, width=64, height=48)
    with pytest.raises(InvalidVideo, match="holds 5 frames, not 6"):
        check_mp4_file(whole, frames=6, width=64, height=48)
    with pytest.raises(InvalidVideo, match="64x48, not 96x48"):
        check_mp4_file(whole, frames=5, width=96, height=48)
    cut.write_bytes(data[: len(data) // 2])
    with cut.open("rb") as handle, pytest.raises(InvalidVideo, match="cut short"):
        read_mp4(handle)


def test_disk_full_during_an_mp4_write_commits_nothing_and_keeps_what_was_committed(tmp_path: Path) -> None:
    with small_filesystem(tmp_path / "disk", 512) as disk:
        run = RunDir(disk / "run")
        assert commit_video(run, "first", FRAMES, VideoConfig(), KEY, None)
        first = run.video_path("first").read_bytes()
        fill(disk)
        with pytest.raises(DiskFullError, match=r"no space left to write .*videos/second-.*\.mp4") as err:
            commit_video(run, "second", FRAMES, VideoConfig(), KEY, None)
        assert "No space left on device" in str(err.value)  # ffmpeg's own words
        assert not os.path.lexists(run.video_path("second"))
        assert _hidden(run.root / "videos") == []  # the temporary mp4 is gone
        assert run.video_path("first").read_bytes() == first
        check_mp4_file(run.video_path("first"), frames=5, width=64, height=48)


def test_disk_full_during_a_part_or_marker_write_keeps_the_old_file(tmp_path: Path) -> None:
    with small_filesystem(tmp_path / "disk", 512) as disk:
        run = RunDir(disk / "run")
        part = run.manifest_part(0, str(KEY), 0)
        old = pa.Table.from_pylist([{"video_id": "a", "status": "started"}], schema=MANIFEST_SCHEMA)
        write_parquet_atomic(part, old)
        write_json_atomic(run.done_marker(0), {"shard": 0})
        fill(disk)
        new = pa.Table.from_pylist([{"video_id": "a", "status": "done"}] * 2000, schema=MANIFEST_SCHEMA)
        with pytest.raises(
            DiskFullError, match=r"no space left to write .*shard-00000\.job7\.a0\.dp0\.parquet"
        ):
            write_parquet_atomic(part, new)
        with pytest.raises(DiskFullError, match=r"done/shard-00000\.json"):
            write_json_atomic(run.done_marker(0), {"shard": 0, "videos": "x" * 100_000})
        assert read_parquet(part).equals(old)
        assert read_json(run.done_marker(0)) == {"shard": 0}
        assert _hidden(run.root / "manifest") == [] and _hidden(run.root / "done") == []


@pytest.mark.parametrize(
    ("mode", "error"),
    [
        ("kill", "EncodeError: ffmpeg was killed by SIGKILL while encoding"),
        ("short", "InvalidVideo: the file is cut short"),
        ("enospc", "no space left to write"),
    ],
)
def test_a_killed_short_or_failing_encode_is_never_committed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str, error: str
) -> None:
    fake_ffmpeg(monkeypatch, tmp_path, [mode])
    run = RunDir(tmp_path / "run")
    with pytest.raises((EncodeError, InvalidVideo, OSError)) as err:
        commit_video(run, "a", FRAMES, VideoConfig(), KEY, None)
    assert error in f"{type(err.value).__name__}: {err.value}"
    assert list((run.root / "videos").iterdir()) == []  # no final name, no temporary
    assert commit_video(run, "a", FRAMES, VideoConfig(), KEY, None)  # the next run is the real ffmpeg
    check_mp4_file(run.video_path("a"), frames=5, width=64, height=48)


def _shard_run(tmp_path: Path, videos: list[str]) -> RunDir:
    run = RunDir(tmp_path / "run")
    rows = [
        {"video_id": v, "prompt": v, "seed": 0, "height": 48, "width": 64, "num_frames": 5} for v in videos
    ]
    write_parquet_atomic(run.shard_path(0), pa.Table.from_pylist(rows))
    write_json_atomic(run.run_json, {"num_shards": 1, "created_at": 0.0})
    return run


def test_orphan_recovery_records_whole_files_and_quarantines_the_rest(tmp_path: Path) -> None:
    run = _shard_run(tmp_path, ["whole", "short", "empty"])
    assert commit_video(run, "whole", FRAMES, VideoConfig(), KEY, None)
    data = run.video_path("whole").read_bytes()
    run.video_path("short").write_bytes(data[: len(data) // 3])  # what the old writer linked
    run.video_path("empty").write_bytes(b"")
    recover_orphans(run, 0, KEY, SamplingConfig())
    rows = {r["video_id"]: r for r in run.manifest_rows(0).to_pylist()}
    assert list(rows) == ["whole"] and rows["whole"]["status"] == "done"
    assert sorted(p.name for p in (run.root / "videos").iterdir()) == [run.video_path("whole").name]
    records = sorted((run.root / "quarantine").glob("*.json"))
    reasons = {read_json(p)["file"]: read_json(p)["reason"] for p in records}
    short, empty = (f"videos/{run.video_path(v).name}" for v in ("short", "empty"))
    assert sorted(reasons) == sorted([short, empty])
    assert reasons[short].startswith("InvalidVideo: the file is cut short")
    assert reasons[empty] == "InvalidVideo: the file (0 bytes) has no moov box: the encoder never finished it"
    moved = {json.loads(p.read_text())["file"]: p.with_name(p.name.removesuffix(".json")) for p in records}
    assert moved[short].read_bytes() == data[: len(data) // 3]  # moved as it was, for a look


def test_temporaries_of_ended_attempts_are_removed_and_live_ones_kept(tmp_path: Path) -> None:
    run = _shard_run(tmp_path, ["a", "b"])
    videos, manifest = run.root / "videos", run.root / "manifest"
    videos.mkdir()
    manifest.mkdir()
    name_a, name_b = run.video_path("a").name, run.video_path("b").name
    dead = [
        videos / f".{name_a}.job1.a0.node1.123.0123abcd.tmp",
        manifest / ".shard-00000.job1.a0.dp0.parquet.node1.12.abcd0123.tmp",
    ]
    live = [
        videos / f".{name_b}.job2.a0.node1.124.0123abcd.tmp",
        videos / f".{name_b}.job7.a0.node1.9.0123abcd.tmp",
    ]
    other = [
        manifest / ".shard-00001.job1.a0.dp0.parquet.node1.12.abcd0123.tmp",
        videos / ".someone-else.tmp",
    ]
    for path in dead + live + other:
        path.write_bytes(b"x")
    removed = remove_dead_temporaries(run, 0, ["a", "b"], {"job2.a0", str(KEY)})
    assert sorted(removed) == sorted(dead)
    assert all(p.exists() for p in live + other) and not any(p.exists() for p in dead)
