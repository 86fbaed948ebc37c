"""`hvbatch generate` and `hvbatch submit --wait` with model=tiny-1.5: N ranks (gloo, CPU processes)
give the one-process video, through the layout and runner path both commands share: generate on 3
ranks (ring) and 4 (CFG-parallel x ring), the batch job on 2 (Ulysses).

Sizes the rank counts do not divide: 48x80x9 has 3 x 5 x 3 = 45 image tokens, 80x80x5 has
2 x 5 x 5 = 50. True CFG (scale 3, the official `[negative, positive]` batch) throughout.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from hvbatch.cli import main
from hvbatch.config import load_config
from hvbatch.pipeline import Pipeline
from hvbatch.video import write_mp4
from tests.batch_helpers import EXAMPLE_PROMPTS, assert_every_video_done_once
from tests.helpers import rel_err

PROMPT = 'a paper lantern with the word "HOME" drifting over a lake'
BASE = ["model=tiny-1.5", "device=cpu", "sampling.cfg_scale=3", "sampling.num_inference_steps=3"]
SIZES = {
    "45 tokens": ["sampling.height=48", "sampling.width=80", "sampling.num_frames=9"],
    "50 tokens": ["sampling.height=80", "sampling.width=80", "sampling.num_frames=5"],
}


@pytest.fixture(scope="module")
def pipeline() -> Pipeline:
    return Pipeline.load(load_config(overrides=BASE))


@pytest.fixture(scope="module")
def one_process(pipeline: Pipeline) -> dict[str, torch.Tensor]:
    return {
        name: pipeline.generate(PROMPT, load_config(overrides=[*BASE, *size]).sampling, decode=False).latents
        for name, size in SIZES.items()
    }


@pytest.mark.parametrize(
    ("nproc", "size", "layout", "words"),
    [
        (3, "50 tokens", ["parallel.ulysses=1", "parallel.ring=3"], "dp 1 x ulysses 1 x ring 3 over 3 ranks"),
        (
            4,
            "45 tokens",
            ["parallel.cfg=2", "parallel.ulysses=1", "parallel.ring=2"],
            "cfg 2 x ulysses 1 x ring 2",
        ),
    ],
    ids=["ring-3", "cfg-2-ring-2"],
)
def test_generate_on_n_ranks_equals_one_process(
    tmp_path: Path, one_process: dict[str, torch.Tensor], nproc: int, size: str, layout: list[str], words: str
) -> None:
    out = tmp_path / "v.mp4"
    command = [
        sys.executable, "-m", "hvbatch", "generate", "--nproc", str(nproc), "--prompt", PROMPT,
        "--out", str(out), "--save-latents", str(tmp_path / "v.safetensors"), *BASE, *SIZES[size], *layout,
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert words in result.stdout and out.is_file()
    latents = load_file(str(tmp_path / "v.safetensors"))["latents"]
    assert latents.shape[1] == 32 and rel_err(latents, one_process[size]) <= 1e-5


def _frames(path: Path) -> np.ndarray:
    reader = imageio.get_reader(path, format="FFMPEG")
    try:
        return np.stack([reader.get_data(i) for i in range(reader.count_frames())])
    finally:
        reader.close()


def test_submit_wait_on_the_local_executor(
    tmp_path: Path, pipeline: Pipeline, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every example prompt becomes one video, on jobs of 2 ranks laid out ulysses 2 (true CFG as one
    batch); a video equals the one-process one (lossless x264: the frames agree up to the codec's
    colour rounding)."""
    run_dir = tmp_path / "run"
    ranks = ["slurm.tasks_per_node=2", "parallel.gpus_per_node=2"]
    layout = [*ranks, "parallel.cfg=1", "parallel.ulysses=2", "parallel.ring=1", "video.crf=0"]
    argv = ["submit", str(EXAMPLE_PROMPTS), "--executor", "local", "--run-dir", str(run_dir), "--wait"]
    assert main([*argv, *BASE, *layout]) == 0
    rows = {r["video_id"]: r for r in assert_every_video_done_once(run_dir, capsys)}
    metrics = [pq.read_table(p).to_pylist()[0] for p in sorted((run_dir / "metrics").glob("*.parquet"))]
    assert metrics and all((m["world_size"], m["ulysses"], m["ring"]) == (2, 2, 1) for m in metrics), metrics
    prompt = pq.read_table(EXAMPLE_PROMPTS).to_pylist()[2]  # 64 x 96 x 9 (4 x 6 x 3 tokens)
    config = load_config(overrides=[*BASE, "video.crf=0"])
    sampling = dataclasses.replace(
        config.sampling, height=prompt["height"], width=prompt["width"], num_frames=prompt["num_frames"],
        seed=prompt["seed"],
    )  # fmt: skip
    alone = pipeline.generate(prompt["prompt"], sampling)
    assert alone.frames is not None
    write_mp4(alone.frames, tmp_path / "alone.mp4", config.video)
    batch, one = _frames(run_dir / rows[prompt["id"]]["path"]), _frames(tmp_path / "alone.mp4")
    assert batch.shape == one.shape == (9, 64, 96, 3)
    difference = np.abs(batch.astype(int) - one.astype(int))
    assert difference.max() <= 2 and (difference == 0).mean() > 0.99
