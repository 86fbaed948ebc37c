"""Per-part summaries: the writers leave them, `status` and `--wait` read them instead of the parts,
and a summary that is missing, stale or corrupt is never trusted (the part is read instead)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from hvbatch.batch import ledger, summaries
from hvbatch.batch.attempt import AttemptKey, ExitReason, VideoStatus
from hvbatch.batch.control import commands, status
from hvbatch.batch.control.prompts import read_prompts
from hvbatch.batch.control.shards import shard_videos
from hvbatch.batch.control.status import RunReader, RunSnapshot, run_status, video_table
from hvbatch.batch.executors.base import JobRecord, record_submission
from hvbatch.batch.executors.local import process_identity
from hvbatch.batch.files import read_parquet, write_parquet_atomic
from hvbatch.batch.rundir import MANIFEST_SCHEMA, RunDir
from hvbatch.batch.runtime.support import ShardProgress, commit_video, manifest_row, recover_orphans
from hvbatch.config import RetryConfig, SamplingConfig, VideoConfig, load_config
from tests.fault_helpers import write_prompts

KEY = AttemptKey.parse("job7.r0")


def _run(tmp_path: Path, prompts: int = 12, num_shards: int = 3) -> RunDir:
    config = load_config(overrides=["model=tiny"])
    rows = [{"id": f"v{i:02d}", "prompt": f"prompt {i}", "seed": i} for i in range(prompts)]
    videos = read_prompts(write_prompts(tmp_path / "prompts.parquet", rows), config.sampling)
    run = RunDir(tmp_path / "run")
    shards = shard_videos(videos, max_shard_cost=1e18, min_shards=num_shards)
    commands.create_run(run, config, tmp_path / "prompts.parquet", shards, "local")
    me = os.getpid()
    records = [JobRecord(s, str(me), "local", process_identity(me)) for s in range(num_shards)]
    record_submission(run, records, "local", manual=True)  # this process: every shard is running
    return run


def _videos(run: RunDir, shard: int) -> list[dict[str, Any]]:
    return run.read_shard(shard).to_pylist()


def _row(video: dict[str, Any], shard: int, status_: VideoStatus, **extra: Any) -> dict[str, Any]:
    return manifest_row(video, shard, KEY, status=status_, attempt=1, final=False, **extra)


def _parts(run: RunDir) -> list[Path]:
    return sorted((run.root / "manifest").glob("*.parquet"))


def _counts(run: RunDir) -> dict[str, int]:
    reader = RunReader(run)
    return reader.counts(reader.snapshot())[0]


def _table_counts(run: RunDir) -> dict[str, int]:
    """The same counts from `video_table`, which reads every row of every part (no summary)."""
    statuses = video_table(run)["status"].to_pylist()
    return {name: statuses.count(name) for name in ("done", "failed", "pending", "running")}


def _drop_summaries(run: RunDir) -> int:
    found = list(run.root.glob("*/*.summary.json"))
    for path in found:
        path.unlink()
    return len(found)


def test_every_writer_leaves_a_summary_its_part_agrees_with(tmp_path: Path) -> None:
    run = _run(tmp_path)
    videos = _videos(run, 0)
    progress = ShardProgress(run, 0, KEY, 0, leader=True)
    progress.put(videos[0]["video_id"], _row(videos[0], 0, VideoStatus.STARTED))
    progress.put(videos[0]["video_id"], _row(videos[0], 0, VideoStatus.DONE, path="videos/x.mp4"))
    progress.put(
        videos[1]["video_id"], _row(videos[1], 0, VideoStatus.FAILED, error="E: x") | {"final": True}
    )
    progress.put(videos[2]["video_id"], _row(videos[2], 0, VideoStatus.STARTED))
    ledger.begin(run, 1, KEY, {"node": "n1"})
    frames = np.zeros((5, 48, 64, 3), np.uint8)  # an mp4 linked by an attempt that died before its row
    assert commit_video(run, _videos(run, 1)[0]["video_id"], frames, VideoConfig(), KEY, None)
    recover_orphans(run, 1, KEY, SamplingConfig())
    ledger.give_up(run, 2, KEY, "gave up after 3 attempts")
    ledger.end(run, 1, KEY, ExitReason.CRASH, "killed")

    parts = _parts(run)
    names = [p.name.split(".", 1)[1] for p in parts]
    assert names == ["job7.r0.dp0.parquet", "job7.r0.dp0.recovered.parquet", "job7.r0.dp0.gave-up.parquet"]
    for part in parts:
        shard = int(part.name[6:11])
        index = summaries.shard_index([v["video_id"] for v in _videos(run, shard)])
        expected = summaries.PartTally.of_table(read_parquet(part), index)
        stamp = summaries.stamp_of(part.stat())
        assert summaries.read_part_tally(part, stamp) == expected
    tally = summaries.read_part_tally(parts[0], summaries.stamp_of(parts[0].stat()))
    assert tally is not None and tally.done == 0b1 and tally.failed[0][0] == 1 and tally.last_done_at
    metrics = run.metrics_part(1, str(KEY))
    row = summaries.read_metrics_row(metrics, summaries.stamp_of(metrics.stat()))
    assert row == run.read_metrics_part(metrics)
    assert row is not None and row["exit_reason"] == "crash" and row["node"] == "n1"


def _busy_run(tmp_path: Path) -> RunDir:
    """Three running shards: done, started, final failures (one before the last manual
    submission, which reopens it), a video done in two parts (an orphan recovery racing its
    writer), a second dp group, and a gave-up part."""
    run = _run(tmp_path)
    early = time.time() - 3600
    for shard in range(3):
        videos = _videos(run, shard)
        first = ShardProgress(run, shard, KEY, 0, leader=True)
        first.put(videos[0]["video_id"], _row(videos[0], shard, VideoStatus.DONE))
        first.put(videos[1]["video_id"], _row(videos[1], shard, VideoStatus.STARTED))
        second = ShardProgress(run, shard, KEY, 1, leader=True)
        second.put(
            videos[2]["video_id"], _row(videos[2], shard, VideoStatus.FAILED, error="E") | {"final": True}
        )
        old = _row(videos[3], shard, VideoStatus.FAILED, error="E") | {"final": True, "finished_at": early}
        second.put(videos[3]["video_id"], old)
    recover_orphans_row = _row(_videos(run, 0)[0], 0, VideoStatus.DONE)  # the same video done again
    part = run.manifest_part(0, str(KEY), 0, suffix="recovered")
    table = pa.Table.from_pylist([recover_orphans_row], schema=MANIFEST_SCHEMA)
    write_parquet_atomic(part, table)
    summaries.write_part_summary(part, table, summaries.shard_index([v["video_id"] for v in _videos(run, 0)]))
    ledger.give_up(run, 2, KEY, "gave up")
    for shard in range(3):
        ledger.begin(run, shard, KEY, {})
    return run


def test_counts_are_the_same_from_summaries_parts_and_every_row(tmp_path: Path) -> None:
    run = _busy_run(tmp_path)
    from_summaries = _counts(run)
    status_summaries = run_status(run).to_dict()
    assert from_summaries == _table_counts(run)
    # shards 0, 1: 1 done, 1 failed, 2 running; shard 2: 1 done and the other 3 failed for good
    assert from_summaries == {"done": 3, "failed": 5, "pending": 0, "running": 4}
    assert _drop_summaries(run) == len(_parts(run)) + 3
    assert _counts(run) == from_summaries
    assert run_status(run).to_dict() | {"eta_seconds": None} == status_summaries | {"eta_seconds": None}


def test_a_stale_summary_is_never_trusted(tmp_path: Path) -> None:
    run = _run(tmp_path)
    videos = _videos(run, 0)
    progress = ShardProgress(run, 0, KEY, 0, leader=True)
    for video in videos:
        progress.put(video["video_id"], _row(video, 0, VideoStatus.DONE))
    assert _counts(run)["done"] == 4
    part = _parts(run)[0]
    summary = summaries.summary_path(part).read_bytes()
    # The part replaced after its summary (a crash between the two writes): fewer videos done.
    fewer = pa.Table.from_pylist([_row(videos[0], 0, VideoStatus.DONE)], schema=MANIFEST_SCHEMA)
    write_parquet_atomic(part, fewer)
    assert summaries.summary_path(part).read_bytes() == summary  # it names the old part
    assert _counts(run)["done"] == 1 == _table_counts(run)["done"]
    # More videos than the summary says: also read from the part.
    more = pa.Table.from_pylist([_row(v, 0, VideoStatus.DONE) for v in videos[:3]], schema=MANIFEST_SCHEMA)
    write_parquet_atomic(part, more)
    assert _counts(run)["done"] == 3
    # A part moved aside (`retry --repair`) counts for nothing, whatever its summary says.
    summaries.write_part_summary(part, more, summaries.shard_index([v["video_id"] for v in videos]))
    part.rename(tmp_path / "aside.parquet")
    assert _counts(run)["done"] == 0


@pytest.mark.parametrize(
    "content",
    [b"", b"{not json", b"[]", b'{"version": 1}', b'{"version": 99, "kind": "manifest"}', b"\xff\xfe"],
)
def test_a_corrupt_summary_is_read_around(tmp_path: Path, content: bytes) -> None:
    run = _busy_run(tmp_path)
    expected = _table_counts(run)
    for path in run.root.glob("*/*.summary.json"):
        path.write_bytes(content)
    assert _counts(run) == expected
    assert run_status(run).counts == expected


def test_a_summary_with_bad_fields_and_the_right_stamp_is_read_around(tmp_path: Path) -> None:
    run = _busy_run(tmp_path)
    expected = _table_counts(run)
    for path in (run.root / "manifest").glob("*.summary.json"):
        data = json.loads(path.read_text())
        path.write_text(json.dumps(data | {"done": "not hex", "failed": [[1]]}))
    for path in (run.root / "metrics").glob("*.summary.json"):
        data = json.loads(path.read_text())
        path.write_text(json.dumps(data | {"row": [1, 2]}))
    assert _counts(run) == expected
    assert all(job["last_exit"] == "running" for job in run_status(run).jobs if job["shard"] != 2)


def test_a_summary_that_cannot_be_written_is_removed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = _run(tmp_path)
    videos = _videos(run, 0)
    progress = ShardProgress(run, 0, KEY, 0, leader=True)
    progress.put(videos[0]["video_id"], _row(videos[0], 0, VideoStatus.STARTED))
    summary = summaries.summary_path(_parts(run)[0])
    assert summary.is_file()

    def disk_full(path: Path, payload: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(summaries, "write_json_atomic", disk_full)
    progress.put(videos[0]["video_id"], _row(videos[0], 0, VideoStatus.DONE))
    assert not summary.exists()
    assert _counts(run)["done"] == 1


def test_polls_read_only_what_changed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = _busy_run(tmp_path)
    reads: list[str] = []
    real_tally, real_part = summaries.read_part_tally, status._read_manifest_part

    def tally(path: str, stamp: tuple[int, int, int]) -> summaries.PartTally | None:
        reads.append(f"summary {os.path.basename(path)}")
        return real_tally(path, stamp)

    def part(path: Path) -> pa.Table:
        reads.append(f"part {path.name}")
        return real_part(path)

    monkeypatch.setattr(status, "read_part_tally", tally)
    monkeypatch.setattr(status, "_read_manifest_part", part)
    reader = RunReader(run)
    snapshot = RunSnapshot.take(run)
    first = reader.counts(snapshot)[0]
    open_parts = [p for p in _parts(run) if not p.name.startswith("shard-00002")]  # shard 2 gave up
    assert len(reads) == len(open_parts) == 5 and all(r.startswith("summary") for r in reads)
    reads.clear()
    assert reader.counts(snapshot)[0] == first and reads == []
    videos = _videos(run, 1)
    progress = ShardProgress(run, 1, KEY, 0, leader=True)
    progress.put(videos[0]["video_id"], _row(videos[0], 1, VideoStatus.DONE))
    progress.put(videos[1]["video_id"], _row(videos[1], 1, VideoStatus.DONE))
    counts = reader.counts(snapshot)[0]
    assert reads == [f"summary {run.manifest_part(1, str(KEY), 0).name}"]
    assert counts["done"] == first["done"] + 1 and counts == _table_counts(run)


def test_a_stale_metrics_summary_is_read_around(tmp_path: Path) -> None:
    run = _busy_run(tmp_path)
    metrics = run.metrics_part(0, str(KEY))
    summary = summaries.summary_path(metrics).read_bytes()
    ledger.end(run, 0, KEY, ExitReason.TIMEOUT, "allgather timed out")
    summaries.summary_path(metrics).write_bytes(summary)  # as if the summary write had been lost
    jobs = {job["shard"]: job for job in run_status(run).jobs}
    assert jobs[0]["last_exit"] == "timeout" and jobs[0]["last_exit_detail"] == "allgather timed out"
    assert jobs[1]["last_exit"] == "running"


def test_a_complete_run_reads_markers_not_parts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = _run(tmp_path)
    for shard in range(3):
        progress = ShardProgress(run, shard, KEY, 0, leader=True)
        for video in _videos(run, shard):
            progress.put(video["video_id"], _row(video, shard, VideoStatus.DONE))
        assert ledger.mark_complete_if_done(run, shard, KEY)
    monkeypatch.setattr(
        status, "read_part_tally", lambda p, s: pytest.fail("read a part of a complete shard")
    )
    assert run_status(run).counts == {"done": 12, "failed": 0, "pending": 0, "running": 0}
    ledger.finish(run, RetryConfig(), [0, 1, 2], KEY, 0)


def test_a_summary_longer_than_a_read_is_read_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = _busy_run(tmp_path)
    expected = _table_counts(run)

    def no_part(path: Path) -> pa.Table:
        raise AssertionError(f"{path.name} read although its summary is valid")

    monkeypatch.setattr(summaries, "READ_BYTES", 16)  # each summary takes many reads
    monkeypatch.setattr(status, "_read_manifest_part", no_part)
    assert all(p.stat().st_size > 16 for p in (run.root / "manifest").glob("*.summary.json"))
    assert _counts(run) == expected
