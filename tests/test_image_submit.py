"""The `image` column from the prompts file to the job: a mixed file submitted and run on the local
executor (through the image-taking test double, `tests/image_family_double.py`), every kind of bad
image refused, ids and costs, the job side up to the pipeline, and the report's input images."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import imageio.v2 as imageio
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from hvbatch.batch.control.commands import wait_for_run
from hvbatch.batch.control.prompt_images import ImageOptions
from hvbatch.batch.control.prompt_index import index_prompts
from hvbatch.batch.control.prompts import read_prompts, video_cost
from hvbatch.batch.rundir import RunDir
from hvbatch.batch.runtime import job as job_module
from hvbatch.batch.runtime.inputs import input_image
from hvbatch.cli import main
from hvbatch.config import load_config
from hvbatch.images import ImageStore, InputImage, decode
from hvbatch.models import family as registry
from tests import image_family_double as double
from tests.batch_helpers import EXAMPLE_CONFIG
from tests.browser import load_page

pytest_plugins = ["tests.slurm_cluster"]
REPO = Path(__file__).resolve().parents[1]
STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
FAST = [
    "slurm.tasks_per_node=1",
    "batch.min_shards=2",
    "sampling.num_inference_steps=2",
    "sampling.num_frames=5",
]
FAST += ["retry.max_prompt_attempts=1"]


def png(width: int, height: int, mode: str = "RGB", seed: int = 0, fmt: str = "PNG") -> bytes:
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode).save(out, fmt)
    return out.getvalue()


def write_file(path: Path, rows: list[dict[str, Any]], image_type: pa.DataType = STRUCT) -> Path:
    fields = [("prompt", pa.string()), ("image", image_type)]
    fields += [(k, pa.int64()) for k in ("height", "width") if any(k in r for r in rows)]
    fields += [("id", pa.string())] if any("id" in r for r in rows) else []
    schema = pa.schema(fields)
    pq.write_table(
        pa.Table.from_pylist([{k: r.get(k) for k in schema.names} for r in rows], schema=schema), path
    )
    return path


@pytest.fixture
def takes_images(monkeypatch: pytest.MonkeyPatch) -> None:
    """The 1.0 family swapped for the double in this process (restored afterwards)."""
    registry.families()  # discovered first: the swap is undone at teardown
    monkeypatch.setitem(registry._REGISTRY, double.NAME, double.make())


def config(*overrides: str) -> Any:
    return load_config(str(EXAMPLE_CONFIG), list(overrides))


# -- the mixed file, submitted and run -----------------------------------------------------------


def submit_mixed(tmp: Path, executor: str) -> dict[str, Any]:
    """Six rows: a relative and an absolute path, {bytes, path} structs (RGBA PNG, JPEG), a row
    without an image, and one whose frozen copy is removed right after submit. The submitter's
    files are overwritten right after submit too: the jobs must not see it."""
    data = tmp / "data"
    (data / "pics").mkdir(parents=True)
    originals = {
        "wide": png(120, 64, seed=1),
        "tall": png(50, 90, seed=2, fmt="JPEG"),
        "rgba": png(70, 70, "RGBA", seed=3),
        "jpeg": png(64, 40, seed=4, fmt="JPEG"),
        "gone": png(40, 40, seed=5),
    }
    (data / "pics" / "wide.png").write_bytes(originals["wide"])
    (data / "tall.jpg").write_bytes(originals["tall"])
    (data / "pics" / "gone.png").write_bytes(originals["gone"])
    rows = [
        {"prompt": "a cat", "image": {"bytes": None, "path": "pics/wide.png"}},
        {"prompt": "a dog", "image": {"bytes": None, "path": str((data / "tall.jpg").resolve())},
         "height": 32, "width": 48},
        {"prompt": "a bird", "image": {"bytes": originals["rgba"], "path": "rgba.png"}},
        {"prompt": "a cat", "image": {"bytes": originals["jpeg"], "path": None}},
        {"prompt": "a cat", "image": None},
        {"prompt": "a fish", "image": {"bytes": None, "path": "pics/gone.png"}},
    ]  # fmt: skip
    prompts = write_file(data / "prompts.parquet", rows)
    record = tmp / "received"
    record.mkdir()
    run_dir = tmp / "run"
    with pytest.MonkeyPatch.context() as patch:
        registry.families()
        patch.setitem(registry._REGISTRY, double.NAME, double.make())
        patch.setenv(registry.FAMILY_MODULES_VAR, double.MODULE)
        patch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
        patch.setenv(double.RECORD_VAR, str(record))
        argv = ["submit", str(prompts), "--config", str(EXAMPLE_CONFIG), "--executor", executor,
                "--run-dir", str(run_dir), *FAST]  # fmt: skip
        assert main(argv) == 0
        # The job is starting (a Python process importing torch, then the model load): these
        # changes land long before it reads a frozen image.
        run = RunDir(run_dir)
        videos = {v["image_source"]: v for v in run.all_videos().to_pylist()}
        (run_dir / videos["pics/gone.png"]["image_path"]).unlink()
        (data / "pics" / "wide.png").write_bytes(png(120, 64, seed=11))
        (data / "tall.jpg").write_bytes(png(50, 90, seed=12, fmt="JPEG"))
        assert wait_for_run(run, poll_s=0.5, timeout_s=240)
    return {"run": run_dir, "originals": originals, "record": record, "data": data}


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return submit_mixed(tmp_path_factory.mktemp("mixed"), "local")


def _manifest(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, dict[str, Any]]:
    capsys.readouterr()
    assert main(["manifest", str(run_dir), "--json"]) == 0
    return {row["image_source"]: row for row in json.loads(capsys.readouterr().out)}


def test_mixed_file_every_video_once_with_its_image(
    mixed_run: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    assert_mixed_run(mixed_run, capsys)


def test_mixed_file_on_slurm(tmp_path: Path, slurm_env: Any, capsys: pytest.CaptureFixture[str]) -> None:
    assert_mixed_run(submit_mixed(tmp_path, "slurm"), capsys)


def assert_mixed_run(mixed_run: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    run_dir, originals, record = mixed_run["run"], mixed_run["originals"], mixed_run["record"]
    rows = _manifest(run_dir, capsys)
    absolute = str((mixed_run["data"] / "tall.jpg").resolve())
    source = {"wide": "pics/wide.png", "tall": absolute, "rgba": "<bytes> rgba.png", "jpeg": "<bytes>",
              "gone": "pics/gone.png"}  # fmt: skip
    assert set(rows) == {*source.values(), None}
    # Asked sizes: the bucket of the image's aspect ratio (64 px base, stride 16), or the row's own.
    sizes = {"wide": (48, 80), "tall": (32, 48), "rgba": (64, 64), "jpeg": (48, 80)}
    shards = [pq.read_table(p) for p in sorted((run_dir / "shards").glob("*.parquet"))]
    assert len(shards) == 2 and sum(s.num_rows for s in shards) == 6
    for name, (height, width) in sizes.items():
        row = rows[source[name]]
        assert row["status"] == "done" and row["attempts"] == 1
        assert row["image_sha256"] == hashlib.sha256(originals[name]).hexdigest()
        frozen = run_dir / row["image_path"]
        assert frozen.read_bytes() == originals[name]  # the bytes as submitted, not as now on disk
        frame = imageio.get_reader(run_dir / row["path"]).get_data(0)
        assert frame.shape == (height, width, 3)
        # What the pipeline received: the frozen image, resized and centre-cropped to the video.
        got = np.asarray(Image.open(next(record.glob(f"{row['image_sha256']}-{height}x{width}-*.png"))))
        want = np.asarray(double.SIZING.fit(decode(originals[name]), height, width))
        assert got.shape == (height, width, 3) and np.array_equal(got, want)
    text = rows[None]
    assert text["status"] == "done" and text["image_sha256"] is None and text["image_path"] is None
    assert len(list(record.glob("*.png"))) == 4  # no image reached the text-to-video video
    gone = rows[source["gone"]]
    assert gone["status"] == "failed" and "frozen input image" in gone["error"]
    assert "cannot be read" in gone["error"]
    frozen_files = sorted(p.name for p in (run_dir / "images").rglob("*.*"))
    assert len(frozen_files) == 4  # one per distinct content (the removed one is gone)


def test_report_shows_input_images(mixed_run: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "report.html"
    assert main(["report", str(mixed_run["run"]), "--out", str(out)]) == 0
    page = load_page(out, tmp_path / "browser")
    assert page.console == []
    sheet = page.dom.split('id="sheet"', 1)[1]
    inputs = re.findall(r'<img class="input"[^>]*>', sheet)
    assert len(inputs) == 4  # the done image-to-video videos (the failed one's image is gone)
    assert all('src="data:image/jpeg;base64,' in tag for tag in inputs)
    assert any('title="input image: pics/wide.png"' in tag for tag in inputs)
    assert sheet.count('src="data:image/jpeg;base64,') == 5 + 4  # 5 first frames, 4 input images


# -- refused at submit ---------------------------------------------------------------------------


def test_every_bad_image_refused_in_one_error(
    takes_images: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    good = png(64, 48)
    (data / "notes.png").write_text("not a picture")
    (data / "small.png").write_bytes(png(8, 8))
    rows = [
        {"id": "ok", "prompt": "fine", "image": {"bytes": good, "path": None}},
        {"id": "missing", "prompt": "p1", "image": {"bytes": None, "path": "nope.png"}},
        {"id": "text", "prompt": "p2", "image": {"bytes": None, "path": "notes.png"}},
        {"id": "cut", "prompt": "p3", "image": {"bytes": good[: len(good) // 2], "path": "cut.png"}},
        {"id": "small", "prompt": "p4", "image": {"bytes": None, "path": "small.png"}},
        {"id": "blank", "prompt": "p5", "image": {"bytes": None, "path": "  "}},
        {"id": "half", "prompt": "p6", "image": {"bytes": good, "path": None}, "height": 32},
    ]
    prompts = write_file(data / "prompts.parquet", rows)
    run_dir = tmp_path / "runs" / "run"
    argv = ["submit", str(prompts), "--config", str(EXAMPLE_CONFIG), "--run-dir", str(run_dir), *FAST]
    assert main(argv) == 2
    err = capsys.readouterr().err
    for row, ident, words in [
        (1, "missing", "nope.png missing file"),
        (2, "text", "notes.png not an image"),
        (3, "cut", "truncated or corrupt"),
        (4, "small", "small.png too small: 8x8"),
        (5, "blank", "wrong type: an image struct with neither bytes nor a path"),
    ]:
        assert re.search(rf"row {row} \(id '{ident}'\):.*{re.escape(words)}", err), (row, err)
    assert "with an image and only one of height / width" in err and "row 6" in err
    assert "row 0" not in err
    assert not run_dir.exists() and os.listdir(run_dir.parent) == []  # no run, no staging folder
    # A column of the wrong type: one problem for the column.
    ints = write_file(data / "ints.parquet", [{"prompt": "p", "image": 3}], pa.int64())
    assert main(["submit", str(ints), "--config", str(EXAMPLE_CONFIG), "--run-dir", str(run_dir)]) == 2
    assert "column image: type int64" in capsys.readouterr().err and not run_dir.exists()
    # Good images into a directory that cannot take the run: the frozen copies are removed too.
    fine = write_file(data / "fine.parquet", [{"prompt": "p", "image": {"bytes": good, "path": None}}])
    run_dir.mkdir()
    (run_dir / "other.txt").write_text("not a run")
    assert main(["submit", str(fine), "--config", str(EXAMPLE_CONFIG), "--run-dir", str(run_dir)]) == 2
    assert "is not empty and not a run" in capsys.readouterr().err
    assert os.listdir(run_dir.parent) == ["run"] and os.listdir(run_dir) == ["other.txt"]
    # A run directory whose parent cannot hold the staging folder: where, and what to do.
    (tmp_path / "a-file").write_text("")
    argv = [
        "submit",
        str(fine),
        "--config",
        str(EXAMPLE_CONFIG),
        "--run-dir",
        str(tmp_path / "a-file" / "run"),
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"cannot freeze the input images in {tmp_path / 'a-file'}" in err and "choose a --run-dir" in err


def test_a_family_that_takes_no_images_refuses_the_column(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "a.png").write_bytes(png(32, 32))
    prompts = write_file(tmp_path / "p.parquet", [{"prompt": "p", "image": "a.png"}], pa.string())
    run_dir = tmp_path / "run"
    assert main(["submit", str(prompts), "--config", str(EXAMPLE_CONFIG), "--run-dir", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert "column image: model=tiny is a HunyuanVideo 1.0" in err
    assert "takes no input image" in err and not run_dir.exists()
    # An image column with no image in it is fine (text-to-video rows).
    empty = write_file(tmp_path / "q.parquet", [{"prompt": "p", "image": None}], pa.string())
    assert main(["submit", str(empty), "--config", str(EXAMPLE_CONFIG), "--dry-run"]) == 0


# -- ids, sizes, costs, the streamed read, the dry run -------------------------------------------


def test_ids_sizes_and_costs(takes_images: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "a.png").write_bytes(png(120, 64, seed=1))
    (tmp_path / "b.png").write_bytes(png(64, 120, seed=2))
    rows = [
        {"prompt": "same", "image": "a.png"},
        {"prompt": "same", "image": "b.png"},
        {"prompt": "same", "image": None},
        {"prompt": "sized", "image": "a.png", "height": 64, "width": 64},
    ]
    prompts = write_file(tmp_path / "p.parquet", rows, pa.string())
    cfg = config()
    options = ImageOptions.for_model(cfg.model)
    geometry = registry.family_of(cfg.model).geometry
    table = read_prompts(prompts, cfg.sampling, geometry, options)
    videos = table.to_pylist()
    assert len({v["video_id"] for v in videos}) == 4  # the same prompt with two images: two videos
    plain = write_file(tmp_path / "t.parquet", [{"prompt": "same"}], pa.string())
    plain_id = read_prompts(plain, cfg.sampling, geometry).column("video_id")[0].as_py()
    assert videos[2]["video_id"] == plain_id  # a row without an image keeps its id
    assert [(v["height"], v["width"]) for v in videos] == [(48, 80), (80, 48), (64, 96), (64, 64)]
    steps = cfg.sampling.num_inference_steps
    for video in videos:
        tokens = video_cost(*(np.array([video[k]]) for k in ("height", "width", "num_frames")),
                            np.array([steps]), geometry)[0]  # fmt: skip
        extra = double.IMAGE_INPUT.extra_cost(steps) if video["image_sha256"] else 0.0
        assert video["cost"] == pytest.approx(tokens + extra)
    # The streamed read (what submit writes) gives the same videos, the images' hashes included.
    index = index_prompts(prompts, cfg.sampling, geometry, options)
    streamed = pa.Table.from_batches(list(index.video_batches()))
    assert streamed.to_pylist() == videos
    assert main(["submit", str(prompts), "--config", str(EXAMPLE_CONFIG), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "input images: 3 rows with an image (2 distinct" in out
    assert "image encoder: a test image encoder, 400 M parameters" in out
    assert "729 image tokens at every step, condition latents" in out


def test_the_plan_counts_the_image_encoder_and_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    from hvbatch.parallel.plan import memory_figures

    cfg = config("model=hunyuan-video-t2v-720p")
    text_only = memory_figures(cfg)
    registry.families()
    monkeypatch.setitem(registry._REGISTRY, double.NAME, double.make())
    with_images = memory_figures(cfg)
    assert with_images.encoder_params == text_only.encoder_params + 400_000_000
    assert with_images.text_tokens == text_only.text_tokens + 729
    assert with_images.encoder_words.endswith(" + a test image encoder")


# -- the job side, up to the pipeline ------------------------------------------------------------


def test_frozen_image_checked_and_fitted_on_the_job_side(takes_images: None, tmp_path: Path) -> None:
    data = png(90, 50, seed=7)
    store = ImageStore(tmp_path / "images")
    relative = store.freeze(data)
    sha = hashlib.sha256(data).hexdigest()
    run = RunDir(tmp_path)
    video = {"video_id": "v", "image_sha256": sha, "image_path": relative, "image_source": "x.png"}
    sampling = config("sampling.height=48", "sampling.width=32").sampling
    family = registry.get_family(double.NAME)
    image = input_image(run, video, family, sampling)
    assert image is not None and image.size == (48, 32)
    assert np.array_equal(np.asarray(image.image), np.asarray(double.SIZING.fit(decode(data), 48, 32)))
    assert input_image(run, {"video_id": "t", "image_sha256": None}, family, sampling) is None
    (tmp_path / relative).write_bytes(png(90, 50, seed=8))
    with pytest.raises(ValueError, match="no longer has sha256"):
        input_image(run, video, family, sampling)
    no_images = dataclasses.replace(family, image_input=None)
    with pytest.raises(ValueError, match="takes none: submit it with an image-to-video preset"):
        input_image(run, video, no_images, sampling)


def test_encoding_windows_keep_text_and_image_videos_apart(takes_images: None, tmp_path: Path) -> None:
    calls: list[tuple[list[str], list[Any] | None]] = []
    pipeline = SimpleNamespace(
        family=registry.get_family(double.NAME),
        encode_prompts=lambda requests, store, images=None: (
            calls.append(([p for p, _ in requests], images)) or 0
        ),
    )
    store = ImageStore(tmp_path / "images")
    data = png(64, 64)
    video = {"image_sha256": hashlib.sha256(data).hexdigest(), "image_path": store.freeze(data)}
    videos = [
        {"video_id": "a", "prompt": "t1"},
        {"video_id": "b", "prompt": "i1", **video},
        {"video_id": "c", "prompt": "t2"},
        {"video_id": "d", "prompt": "i2", "image_sha256": "0" * 64, "image_path": "images/00/none.png"},
    ]
    job = SimpleNamespace(run=RunDir(tmp_path), pipeline=pipeline, config=config(), prompts=None,
                          doing=lambda what: None)  # fmt: skip
    ctx = SimpleNamespace(job=job, images={})
    job_module._encode_window(ctx, videos)  # type: ignore[arg-type]
    assert [c[0] for c in calls] == [["t1", "t2"], ["i1"]]  # apart; "d" (image unreadable) left out
    assert calls[0][1] is None and isinstance(calls[1][1][0], InputImage)
    assert isinstance(ctx.images["d"], ValueError) and "cannot be read" in str(ctx.images["d"])


def test_pipeline_takes_the_image_and_keys_the_prompt_cache_on_it(takes_images: None) -> None:
    from hvbatch.models.encoding import PromptStore
    from hvbatch.pipeline import Pipeline

    cfg = config(
        "sampling.height=48", "sampling.width=80", "sampling.num_frames=5", "sampling.num_inference_steps=1"
    )
    pipeline = Pipeline.load(cfg)
    image = InputImage("ab" * 32, double.SIZING.fit(decode(png(120, 64)), 48, 80))
    received: list[InputImage] = []
    spec = pipeline.family.image_input
    assert spec is not None
    recorder = dataclasses.replace(spec, condition=lambda p, c, i, s: received.append(i) or c)
    pipeline.family = dataclasses.replace(pipeline.family, image_input=recorder)
    store = PromptStore()
    pipeline.conditioning("a cat", cfg.sampling, store, image=image)
    pipeline.conditioning("a cat", cfg.sampling, store)
    assert (
        pipeline.prompt_key("a cat", 5, image) in store.entries
        and pipeline.prompt_key("a cat", 5) in store.entries
    )
    video = pipeline.generate("a cat", cfg.sampling, image=image, decode=False)
    assert received == [image] and video.latents.shape[-2:] == (6, 10)
    small = InputImage("cd" * 32, double.SIZING.fit(decode(png(64, 64)), 32, 32))
    with pytest.raises(ValueError, match="fit it first"):
        pipeline.generate("a cat", cfg.sampling, image=small, decode=False)
    refusing = dataclasses.replace(spec, refusal=lambda model: f"model={model.name} is text-to-video")
    pipeline.family = dataclasses.replace(pipeline.family, image_input=refusing)
    with pytest.raises(ValueError, match="has an input image, but model=tiny is text-to-video"):
        pipeline.generate("a cat", cfg.sampling, image=image, decode=False)
    pipeline.family = dataclasses.replace(pipeline.family, image_input=None)
    with pytest.raises(ValueError, match="takes no input image"):
        pipeline.generate("a cat", cfg.sampling, image=image, decode=False)


def test_generate_with_an_image(
    takes_images: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    picture = tmp_path / "in.png"
    picture.write_bytes(png(64, 120, seed=9))
    record = tmp_path / "received"
    record.mkdir()
    out = tmp_path / "v.mp4"
    fast = ["model=tiny", "device=cpu", "sampling.num_frames=5", "sampling.num_inference_steps=1"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(double.RECORD_VAR, str(record))
        assert (
            main(["generate", "--prompt", "a tower", "--image", str(picture), "--out", str(out), *fast]) == 0
        )
    assert imageio.get_reader(out).get_data(0).shape == (80, 48, 3)  # the bucket of a 64x120 image
    (got,) = record.glob(f"{hashlib.sha256(picture.read_bytes()).hexdigest()}-80x48-*.png")
    want = double.SIZING.fit(decode(picture.read_bytes()), 80, 48)
    assert np.array_equal(np.asarray(Image.open(got)), np.asarray(want))
    capsys.readouterr()
    assert main(["generate", "--prompt", "x", "--image", str(tmp_path / "nope.png"), *fast]) == 2
    assert "nope.png: missing file" in capsys.readouterr().err


def test_generate_refuses_an_image_for_a_text_to_video_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    picture = tmp_path / "in.png"
    picture.write_bytes(png(64, 64))
    assert main(["generate", "--prompt", "x", "--image", str(picture), "model=tiny", "device=cpu"]) == 2
    assert "takes no input image" in capsys.readouterr().err
