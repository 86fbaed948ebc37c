"""What checking and freezing input images costs at submit: N distinct image files on disk, each
read, hashed, fully decoded and (with a store) written once into a run folder.

    python3 benchmarks/image_freeze.py --count 10000 --size 64 --format PNG

Phases, each over the same files (the page cache warm after the first):
- `check`: `check_images` without a store (read, sha256, decode, orientation, RGB);
- `check + freeze, fsync each`: with an `ImageStore(sync_each=True)` into an empty folder (each
  file through `files.write_atomic`: temporary name, fsync, rename, fsync of its folder);
- `check + freeze, one sync`: `ImageStore(sync_each=False)` into another empty folder (temporary
  name and rename), then one syncfs(2) of the folder's filesystem, timed with it, as a folder
  written at once is made durable;
- `again`: the same call into the now full store (every content already there: nothing written).

With `--submit`, also the control plane's own path over a prompts file of those N images (a string
`image` column of relative paths; the tiny preset given HunyuanVideo-1.5's image rule at 480p, as a
family that takes images): `submit --dry-run`'s read (check, no freeze), and submit's read with
freezing into a staging folder, the shard files and `videos.parquet` written, the staging folder
synced and moved into the run (everything `hvbatch submit` does but start the jobs).
"""

from __future__ import annotations

import argparse
import ctypes
import io
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from hvbatch.images import ImageStore, check_images


def _write_images(folder: Path, count: int, size: int, fmt: str) -> tuple[list[str], int]:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    names, total = [], 0
    for i in range(count):
        array = base.copy()
        array[:16, :16] = np.random.default_rng(i + 1).integers(0, 256, (16, 16, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, fmt)
        name = f"img-{i:06d}.{fmt.lower()}"
        (folder / name).write_bytes(buf.getvalue())
        names.append(name)
        total += buf.tell()
    return names, total


def _timed(label: str, count: int, call: Callable[[], tuple[list, list]]) -> None:
    start = time.perf_counter()
    infos, problems = call()
    seconds = time.perf_counter() - start
    assert not problems and all(infos), problems[:3]
    print(f"{label:20s} {seconds:7.2f} s  {1000 * seconds / count:6.3f} ms/image")


def _syncfs(folder: Path) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(folder, os.O_RDONLY)
    try:
        if getattr(libc, "syncfs", None) is None or libc.syncfs(fd) != 0:
            os.sync()
    finally:
        os.close(fd)


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument("--size", type=int, default=64, help="square images of this side, pixels")
    parser.add_argument("--format", default="PNG", choices=["PNG", "JPEG", "WEBP"])
    parser.add_argument("--dir", default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--skip-fsync-each", action="store_true", help="skip the slow fsync-per-file phase")
    parser.add_argument("--submit", action="store_true", help="also time submit's read, freeze and write")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="hvbatch-images-", dir=args.dir))
    try:
        source = scratch / "prompts"
        source.mkdir()
        names, total = _write_images(source, args.count, args.size, args.format)
        print(
            f"{args.count} distinct {args.size}x{args.size} {args.format} files, "
            f"{total / args.count / 1024:.1f} KiB each; load average {os.getloadavg()[0]:.1f}"
        )
        _timed("check", args.count, lambda: check_images(names, base_dir=source))
        if not args.skip_fsync_each:
            each = ImageStore(scratch / "each" / "images")
            _timed("freeze, fsync each", args.count, lambda: check_images(names, base_dir=source, store=each))
        store = ImageStore(scratch / "once" / "images", sync_each=False)

        def freeze_then_sync() -> tuple[list, list]:
            result = check_images(names, base_dir=source, store=store)
            _syncfs(scratch / "once")
            return result

        _timed("freeze, one sync", args.count, freeze_then_sync)
        stored = sum(p.stat().st_size for p in (scratch / "once").rglob("*") if p.is_file())
        assert store.written == args.count, f"only {store.written} distinct contents"
        print(f"{'':20s} stored {store.written} files, {stored / store.written / 1024:.1f} KiB each")
        again = ImageStore(scratch / "once" / "images", sync_each=False)
        _timed("again", args.count, lambda: check_images(names, base_dir=source, store=again))
        assert again.written == 0 and again.reused == args.count
        if args.submit:
            _submit_phases(scratch, source, names)
    finally:
        shutil.rmtree(scratch)


def _submit_phases(scratch: Path, source: Path, names: list[str]) -> None:
    import dataclasses

    import pyarrow as pa
    import pyarrow.parquet as pq

    from hvbatch.batch.control.calibration import job_plan
    from hvbatch.batch.control.commands import create_run, plan_layout
    from hvbatch.batch.control.frozen import StreamedShards
    from hvbatch.batch.control.prompt_images import ImageOptions, ImageStaging
    from hvbatch.batch.control.prompt_index import index_prompts
    from hvbatch.batch.rundir import RunDir
    from hvbatch.config import load_config
    from hvbatch.models.family import ImageInput, family_of, replace_family
    from hvbatch.models.hunyuan_video_15.variants import IMAGE_SIZING

    config = load_config(None, ["model=tiny", "device=cpu", "sampling.num_inference_steps=4"])
    family = family_of(config.model)
    replace_family(dataclasses.replace(family, image_input=ImageInput(IMAGE_SIZING, lambda m: "480p")))
    prompts = source / "prompts.parquet"
    rows = {"prompt": [f"prompt {i}" for i in range(len(names))], "image": names}
    pq.write_table(pa.table(rows), prompts)
    count = len(names)
    start = time.perf_counter()
    index = index_prompts(prompts, config.sampling, family.geometry, ImageOptions.for_model(config.model))
    seconds = time.perf_counter() - start
    print(f"{'submit --dry-run read':20s} {seconds:7.2f} s  {1000 * seconds / count:6.3f} ms/image")
    run = RunDir(scratch / "run")
    start = time.perf_counter()
    with ImageStaging(run.root) as images:
        index = index_prompts(
            prompts, config.sampling, family.geometry, ImageOptions.for_model(config.model, images.store)
        )
        plan = job_plan(config, index.largest)
        layout = plan_layout(config, index, plan)
        create_run(run, config, prompts, StreamedShards(index, layout), "local", images)
    seconds = time.perf_counter() - start
    print(f"{'submit (no jobs)':20s} {seconds:7.2f} s  {1000 * seconds / count:6.3f} ms/image "
          f"({layout.num_shards} shards, {images.store.written} images frozen)")  # fmt: skip


if __name__ == "__main__":
    main()
