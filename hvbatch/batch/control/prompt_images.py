"""The `image` column of a prompts file, checked (and at submit frozen) as the file is read.

A row's image is read, hashed, decoded in full and dropped as soon as it is checked
(`hvbatch.images.check_images`), a batch of `IMAGE_BATCH_ROWS` rows at a time; what is kept per row
is its sha256, format and size (`PromptImages`: 42 bytes a row, only for a file with an image
column), so the second read of the file (`reread_batches`) knows every row's image without
opening one again. At submit, each distinct content is written once into a staging folder beside
the run directory (`ImageStaging`), made durable by one filesystem sync and renamed into the run
(`images/`) once the run directory is claimed; any error removes it.

Rules (the README's "Image-to-video inputs"): a row with an image and neither `height` nor `width`
gets the bucket of the image's aspect ratio at the preset's resolution; with both, the image is
resized and centre-cropped to them; with one of them, the row is refused. The image's sha256
joins a hashed id (`|image=<sha256>`, only for rows with an image: text-to-video rows keep their
ids) and the video's cost (`ImageInput.extra_cost`).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from hvbatch.batch.control.prompt_ids import Problems
from hvbatch.batch.files import adopt_folder, is_disk_full, tmp_name
from hvbatch.images import (
    FORMAT_EXTENSIONS,
    IMAGES_DIR,
    ImageError,
    ImageProblem,
    ImageStore,
    check_images,
    column_type_problem,
    image_ref,
)
from hvbatch.models.family import ImageInput, family_of

IMAGE_COLUMN = "image"
IMAGE_BATCH_ROWS = 256
"""Rows a batch holds when the file has an image column (a struct column holds the image bytes)."""
MAX_LISTED = 200
"""Bad images listed one per line; more are counted."""
_FORMATS = tuple(FORMAT_EXTENSIONS)
HEX_DIGITS = 64


def image_type_problem(arrow_type: pa.DataType) -> str | None:
    """Why an `image` column of this Arrow type cannot be used, or None."""
    if pa.types.is_dictionary(arrow_type):
        arrow_type = arrow_type.value_type
    return column_type_problem(arrow_type)


@dataclass(frozen=True)
class ImageOptions:
    """How a prompt file's images are taken: the family's rule (None: it takes none) and, at submit,
    where they are frozen."""

    spec: ImageInput | None
    resolution: str = ""
    refusal: str | None = "this model takes no input image; drop the image column for text-to-video"
    store: ImageStore | None = None

    @classmethod
    def for_model(cls, model: Any, store: ImageStore | None = None) -> ImageOptions:
        family = family_of(model)
        spec = family.image_input
        resolution = spec.resolution(model) if spec is not None else ""
        return cls(spec, resolution, family.no_images_reason(model), store)


@dataclass
class BatchImages:
    """The images of one batch of rows."""

    has: np.ndarray
    """True where the row has a usable image."""
    bad: np.ndarray
    """True where the row's image is bad (first read only)."""
    sha256: pa.Array
    frozen: pa.Array
    """The frozen file, relative to the run directory (string; null without an image)."""
    source: pa.Array
    """The image as the file names it (`ImageRef.label`)."""
    width: np.ndarray
    height: np.ndarray
    """The image's own size (oriented), 0 without an image."""
    extra_cost: np.ndarray | None = None
    """Cost each row's videos add for their image (`ImageInput.extra_cost`), set with the steps."""


def _hex_strings(digests: np.ndarray) -> pa.Array:
    """`[n, 32]` uint8 digests as 64-hex-digit strings."""
    hexed = pa.py_buffer(digests.tobytes().hex().encode())
    ends = pa.py_buffer(np.arange(0, HEX_DIGITS * len(digests) + 1, HEX_DIGITS, dtype=np.int32).tobytes())
    return pa.Array.from_buffers(pa.string(), len(digests), [None, ends, hexed])


def _labels(values: list[Any]) -> list[str | None]:
    labels: list[str | None] = []
    for value in values:
        try:
            ref = image_ref(value)
        except ImageError:
            ref = None
        labels.append(None if ref is None else ref.label)
    return labels


class PromptImages:
    """Every row's checked image: sha256, format, size (42 bytes a row), and the bad ones."""

    def __init__(self, num_rows: int, options: ImageOptions, base_dir: Path) -> None:
        self.options, self.base_dir = options, base_dir
        self.has = np.zeros(num_rows, bool)
        self.digests = np.zeros((num_rows, 32), np.uint8)
        self.formats = np.zeros(num_rows, np.uint8)
        self.sizes = np.zeros((num_rows, 2), np.int32)
        self.num_bad = 0
        self.num_bytes = 0
        self.refused = False

    @property
    def num_images(self) -> int:
        return int(self.has.sum())

    def read(
        self, batch: pa.RecordBatch, offset: int, ids: list[str | None] | None, check: bool,
        problems: Problems, numbers: dict[str, np.ndarray], given: dict[str, np.ndarray],
    ) -> BatchImages:  # fmt: skip
        """A batch's images: checked (first read, `check`; `ids`: the explicit ids, for messages)
        or recalled (second read); their rows' sizes (`numbers`, where `given` says a column was not
        given) and costs."""
        column = batch.column(IMAGE_COLUMN)
        found = self.check(column, offset, ids, problems) if check else self.batch(offset, column)
        self.fit_sizes(found, numbers, given, offset, problems if check else None)
        self.set_cost(found, numbers["num_inference_steps"])
        return found

    def check(
        self, column: pa.Array, offset: int, ids: list[str | None] | None, problems: Problems
    ) -> BatchImages:
        """Check (and freeze, with a store) one batch's images, in rows offset..; bad ones go to
        `problems`, one line each (the first `MAX_LISTED`)."""
        if pa.types.is_dictionary(column.type):
            column = column.dictionary_decode()
        values = column.to_pylist()
        n = len(values)
        given = np.array([v is not None for v in values], bool)
        if given.any() and self.options.refusal is not None:
            if not self.refused:
                problems.add(f"column {IMAGE_COLUMN}", self.options.refusal)
            self.refused = True
            return self._empty(n, given)
        spec = self.options.spec
        min_side = spec.min_side if spec is not None else 1
        infos, bad = check_images(
            values,
            base_dir=self.base_dir,
            ids=ids,
            first_row=offset,
            min_side=min_side,
            store=self.options.store,
        )
        self._report(bad, problems)
        for i, info in enumerate(infos):
            if info is None:
                continue
            row = offset + i
            self.has[row] = True
            self.digests[row] = np.frombuffer(bytes.fromhex(info.sha256), np.uint8)
            self.formats[row] = _FORMATS.index(info.format)
            self.sizes[row] = (info.width, info.height)
            self.num_bytes += info.num_bytes
        bad_rows = np.zeros(n, bool)
        bad_rows[[p.row - offset for p in bad]] = True
        return self.batch(offset, values, bad_rows)

    def _report(self, bad: list[ImageProblem], problems: Problems) -> None:
        for problem in bad:
            self.num_bad += 1
            if self.num_bad <= MAX_LISTED:
                problems.add(f"column {IMAGE_COLUMN}", str(problem))

    def finish(self, problems: Problems) -> None:
        """After the last batch: the count of bad images not listed."""
        if self.num_bad > MAX_LISTED:
            more = self.num_bad - MAX_LISTED
            problems.add(
                f"column {IMAGE_COLUMN}", f"... and {more:,} more bad images ({self.num_bad:,} in all)"
            )

    def _empty(self, n: int, bad: np.ndarray) -> BatchImages:
        nulls = pa.nulls(n, pa.string())
        zeros = np.zeros(n, np.int64)
        return BatchImages(np.zeros(n, bool), bad, nulls, nulls, nulls, zeros, zeros)

    def batch(self, offset: int, values: list[Any] | pa.Array, bad: np.ndarray | None = None) -> BatchImages:
        """Rows offset.. as checked (`values`: the batch's image column, for the source labels)."""
        if isinstance(values, pa.Array):
            values = (
                values.dictionary_decode() if pa.types.is_dictionary(values.type) else values
            ).to_pylist()
        n = len(values)
        rows = slice(offset, offset + n)
        has = self.has[rows].copy()
        mask = pa.array(~has)
        sha = _nulls_where(_hex_strings(self.digests[rows]), mask)
        extensions = np.array([FORMAT_EXTENSIONS[f] for f in _FORMATS], dtype=object)[self.formats[rows]]
        frozen = [
            ImageStore.relative_path(s, e) if h else None
            for s, e, h in zip(sha.to_pylist(), extensions.tolist(), has.tolist(), strict=True)
        ]
        source = pa.array(
            [label if h else None for label, h in zip(_labels(values), has, strict=True)], pa.string()
        )
        width = self.sizes[rows, 0].astype(np.int64)
        height = self.sizes[rows, 1].astype(np.int64)
        return BatchImages(has, np.zeros(n, bool) if bad is None else bad, sha, pa.array(frozen, pa.string()),
                           source, width, height)  # fmt: skip

    def fit_sizes(
        self, b: BatchImages, numbers: dict[str, np.ndarray], given: dict[str, np.ndarray], offset: int,
        problems: Problems | None,
    ) -> None:  # fmt: skip
        """Rows with an image: the bucket of the image's aspect ratio where neither height nor width
        is given; a row giving one of them is refused (`problems`, first read only)."""
        h_given, w_given = given["height"], given["width"]
        one = b.has & (h_given != w_given)
        if problems is not None:
            problems.add_mask(
                "columns height, width",
                "with an image and only one of height / width (give both, to resize and crop the image "
                "to them, or neither, for the bucket of the image's aspect ratio)",
                one,
                offset,
            )
        bucketed = b.has & ~h_given & ~w_given
        if not bucketed.any():
            return
        spec = self.options.spec
        assert spec is not None
        pairs = np.stack([b.width[bucketed], b.height[bucketed]], axis=1)
        unique, inverse = np.unique(pairs, axis=0, return_inverse=True)
        buckets = np.array([spec.sizing.bucket(int(w), int(h), self.options.resolution) for w, h in unique])
        numbers["height"] = numbers["height"].copy()
        numbers["width"] = numbers["width"].copy()
        numbers["height"][bucketed] = buckets[inverse.reshape(-1), 0]
        numbers["width"][bucketed] = buckets[inverse.reshape(-1), 1]

    def set_cost(self, b: BatchImages, steps: np.ndarray) -> None:
        spec = self.options.spec
        extra = (
            np.zeros(len(b.has)) if spec is None else np.asarray(spec.extra_cost(steps.astype(np.float64)))
        )
        b.extra_cost = np.where(b.has, extra, 0.0)

    def summary(self) -> str:
        """The dry run's line about the images."""
        count = self.num_images
        distinct = len(np.unique(np.ascontiguousarray(self.digests[self.has]).view("S32")))
        spec = self.options.spec
        words = f", image encoder {spec.encoder_words}" if spec is not None and spec.encoder_words else ""
        unique = f"{distinct:,} distinct"
        return (
            f"input images: {count:,} rows with an image ({unique}, {self.num_bytes / 2**20:,.1f} MiB read; "
            f"bucket resolution {self.options.resolution or 'n/a'}{words})"
        )


def _nulls_where(strings: pa.Array, mask: pa.Array) -> pa.Array:
    """`strings` with nulls where `mask`."""
    return pc.if_else(mask, pa.scalar(None, pa.string()), strings)


class _StagingStore(ImageStore):
    """An `ImageStore` whose write errors name the run directory's parent (where it stages)."""

    def __init__(self, folder: Path, run_root: Path) -> None:
        super().__init__(folder, sync_each=False)
        self.run_root = run_root

    def freeze(self, data: bytes, extension: str | None = None) -> str:
        try:
            return super().freeze(data, extension)
        except OSError as err:
            if is_disk_full(err):
                raise
            raise ValueError(
                f"cannot freeze the input images in {self.run_root.parent} (beside --run-dir "
                f"{self.run_root}, until the run is created): {err.strerror or err}; choose a --run-dir "
                "in a folder you can write"
            ) from err


class ImageStaging:
    """Where submit freezes images before the run directory exists: a hidden folder beside it,
    moved in as `<run>/images` by `adopt`, removed on any error (`with`)."""

    def __init__(self, run_root: Path) -> None:
        self.run_root = run_root
        self.folder = run_root.parent / tmp_name(f"{run_root.name}.{IMAGES_DIR}")
        self.store: ImageStore = _StagingStore(self.folder, run_root)

    def __enter__(self) -> ImageStaging:
        return self

    def __exit__(self, *exc: object) -> None:
        self.discard()

    @property
    def used(self) -> bool:
        return self.folder.is_dir()

    def adopt(self) -> None:
        """Into the claimed run directory (one filesystem sync, a rename)."""
        if self.used:
            os.chmod(self.folder, 0o700)
            adopt_folder(self.folder, self.run_root / IMAGES_DIR)

    def discard(self) -> None:
        if self.used:  # (never made, or moved into the run: nothing to remove)
            shutil.rmtree(self.folder, ignore_errors=True)


def dry_run_lines(
    images: PromptImages, geometry: Any, largest: dict[str, Any], encoder_dtype_bytes: int
) -> list[str]:
    """What the dry run says about the images: counts, the image encoder, the condition latents."""
    lines = [images.summary()]
    spec = images.options.spec
    if spec is None or not images.num_images:
        return lines
    if spec.encoder_params:
        gib = spec.encoder_params * encoder_dtype_bytes / 2**30
        lines.append(f"  image encoder: {spec.encoder_words or 'the family image encoder'}, "
                     f"{spec.encoder_params / 1e6:,.0f} M parameters ({gib:.2f} GiB)")  # fmt: skip
    h, w, f = (int(largest[k]) for k in ("height", "width", "num_frames"))
    latents = spec.condition_latent_bytes(geometry, h, w, f)
    lines.append(
        f"  per image-to-video video: {spec.image_tokens} image tokens at every step, condition latents "
        f"{latents / 2**20:,.2f} MiB (float32, {spec.condition_channels} channels at {h}x{w}x{f}), "
        f"encoding cost {spec.encode_cost:,.0f} (in the shard costs)"
    )
    return lines
