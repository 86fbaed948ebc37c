"""GPU time scales on the CPU: busy peers are waited for, not failed; layouts change between shards.

Timeouts are lowered to a few seconds and one video is made slower than all of them together:
a dp replica still on its last video, a leader still writing its mp4. Every attempt must end
`completed`, each video exactly once.
"""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hvbatch.batch.control.commands import wait_for_run
from hvbatch.batch.rundir import RunDir
from hvbatch.cli import main
from hvbatch.config import load_config
from hvbatch.pipeline import Pipeline, Timings
from hvbatch.video import encode_mp4
from tests.batch_helpers import EXAMPLE_CONFIG
from tests.fault_helpers import (
    BUSY_PEER_FAULTS,
    BUSY_PEER_OVERRIDES,
    FAULT_PROMPTS,
    assert_exactly_once,
    metrics,
    submit_argv,
    write_prompts,
)


def test_busy_peers_are_waited_for_not_failed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A slow write and a slow video on a dp 2 x ulysses 2 job, timeouts at 5 s (BUSY_PEER_FAULTS).
    monkeypatch.setenv("HVBATCH_FAULT", BUSY_PEER_FAULTS)
    prompts = write_prompts(tmp_path / "prompts.parquet")
    run_dir = tmp_path / "run"
    argv = submit_argv(prompts, run_dir, "local", *BUSY_PEER_OVERRIDES)
    started = time.time()
    assert main([*argv, "--wait"]) == 0
    assert time.time() - started > 20  # the slow video really outlasted every timeout
    assert_exactly_once(run_dir, FAULT_PROMPTS, {})
    (attempts,) = metrics(run_dir).values()
    assert [a["exit_reason"] for a in attempts] == ["completed"], attempts
    assert (attempts[0]["dp"], attempts[0]["ulysses"]) == (2, 2)
    assert attempts[0]["attention_backend"]  # the kernel that ran, as `generate` prints it
    assert not (run_dir / "attempts").exists() or not list((run_dir / "attempts").glob("*.rank*.json"))


def _videos(tmp_path: Path) -> Path:
    """One video that needs 2 GPUs under the memory limit below, two that fit one GPU each."""
    rows = [
        {"id": "large", "prompt": "A wide valley.", "seed": 5, "height": 96, "width": 128, "num_frames": 9},
        {"id": "small-a", "prompt": "A red kite.", "seed": 6, "height": 48, "width": 64, "num_frames": 5},
        {"id": "small-b", "prompt": "A blue boat.", "seed": 7, "height": 48, "width": 64, "num_frames": 5},
    ]
    path = tmp_path / "prompts.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _decoded(path: Path) -> np.ndarray:
    reader = imageio.get_reader(path, format="FFMPEG")
    frames = np.stack([np.asarray(frame, dtype=np.float32) for frame in reader])
    reader.close()
    return frames


def test_layouts_change_between_shards_of_one_job(tmp_path: Path) -> None:
    # 0.0262 GiB per "GPU" (the memory model is exact arithmetic): the large video's shard plans
    # sequence parallelism (dp 1 x ulysses 2), the small videos' shard plans dp 2 x ulysses 1; the
    # local executor runs both in one job.
    overrides = ["parallel.gpu_memory_gib=0.0262", "sampling.num_inference_steps=3", "slurm.tasks_per_node=2",
                 "batch.min_shards=2"]  # fmt: skip
    run_dir = tmp_path / "run"
    argv = ["submit", str(_videos(tmp_path)), "--config", str(EXAMPLE_CONFIG), "--executor", "local",
            "--run-dir", str(run_dir), *overrides, "--wait"]  # fmt: skip
    assert main(argv) == 0
    layouts = {int(row["shard"]): (row["dp"], row["ulysses"]) for row in RunDir(run_dir).metrics_rows()}
    assert sorted(layouts.values()) == [(1, 2), (2, 1)], layouts
    assert len({row["job_id"] for row in RunDir(run_dir).metrics_rows()}) == 1  # one job, two layouts
    # Each video equals the video one process makes alone (same weights, prompt and seed).
    config = load_config(EXAMPLE_CONFIG, overrides)
    pipeline = Pipeline.load(config, Timings())
    run = RunDir(run_dir)
    rows = [row for shard in range(run.num_shards()) for row in run.read_shard(shard).to_pylist()]
    for row in rows:
        sizes = [f"sampling.{k}={row[k]}" for k in ("seed", "height", "width", "num_frames")]
        sampling = load_config(EXAMPLE_CONFIG, [*overrides, *sizes]).sampling
        alone = pipeline.generate(row["prompt"], sampling, timings=Timings())
        reference = tmp_path / f"alone-{row['video_id']}.mp4"
        encode_mp4(alone.frames, reference, config.video)
        batch_frames, alone_frames = _decoded(run.video_path(row["video_id"])), _decoded(reference)
        assert batch_frames.shape == alone_frames.shape
        difference = np.abs(batch_frames - alone_frames)
        assert difference.mean() < 0.05 and difference.max() <= 4, (row["video_id"], difference.max())


def _stopped_rank_since(run_dir: Path, found: list[float], stop: threading.Event) -> None:
    """Record when a rank process of this run is first seen stopped (state T)."""
    marker = f"hvbatch.batch.executors.local\0rank\0{run_dir}".encode()
    while not stop.is_set() and not found:
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError):
                ours = marker in (stat.parent / "cmdline").read_bytes()
                if ours and stat.read_text().rsplit(")", 1)[1].split()[0] == "T":
                    found.append(time.time())
                    return
        time.sleep(0.1)


def test_stopped_rank_0_ends_the_attempt_within_the_peer_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # dp 2 on 2 ranks: rank 0 (it hosts the job's store) makes videos 0 and 2, rank 1 videos 1 and
    # 3 and then waits for rank 0 at the end of the shard. Rank 0 is busy in video 0 for 8 s, longer
    # than the 5 s peer timeout, while its heartbeat moves: it must be waited for. Then it stops
    # (SIGSTOP) in video 2: rank 1 must end the attempt within the peer timeout, not after the
    # 30-minute stall watchdog (before: it blocked inside TCPStore.check for the whole stop).
    peer_timeout_s, margin_s = 5.0, 10.0
    faults = ["action=slow,rank=0,video=0,step=1,seconds=8,attempt=1", "action=stop,rank=0,video=2,attempt=1"]
    monkeypatch.setenv("HVBATCH_FAULT", ";".join(faults))
    prompts = write_prompts(tmp_path / "prompts.parquet")
    run_dir = (tmp_path / "run").resolve()
    # Writes between videos: video 0 is committed before rank 0 stops in video 2.
    overrides = ["slurm.tasks_per_node=2", "batch.min_shards=1", "parallel.ulysses=1",
                 f"retry.peer_timeout_s={peer_timeout_s:g}", "parallel.timeout_s=5",
                 "batch.overlap_writes=false"]  # fmt: skip
    stopped_at: list[float] = []
    done = threading.Event()
    watcher = threading.Thread(target=_stopped_rank_since, args=(run_dir, stopped_at, done), daemon=True)
    watcher.start()
    assert main(submit_argv(prompts, run_dir, "local", *overrides)) == 0
    try:
        assert wait_for_run(RunDir(run_dir), poll_s=1.0, timeout_s=400), "the run did not finish"
    finally:
        done.set()
        if not RunDir(run_dir).completed_shards():
            main(["cancel", str(run_dir)])
    assert_exactly_once(run_dir, FAULT_PROMPTS, {})
    (attempts,) = metrics(run_dir).values()
    assert [a["exit_reason"] for a in attempts] == ["timeout", "completed"], attempts
    detail = attempts[0]["exit_detail"]
    assert "rank 1:" in detail and "has not answered" in detail and "rank 0" in detail, detail
    assert stopped_at, "rank 0 was never seen stopped"
    assert attempts[0]["finished_at"] - stopped_at[0] < peer_timeout_s + margin_s, attempts[0]
    # The busy video was not failed: rank 0 made it in the first attempt, after its 8 s.
    rows = RunDir(run_dir).manifest_rows().to_pylist()
    (busy,) = [r for r in rows if r["video_id"] == FAULT_PROMPTS[0]["id"] and r["status"] == "done"]
    assert busy["attempt_key"] == attempts[0]["attempt_key"]
