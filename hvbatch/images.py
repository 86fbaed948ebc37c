"""Input images for image-to-video: read from the forms datasets have, checked, hashed, frozen into
the run, and fitted to a video size the way the official code does.

Plain Python (Pillow, numpy; no torch): the control plane checks and freezes images at submit.

An `image` value (one row of a prompts file's `image` column) is one of:
- a string: a path, absolute or relative to `base_dir` (the prompts file's folder);
- the Hugging Face `datasets` Image struct `{"bytes": binary or None, "path": str or None}`: the
  bytes when present (the path is then only a label), else the path;
- bytes (a binary column): the encoded file itself;
- None: no image (the row is text-to-video).

Decoding (`decode`): PNG, JPEG (MPO too, the multi-picture JPEG phones write: its first picture)
and WebP (an animation's first frame); the whole image is decoded (`load()`), so a truncated file
fails here and not on a compute node; the EXIF orientation is applied (`ImageOps.exif_transpose`:
the official code skips this step, so a phone photo tagged "rotate 90" goes in sideways there);
then `convert("RGB")` as both official repositories do (`Image.open(path).convert('RGB')`): alpha
is dropped, not composited (a transparent pixel keeps the colour stored under it), a palette image
takes its palette colours (its transparency ignored), grey is replicated. 16- and 32-bit grey
images are refused: `convert("RGB")` clips them (every value above 255 becomes white).

Identity: the sha256 of the original bytes (`content_hash`), not of the decoded pixels: two files
with the same pixels in different encodings are two images, and a file rewritten with the same
bytes is the same image. `ImageStore.freeze` stores each distinct content once.

Fitting (`ImageSizing`): the bucket (height, width) nearest the image's aspect ratio at a
resolution, and the resize + centre crop to a (height, width), each model its own rule (see
`ClosestRule`, `ResizeMode`); `model_pixels` is the official `ToTensor()` + `Normalize(0.5, 0.5)`.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import io
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image, ImageOps, UnidentifiedImageError

from hvbatch.batch.files import write_atomic

FORMAT_EXTENSIONS = {"PNG": "png", "JPEG": "jpg", "MPO": "jpg", "WEBP": "webp"}
"""Pillow's format name -> the extension a frozen file gets."""
IMAGES_DIR = "images"
"""Frozen images live under `<run>/images/<first 2 hex digits>/<sha256>.<ext>`."""
STRUCT_FIELDS = ("bytes", "path")
_REFUSED_MODES = {"I;16": "16-bit", "I;16B": "16-bit", "I;16L": "16-bit", "I;16N": "16-bit", "I": "32-bit"}
_REFUSED_MODES |= {"F": "32-bit float"}
_URL_PREFIXES = ("http://", "https://", "s3://", "gs://", "hf://")


class ImageProblemKind(str, enum.Enum):
    """What is wrong with an image value (the `reason` of an `ImageProblem` says the details)."""

    WRONG_TYPE = "wrong type"
    MISSING = "missing file"
    UNREADABLE = "unreadable file"
    NOT_AN_IMAGE = "not an image"
    UNSUPPORTED = "unsupported image"
    CORRUPT = "truncated or corrupt"
    TOO_SMALL = "too small"
    TOO_LARGE = "too large"


class ImageError(ValueError):
    """One image value that cannot be used."""

    def __init__(self, kind: ImageProblemKind, reason: str, path: str | None = None) -> None:
        self.kind, self.reason, self.path = kind, reason, path
        where = f"{path}: " if path else ""
        super().__init__(f"{where}{kind.value}: {reason}")


@dataclass(frozen=True)
class ImageProblem:
    """A bad row of an image column: which row, its id, the path as written, and why."""

    row: int
    id: str | None
    path: str | None
    kind: ImageProblemKind
    reason: str

    def __str__(self) -> str:
        ident = f" (id {self.id!r})" if self.id is not None else ""
        path = f" {self.path}" if self.path else ""
        return f"row {self.row}{ident}:{path} {self.kind.value}: {self.reason}"


class ImageCheckError(ValueError):
    """Every bad image of a call, listed at once."""

    def __init__(self, problems: Sequence[ImageProblem]) -> None:
        self.problems = list(problems)
        noun = "image" if len(self.problems) == 1 else "images"
        super().__init__(f"{len(self.problems)} bad {noun}:\n" + "\n".join(f"  - {p}" for p in self.problems))


def content_hash(data: bytes) -> str:
    """The image's identity: sha256 of its original bytes, 64 hex digits."""
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class ImageRef:
    """Where an image value says the image is: its bytes (struct or binary column) or a path."""

    path: str | None
    """The path as written (for a struct with bytes, only a label)."""
    data: bytes | None

    @property
    def label(self) -> str:
        """How the manifest names the source: the path, or `<bytes>` (with the struct's path)."""
        if self.data is None:
            return str(self.path)
        return "<bytes>" if self.path is None else f"<bytes> {self.path}"


def column_type_problem(arrow_type: pa.DataType) -> str | None:
    """Why an Arrow column of this type cannot be an image column, or None if it can."""
    if pa.types.is_null(arrow_type):
        return None
    if (
        pa.types.is_string(arrow_type)
        or pa.types.is_large_string(arrow_type)
        or pa.types.is_binary(arrow_type)
        or pa.types.is_large_binary(arrow_type)
    ):
        return None
    if pa.types.is_struct(arrow_type):
        names = [arrow_type.field(i).name for i in range(arrow_type.num_fields)]
        extra = [n for n in names if n not in STRUCT_FIELDS]
        if not extra and names:
            return None
        return f"a struct with fields {names}: the Hugging Face image struct has fields bytes and path"
    return (
        f"type {arrow_type}: an image column holds paths (string), image files (binary) or the "
        "Hugging Face image struct {bytes, path}"
    )


def _as_bytes(value: Any) -> bytes | None:
    return bytes(value) if isinstance(value, (bytes, bytearray, memoryview)) else None


def image_ref(value: Any) -> ImageRef | None:
    """The `ImageRef` of one image value; None for no image; `ImageError` (wrong type) otherwise."""
    if value is None:
        return None
    if isinstance(value, str):
        if not value.strip():
            raise ImageError(ImageProblemKind.WRONG_TYPE, "an empty path: give a path or leave the cell null")
        return ImageRef(value, None)
    data = _as_bytes(value)
    if data is not None:
        return ImageRef(None, data)
    if isinstance(value, Mapping):
        extra = sorted(str(k) for k in value if k not in STRUCT_FIELDS)
        path, raw = value.get("path"), value.get("bytes")
        data = _as_bytes(raw)
        if extra or (raw is not None and data is None) or not (path is None or isinstance(path, str)):
            raise ImageError(
                ImageProblemKind.WRONG_TYPE,
                f"a struct with {dict((k, type(v).__name__) for k, v in value.items())}: the image struct "
                "is {bytes: binary or null, path: string or null}",
            )
        if data is not None:
            return ImageRef(path, data)
        if path is None or not path.strip():
            raise ImageError(ImageProblemKind.WRONG_TYPE, "an image struct with neither bytes nor a path")
        return ImageRef(path, None)
    raise ImageError(
        ImageProblemKind.WRONG_TYPE,
        f"a {type(value).__name__} ({value!r:.40}): give a path, image bytes or a {{bytes, path}} struct",
    )


def resolve_path(path: str, base_dir: str | Path) -> Path:
    """`path` as written, relative to `base_dir` unless absolute (no `~` or variable expansion)."""
    if path.startswith(_URL_PREFIXES):
        raise ImageError(
            ImageProblemKind.UNREADABLE, "a URL: hvbatch reads local files only; download it first", path
        )
    resolved = Path(path)
    return resolved if resolved.is_absolute() else Path(base_dir) / resolved


def read_bytes(ref: ImageRef, base_dir: str | Path) -> bytes:
    """The encoded image: the struct's / column's bytes, or the file's whole content."""
    if ref.data is not None:
        return ref.data
    assert ref.path is not None
    file = resolve_path(ref.path, base_dir)
    try:
        return file.read_bytes()
    except FileNotFoundError:
        raise ImageError(ImageProblemKind.MISSING, f"{file} does not exist", ref.path) from None
    except IsADirectoryError:
        raise ImageError(ImageProblemKind.UNREADABLE, f"{file} is a folder, not a file", ref.path) from None
    except OSError as err:
        raise ImageError(ImageProblemKind.UNREADABLE, f"{file}: {err.strerror or err}", ref.path) from None


def decode(data: bytes, *, min_side: int = 1, label: str | None = None) -> Image.Image:
    """The image as RGB (EXIF orientation applied, fully decoded); `ImageError` if it cannot be used.

    `min_side`: the least the shorter side (after orientation) may be, in pixels.
    """
    return _decode(data, min_side, label)[0]


def _decode(data: bytes, min_side: int, label: str | None) -> tuple[Image.Image, str]:
    """`decode`, and Pillow's name of the file's format."""
    if not data:
        raise ImageError(ImageProblemKind.NOT_AN_IMAGE, "empty (0 bytes)", label)
    with warnings.catch_warnings():
        # Pillow warns on palette transparency (ignored by convert("RGB"), as officially) and on
        # images above MAX_IMAGE_PIXELS (it raises DecompressionBombError above twice that).
        warnings.simplefilter("ignore")
        try:
            image = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            raise ImageError(
                ImageProblemKind.NOT_AN_IMAGE, f"Pillow cannot identify it (starts {data[:12]!r})", label
            ) from None
        except Image.DecompressionBombError as err:
            raise ImageError(ImageProblemKind.TOO_LARGE, str(err), label) from None
        except Exception as err:  # a recognised header with broken content
            raise ImageError(ImageProblemKind.CORRUPT, f"{type(err).__name__}: {err}", label) from None
        if image.format not in FORMAT_EXTENSIONS:
            raise ImageError(
                ImageProblemKind.UNSUPPORTED, f"a {image.format} image: use PNG, JPEG or WebP", label
            )
        try:
            image.load()
            oriented = ImageOps.exif_transpose(image)
        except Image.DecompressionBombError as err:
            raise ImageError(ImageProblemKind.TOO_LARGE, str(err), label) from None
        except Exception as err:
            raise ImageError(ImageProblemKind.CORRUPT, f"{type(err).__name__}: {err}", label) from None
        if oriented.mode in _REFUSED_MODES:
            raise ImageError(
                ImageProblemKind.UNSUPPORTED,
                f"{_REFUSED_MODES[oriented.mode]} grey ({oriented.mode}): converting it to RGB clips every "
                "value above 255 to white; save it as 8-bit",
                label,
            )
        rgb = oriented.convert("RGB")
    if min(rgb.size) < min_side:
        raise ImageError(
            ImageProblemKind.TOO_SMALL,
            f"{rgb.width}x{rgb.height} (w x h); the shorter side must be at least {min_side} pixels",
            label,
        )
    return rgb, str(image.format)


@dataclass(frozen=True)
class ImageInfo:
    """A checked image: identity, format and size (as the model sees it: oriented)."""

    sha256: str
    format: str
    width: int
    height: int
    num_bytes: int
    source: str
    """`ImageRef.label`: the path as written, or `<bytes>`."""
    frozen: str | None = None
    """Its file in the run, relative to the run directory (when frozen)."""

    @property
    def extension(self) -> str:
        return FORMAT_EXTENSIONS[self.format]


@dataclass(frozen=True)
class LoadedImage:
    """An image ready for a model: its checked info, original bytes and RGB pixels."""

    info: ImageInfo
    data: bytes
    image: Image.Image


@dataclass(frozen=True)
class InputImage:
    """A video's input image as a model gets it: fitted to the video's size (RGB), and its identity
    (the sha256 of the frozen file: what the prompt-encoding cache keys on)."""

    sha256: str
    image: Image.Image

    @property
    def size(self) -> tuple[int, int]:
        """`(height, width)`."""
        return self.image.height, self.image.width

    def pixels(self) -> np.ndarray:
        """`[3, H, W]` float32 in [-1, 1] (`model_pixels`)."""
        return model_pixels(self.image)


def load_bytes(data: bytes, *, source: str, min_side: int = 1, label: str | None = None) -> LoadedImage:
    rgb, fmt = _decode(data, min_side, label)
    info = ImageInfo(content_hash(data), fmt, rgb.width, rgb.height, len(data), source)
    return LoadedImage(info, data, rgb)


def load_image(value: Any, *, base_dir: str | Path = ".", min_side: int = 1) -> LoadedImage:
    """One image value (path, bytes or struct) read, checked and decoded; `ImageError` if unusable."""
    ref = image_ref(value)
    if ref is None:
        raise ImageError(ImageProblemKind.WRONG_TYPE, "no image (null)")
    return load_bytes(read_bytes(ref, base_dir), source=ref.label, min_side=min_side, label=ref.path)


class ImageStore:
    """Content-addressed image files: `<folder>/<sha[:2]>/<sha>.<ext>` (`folder` is the run's
    `images/`), each content written once; `freeze` returns the path relative to the run directory.

    `sync_each=True`: every file through `files.write_atomic` (temporary name, fsync, rename, fsync
    of its folder): durable one by one, ~17 ms a file on the development machine. `sync_each=False`:
    temporary name and rename only (a final name never holds a partial file), for a folder made
    durable at once afterwards (one filesystem sync for thousands of files, as the control plane
    writes its frozen shards): ~1 ms a file. Either way a file already there with the content's
    size is kept (a crash before the sync can only leave a shorter one, which is written again), and
    jobs check every byte against the hash when they read it (`read_frozen`).
    """

    def __init__(self, folder: str | Path, *, sync_each: bool = True) -> None:
        self.folder = Path(folder)
        self.sync_each = sync_each
        self.written = 0
        self.reused = 0
        self.bytes_written = 0

    @staticmethod
    def relative_path(sha256: str, extension: str) -> str:
        return f"{IMAGES_DIR}/{sha256[:2]}/{sha256}.{extension}"

    def freeze(self, data: bytes, extension: str | None = None) -> str:
        """Store `data` (a checked image's original bytes); its path relative to the run directory."""
        if extension is None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                extension = FORMAT_EXTENSIONS[str(Image.open(io.BytesIO(data)).format)]
        relative = self.relative_path(content_hash(data), extension)
        path = self.folder / relative.removeprefix(f"{IMAGES_DIR}/")
        if path.is_file() and path.stat().st_size == len(data):
            self.reused += 1
            return relative
        write_atomic(path, lambda handle: handle.write(data), durable=self.sync_each)
        self.written += 1
        self.bytes_written += len(data)
        return relative


def read_frozen(run_dir: str | Path, relative: str, sha256: str, *, min_side: int = 1) -> LoadedImage:
    """A frozen image as a job reads it: the bytes must still hash to `sha256`; else a ValueError
    that names the file (the video fails alone; the run's other videos go on)."""
    path = Path(run_dir) / relative
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ValueError(
            f"frozen input image {path} cannot be read ({err.strerror or err}): the run directory lost it; "
            "submit the prompts again into a new run"
        ) from None
    if content_hash(data) != sha256:
        raise ValueError(
            f"frozen input image {path} no longer has sha256 {sha256} (the file was changed after "
            "submit); submit the prompts again into a new run"
        )
    return load_bytes(data, source=relative, min_side=min_side, label=str(path))


def check_images(
    values: Iterable[Any],
    *,
    base_dir: str | Path,
    ids: Sequence[str | None] | None = None,
    first_row: int = 0,
    min_side: int = 1,
    store: ImageStore | None = None,
) -> tuple[list[ImageInfo | None], list[ImageProblem]]:
    """Check (and, with `store`, freeze) every value of an image column in one pass.

    Returns one entry per value (None for no image or a bad one) and the problems of every bad
    row, numbered from `first_row`. Each file is read once; its bytes are hashed, decoded in full
    and dropped (only `ImageInfo` is kept). Repeated paths are read once.
    """
    infos: list[ImageInfo | None] = []
    problems: list[ImageProblem] = []
    seen: dict[str, ImageInfo | ImageError] = {}
    for i, value in enumerate(values):
        row = first_row + i
        ident = None if ids is None else ids[i]
        path = value if isinstance(value, str) else value.get("path") if isinstance(value, Mapping) else None
        ref = None
        try:
            ref = image_ref(value)
            if ref is None:
                infos.append(None)
                continue
            cached = seen.get(ref.path) if ref.data is None and ref.path is not None else None
            if isinstance(cached, ImageError):
                raise cached
            info = cached or _check_one(ref, base_dir, min_side, store)
            if ref.data is None and ref.path is not None:
                seen[ref.path] = info
            infos.append(info)
        except ImageError as err:
            if ref is not None and ref.data is None and ref.path is not None:
                seen[ref.path] = err
            infos.append(None)
            problems.append(
                ImageProblem(row, ident, path if isinstance(path, str) else None, err.kind, err.reason)
            )
    return infos, problems


def _check_one(ref: ImageRef, base_dir: str | Path, min_side: int, store: ImageStore | None) -> ImageInfo:
    loaded = load_bytes(read_bytes(ref, base_dir), source=ref.label, min_side=min_side, label=None)
    info = loaded.info
    if store is None:
        return info
    frozen = store.freeze(loaded.data, info.extension)
    return ImageInfo(info.sha256, info.format, info.width, info.height, info.num_bytes, info.source, frozen)


# -- sizes ---------------------------------------------------------------------------------------


class ClosestRule(str, enum.Enum):
    """How a bucket is picked for an image's aspect ratio r = height / width (bucket ratios rounded
    to 5 places, as the official code rounds them; the first bucket of the list wins a tie)."""

    NEAREST = "nearest"
    """The smallest |bucket ratio - r| (HunyuanVideo-1.5 `get_closest_ratio`)."""
    TOWARD_SQUARE = "toward_square"
    """The nearest among buckets no taller than the image when r >= 1, strictly taller when r < 1
    (HunyuanVideo-I2V `get_closest_ratio`): the bucket is never more elongated than the image."""


class ResizeMode(str, enum.Enum):
    """How an image becomes exactly (height, width)."""

    COVER_LANCZOS = "cover_lanczos"
    """Scale by max(width / w, height / h), sizes rounded, Lanczos, centre crop (HunyuanVideo-1.5:
    `Resize((round(h*s), round(w*s)), LANCZOS)` + `CenterCrop`)."""
    SHORT_SIDE_BILINEAR = "short_side_bilinear"
    """The shorter side to min(height, width), the other truncated to an int, bilinear, then
    torchvision's `CenterCrop((height, width))`, which pads with black where the resized image is
    smaller (HunyuanVideo-I2V: `Resize(min(bucket))` + `CenterCrop(bucket)`)."""


@functools.cache
def crop_size_list(base_size: int, stride: int, max_ratio: float = 4.0) -> tuple[tuple[int, int], ...]:
    """The official bucket list: `(a, b)` multiples of `stride` with `(a/stride)*(b/stride)` at most
    `round((base/stride)**2)`, aspect within `max_ratio`, walked from wide-first to tall-first; the
    official code reads each pair as (height, width)."""
    num_patches = round((base_size / stride) ** 2)
    sizes: list[tuple[int, int]] = []
    first, second = num_patches, 1
    while first > 0:
        if max(first, second) / min(first, second) <= max_ratio:
            sizes.append((first * stride, second * stride))
        if (second + 1) * first <= num_patches:
            second += 1
        else:
            first -= 1
    return tuple(sizes)


def closest_bucket(
    width: int, height: int, buckets: Sequence[tuple[int, int]], rule: ClosestRule
) -> tuple[int, int]:
    """`(height, width)` of the bucket `rule` picks for a `width x height` image."""
    target = float(height) / float(width)
    candidates = [(abs(round(h / w, 5) - target), i) for i, (h, w) in enumerate(buckets)]
    if rule is ClosestRule.TOWARD_SQUARE:
        ratios = [round(h / w, 5) - target for h, w in buckets]
        keep = [(d <= 0) if target >= 1 else (d > 0) for d in ratios]
        candidates = [c for c, k in zip(candidates, keep, strict=True) if k]
    if not candidates:
        raise ValueError(f"no bucket for a {width}x{height} image among {len(buckets)} buckets")
    return buckets[min(candidates)[1]]


def _center_crop(image: Image.Image, height: int, width: int) -> Image.Image:
    """torchvision's `CenterCrop((height, width))` on a PIL image: zero padding where it is smaller."""
    if width > image.width or height > image.height:
        pad_w, pad_h = max(width - image.width, 0), max(height - image.height, 0)
        padded = Image.new(image.mode, (image.width + pad_w, image.height + pad_h), 0)
        padded.paste(image, (pad_w // 2, pad_h // 2))
        image = padded
        if image.size == (width, height):
            return image
    top = round((image.height - height) / 2.0)
    left = round((image.width - width) / 2.0)
    return image.crop((left, top, left + width, top + height))


def fit_image(image: Image.Image, height: int, width: int, mode: ResizeMode) -> Image.Image:
    """`image` (RGB) resized and centre-cropped to exactly `height x width`, as `mode` says."""
    if height < 1 or width < 1:
        raise ValueError(f"cannot fit an image to {height}x{width}")
    if mode is ResizeMode.COVER_LANCZOS:
        scale = max(width / image.width, height / image.height)
        size = (round(image.width * scale), round(image.height * scale))
        resized = image.resize(size, Image.Resampling.LANCZOS)
    else:
        short = min(height, width)
        if image.width <= image.height:
            size = (short, int(short * image.height / image.width))
        else:
            size = (int(short * image.width / image.height), short)
        resized = image if size == image.size else image.resize(size, Image.Resampling.BILINEAR)
    return _center_crop(resized, height, width)


def model_pixels(image: Image.Image) -> np.ndarray:
    """`[3, H, W]` float32 in [-1, 1]: `ToTensor()` (x / 255) then `Normalize(0.5, 0.5)`, in float32."""
    x = np.asarray(image.convert("RGB"), dtype=np.uint8).astype(np.float32) / np.float32(255)
    return np.ascontiguousarray(((x - np.float32(0.5)) / np.float32(0.5)).transpose(2, 0, 1))


@dataclass(frozen=True)
class ImageSizing:
    """A model's rule from an image to its video size and its first frame."""

    base_sizes: tuple[tuple[str, int], ...]
    """`(resolution, bucket base size)` pairs, e.g. `(("480p", 640), ("720p", 960))`."""
    stride: int
    closest: ClosestRule
    resize: ResizeMode
    max_ratio: float = 4.0

    def base_size(self, resolution: str) -> int:
        sizes = dict(self.base_sizes)
        if resolution not in sizes:
            raise ValueError(f"resolution={resolution!r}: this model has {', '.join(sizes)}")
        return sizes[resolution]

    def buckets(self, resolution: str) -> tuple[tuple[int, int], ...]:
        return crop_size_list(self.base_size(resolution), self.stride, self.max_ratio)

    def bucket(self, width: int, height: int, resolution: str) -> tuple[int, int]:
        """`(height, width)` of the video for a `width x height` image at `resolution`."""
        return closest_bucket(width, height, self.buckets(resolution), self.closest)

    def fit(self, image: Image.Image, height: int, width: int) -> Image.Image:
        return fit_image(image, height, width, self.resize)
