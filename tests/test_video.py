"""mp4 writing: playable H.264 with the right frames, size and fps, and never a half-written file."""

from __future__ import annotations

from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import pytest
import torch

from hvbatch.config import VideoConfig
from hvbatch.video import frames_to_uint8, write_mp4


def _read_back(path: Path) -> tuple[int, tuple[int, int], float, str]:
    reader = imageio.get_reader(path, format="FFMPEG")
    try:
        meta = reader.get_meta_data()
        return reader.count_frames(), tuple(meta["size"]), meta["fps"], meta["codec"]
    finally:
        reader.close()


@pytest.mark.parametrize(("num_frames", "height", "width", "fps"), [(9, 64, 96, 24), (1, 32, 32, 8)])
def test_mp4_round_trip(tmp_path: Path, num_frames: int, height: int, width: int, fps: int) -> None:
    frames = np.random.default_rng(0).integers(0, 255, (num_frames, height, width, 3), dtype=np.uint8)
    out = write_mp4(frames, tmp_path / "sub" / "v.mp4", VideoConfig(fps=fps, save_first_frame=True))
    assert _read_back(out) == (num_frames, (width, height), float(fps), "h264")
    assert imageio.imread(out.with_suffix(".png")).shape == (height, width, 3)
    assert sorted(p.name for p in out.parent.iterdir()) == ["v.mp4", "v.png"]  # no temporaries left


def test_low_crf_is_close_to_the_input(tmp_path: Path) -> None:
    ramp = np.tile(np.linspace(0, 255, 64, dtype=np.uint8)[None, :, None], (48, 1, 3))
    frames = np.stack([np.roll(ramp, shift=i, axis=1) for i in range(5)])
    out = write_mp4(frames, tmp_path / "v.mp4", VideoConfig(crf=0, preset="ultrafast"))
    reader = imageio.get_reader(out, format="FFMPEG")
    decoded = np.stack([frame for frame in reader.iter_data()])
    reader.close()
    assert np.abs(decoded.astype(int) - frames.astype(int)).mean() < 3


def test_failed_write_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="even"):
        write_mp4(np.zeros((3, 15, 16, 3), dtype=np.uint8), tmp_path / "v.mp4")
    with pytest.raises(ValueError, match="uint8"):
        write_mp4(np.zeros((3, 16, 16, 3), dtype=np.float32), tmp_path / "v.mp4")
    assert list(tmp_path.iterdir()) == []


def test_frames_to_uint8_layout() -> None:
    video = torch.zeros(1, 3, 2, 4, 6)
    video[0, 0] = 1.0  # red channel full
    frames = frames_to_uint8(video)
    assert frames.shape == (2, 4, 6, 3) and frames.dtype == np.uint8
    assert (frames[..., 0] == 255).all() and (frames[..., 1:] == 0).all()
