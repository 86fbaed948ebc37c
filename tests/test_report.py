"""`hvbatch report`: the page of a real run, opened in headless Chromium, and of 10,000 videos."""

from __future__ import annotations

import hashlib
import json
import re
import time
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
from PIL import Image

from hvbatch.batch.files import write_text_atomic
from hvbatch.batch.rundir import RunDir
from hvbatch.cli import main
from hvbatch.report import ReportData, render_html
from hvbatch.report.svg import EXIT_COLOURS
from hvbatch.report.thumbnails import first_frame_jpeg
from tests.browser import load_page
from tests.fault_helpers import submit_argv, write_prompts

PROMPTS = [
    {"id": "city/ü night", "prompt": "A city at night.", "seed": 1},
    {"id": "kite", "prompt": "A kite </script><b id=injected>over</b> & a beach.", "seed": 2},
    {"id": "plain", "prompt": "A plain field.", "seed": None},  # a seed derived from the id
]
NETWORK_URL = re.compile(r"""(src|href|url)\s*[=(]\s*["']?\s*(https?:)?//""", re.IGNORECASE)


def assert_self_contained(html: str) -> None:
    assert not NETWORK_URL.search(html), NETWORK_URL.search(html)
    assert "<link" not in html and "<script src" not in html and "@import" not in html
    data = html.split('<script type="application/json" id="report-data">', 1)[1].split("</script>", 1)[0]
    assert "<" not in data  # user data cannot close the element or open a comment


def assert_not_blank(png: Path) -> None:
    rgb_HW3 = np.asarray(Image.open(png).convert("RGB"), dtype=np.int32)
    packed = (rgb_HW3[..., 0] << 16 | rgb_HW3[..., 1] << 8 | rgb_HW3[..., 2]).ravel()
    colours, counts = np.unique(packed, return_counts=True)
    drawn = 1 - counts.max() / packed.size  # pixels not of the background colour
    assert rgb_HW3.shape == (900, 1280, 3) and drawn > 0.03, drawn
    assert len(colours) > 200  # text, plot and the thumbnails' colours, not a flat page


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three videos in two shards of one-rank jobs (`slurm.gpus_per_node=1` alone: one rank per GPU);
    `kite` raises every time (one final failure)."""
    tmp = tmp_path_factory.mktemp("report")
    prompts = write_prompts(tmp / "prompts.parquet", PROMPTS)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HVBATCH_FAULT", "action=raise,rank=all,video=kite")
        argv = submit_argv(
            prompts, tmp / "run", "local", "slurm.gpus_per_node=1", "retry.max_prompt_attempts=1"
        )
        argv.remove("slurm.tasks_per_node=2")  # FAST's ranks: here GPUs alone set them
        assert main([*argv, "--wait"]) == 0
    return tmp / "run"


def test_report_of_a_run_in_headless_chromium(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "elsewhere" / "report.html"
    assert main(["report", str(run_dir), "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    html = out.read_text()
    assert_self_contained(html)
    assert "InjectedFault: injected fault" in html.split("<h2>Failures</h2>", 1)[1]
    completed = EXIT_COLOURS["completed"]
    assert html.count(f'fill="{completed}"><title>shard ') == 2  # one bar per shard's attempt
    assert "<polyline" in html
    videos = {v["id"]: v for v in json.loads(_embedded(html))["videos"]}
    assert {i: v["status"] for i, v in videos.items()} == {
        "city/ü night": "done",
        "kite": "failed",
        "plain": "done",
    }
    assert videos["kite"]["thumb"] is None and videos["plain"]["thumb"]
    rows = {r["video_id"]: r for r in RunDir(run_dir).manifest_rows().to_pylist() if r["status"] == "done"}
    assert videos["plain"]["gpu_seconds"] == pytest.approx(rows["plain"]["seconds"])  # one-rank replicas
    assert {row["world_size"] for row in RunDir(run_dir).metrics_rows()} == {1}  # the jobs' one owner
    # No seed in the file: derived from the id (README "Prompts") and recorded, the same in both.
    digest = hashlib.blake2b(b"0:plain", digest_size=8, person=b"hvbatch-seed").digest()
    assert videos["plain"]["seed"] == rows["plain"]["seed"] == int.from_bytes(digest[:4], "big")
    assert videos["city/ü night"]["seed"] == 1

    page = load_page(out, tmp_path / "browser")
    assert page.console == []  # no script error, no refused resource
    assert 'data-rendered="3"' in page.dom
    sheet = page.dom.split('id="sheet"', 1)[1]
    assert sheet.count('src="data:image/jpeg;base64,') == 2  # the done videos' first frames
    hrefs = re.findall(r'<a href="([^"]+)"', sheet)
    assert sorted((out.parent / unquote(h)).resolve() for h in hrefs) == sorted(
        RunDir(run_dir).video_path(v) for v in ("city/ü night", "plain")
    )
    assert '<b id="injected"' not in page.dom and "&lt;/script&gt;&lt;b id=injected&gt;" in page.dom
    assert_not_blank(page.screenshot)
    # Cached thumbnails: a second report runs no ffmpeg and embeds the same frames.
    assert main(["report", str(run_dir)]) == 0
    again = json.loads(_embedded((run_dir / "report.html").read_text()))["videos"]
    assert [v["thumb"] for v in again] == [videos[v["id"]]["thumb"] for v in again]


def test_console_errors_are_seen(tmp_path: Path) -> None:
    broken = tmp_path / "broken.html"
    broken.write_text("<p>x</p><script>undefinedFunction();</script>")
    assert any("Uncaught ReferenceError" in line for line in load_page(broken, tmp_path / "b").console)


def _embedded(html: str) -> str:
    return html.split('id="report-data">', 1)[1].split("</script>", 1)[0]


def test_ten_thousand_videos_page_stays_small_and_pages(run_dir: Path, tmp_path: Path) -> None:
    thumb = first_frame_jpeg(RunDir(run_dir).video_path("plain"))  # 96x72: ~1.4 KB, a photo's 96x54 1-1.7 KB
    assert thumb and thumb[:2] == b"\xff\xd8"  # a JPEG
    start = time.time() - 36000
    videos = [
        {"id": f"video-{i:05d}", "prompt": f"prompt number {i}: a fox running through deep snow at dawn",
         "seed": i, "shard": i // 8, "status": "failed" if i % 97 == 0 else "done", "attempts": 1,
         "seconds": 30.0 + i % 50, "gpu_seconds": 30.0 + i % 50, "done_at": start + 3.6 * i,
         "error": "RuntimeError: CUDA out of memory" if i % 97 == 0 else None,
         "path": "videos/x.mp4", "href": f"../videos/video-{i:05d}.mp4", "thumb": thumb}
        for i in range(10_000)
    ]  # fmt: skip
    attempts = [
        {"shard": s, "job_id": str(100 + s), "attempt": 1, "attempt_key": f"job{100 + s}.a0", "node": "n1",
         "gpu_type": "H100", "world_size": 8, "dp": 8, "ulysses": 1, "ring": 1, "exit_reason": "completed",
         "exit_detail": None, "started_at": start + 28.8 * s, "finished_at": start + 28.8 * (s + 1),
         "wall_seconds": 28.8, "gpu_seconds": 230.4}
        for s in range(1250)
    ]  # fmt: skip
    counts = {"done": 9896, "failed": 104, "pending": 0, "running": 0}
    data = ReportData("/runs/big", start, time.time(), 1250, counts, 1000.0, videos, attempts)
    html = render_html(data)
    assert_self_contained(html)
    size_mb = len(html.encode()) / 1e6
    assert size_mb < 25, size_mb  # 21 MB (README)
    out = tmp_path / "big.html"
    write_text_atomic(out, html)
    page = load_page(out, tmp_path / "browser")
    assert page.console == []
    assert 'data-rendered="200"' in page.dom and "of 10000 (page 1 of 50)" in page.dom
