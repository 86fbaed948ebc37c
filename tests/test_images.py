"""Input images: every form of an image value, decoding as the official code does, structured
problems, the content-addressed store, and the official bucket and resize rules."""

from __future__ import annotations

import hashlib
import io
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image, ImageOps

from hvbatch import images
from hvbatch.images import (
    ClosestRule,
    ImageError,
    ImageProblemKind,
    ImageStore,
    ResizeMode,
    check_images,
    closest_bucket,
    crop_size_list,
    fit_image,
    load_image,
    model_pixels,
    read_frozen,
)
from hvbatch.models.hunyuan_video import sizing as i2v_sizing
from hvbatch.models.hunyuan_video_15 import variants


def _noise(height: int, width: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    channels = {"RGB": 3, "RGBA": 4, "L": 1, "LA": 2}[mode]
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(array.squeeze(-1) if channels == 1 else array, mode)


def _encoded(image: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _official_open(data: bytes) -> np.ndarray:
    """What both official repositories do with a reference image: `Image.open(path).convert('RGB')`."""
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


# -- forms ---------------------------------------------------------------------------------------


def test_every_form_of_an_image_value_reads_the_same_image(tmp_path: Path) -> None:
    data = _encoded(_noise(24, 40), "PNG")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.png").write_bytes(data)
    other = _encoded(_noise(24, 40, seed=1), "PNG")
    (tmp_path / "b.png").write_bytes(other)
    forms = {
        "relative path": "sub/a.png",
        "absolute path": str(tmp_path / "sub" / "a.png"),
        "struct, bytes win over the path": {"bytes": data, "path": "b.png"},
        "struct, bytes and a missing path": {"bytes": data, "path": "gone/nowhere.png"},
        "struct, bytes only": {"bytes": data, "path": None},
        "struct without a path field": {"bytes": data},
        "struct, path only": {"bytes": None, "path": "sub/a.png"},
        "binary column value": data,
        "memoryview": memoryview(data),
    }
    for form, value in forms.items():
        loaded = load_image(value, base_dir=tmp_path)
        assert loaded.info.sha256 == hashlib.sha256(data).hexdigest(), form
        assert loaded.data == data, form
        assert np.array_equal(np.asarray(loaded.image), _official_open(data)), form
        assert (loaded.info.width, loaded.info.height, loaded.info.format) == (40, 24, "PNG"), form
    assert load_image("b.png", base_dir=tmp_path).info.sha256 == hashlib.sha256(other).hexdigest()
    assert images.image_ref({"bytes": data, "path": "b.png"}).label == "<bytes> b.png"  # type: ignore[union-attr]
    assert images.image_ref("sub/a.png").label == "sub/a.png"  # type: ignore[union-attr]
    assert images.image_ref(None) is None


@pytest.mark.parametrize(
    ("fmt", "kwargs", "lossless"),
    [
        ("PNG", {}, True),
        ("JPEG", {"quality": 90}, False),
        ("WEBP", {"lossless": True}, True),
        ("WEBP", {}, False),
    ],
)
def test_png_jpeg_and_webp_decode_as_pillow_does(fmt: str, kwargs: dict[str, object], lossless: bool) -> None:
    source = _noise(32, 48)
    data = _encoded(source, fmt, **kwargs)
    loaded = load_image(data)
    assert loaded.info.format == fmt
    assert loaded.info.extension == {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}[fmt]
    assert np.array_equal(np.asarray(loaded.image), _official_open(data))
    assert np.array_equal(np.asarray(loaded.image), np.asarray(source)) == lossless


def test_a_multi_picture_jpeg_gives_its_first_picture() -> None:
    """Phones write MPO (a JPEG followed by more pictures): Pillow opens it as format MPO."""
    black, white = _noise(16, 16).point(lambda _: 0), _noise(16, 16).point(lambda _: 255)
    data = _encoded(black, "MPO", save_all=True, append_images=[white])
    loaded = load_image(data)
    assert (loaded.info.format, loaded.info.extension) == ("MPO", "jpg")
    assert np.asarray(loaded.image).max() < 8


@pytest.mark.filterwarnings("ignore:Palette images with Transparency")  # the official call warns
def test_rgba_palette_and_grey_convert_to_rgb_as_the_official_code() -> None:
    rgba = Image.fromarray(
        np.array([[[10, 20, 30, 0], [200, 100, 50, 128], [1, 2, 3, 255]]], np.uint8), "RGBA"
    )
    palette = Image.new("P", (3, 1))
    palette.putpalette([0, 0, 0, 255, 0, 0, 0, 0, 255] + [0] * 759)
    palette.putdata([0, 1, 2])
    cases = {
        "RGBA PNG": _encoded(rgba, "PNG"),
        "RGBA WebP": _encoded(rgba, "WEBP", lossless=True),
        "palette, transparent index": _encoded(palette, "PNG", transparency=1),
        "palette, transparency bytes": _encoded(palette, "PNG", transparency=b"\x00\x80\xff"),
        "grey": _encoded(_noise(4, 5, "L"), "PNG"),
        "grey + alpha": _encoded(_noise(4, 5, "LA"), "PNG"),
        "CMYK JPEG": _encoded(_noise(8, 8).convert("CMYK"), "JPEG"),
    }
    for case, data in cases.items():
        loaded = load_image(data)
        assert loaded.image.mode == "RGB", case
        assert np.array_equal(np.asarray(loaded.image), _official_open(data)), case
    # Alpha is dropped, not composited: a fully transparent pixel keeps the colour stored under it.
    assert np.asarray(load_image(cases["RGBA PNG"]).image)[0].tolist() == [
        [10, 20, 30],
        [200, 100, 50],
        [1, 2, 3],
    ]
    assert np.asarray(load_image(cases["palette, transparent index"]).image)[0, 1].tolist() == [255, 0, 0]


@pytest.mark.parametrize(
    ("orientation", "size"), [(1, (40, 20)), (3, (40, 20)), (6, (20, 40)), (8, (20, 40))]
)
def test_exif_orientation_is_applied(orientation: int, size: tuple[int, int]) -> None:
    array = np.zeros((20, 40, 3), np.uint8)
    array[:5, :5] = 255  # a white top-left corner as stored
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _encoded(Image.fromarray(array), "JPEG", exif=exif, quality=95)
    loaded = load_image(data)
    assert loaded.image.size == size
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    assert np.array_equal(np.asarray(loaded.image), expected)
    corners = {1: (0, 0), 3: (-1, -1), 6: (0, -1), 8: (-1, 0)}[orientation]
    assert np.asarray(loaded.image)[corners].min() > 200
    assert (loaded.info.width, loaded.info.height) == size


# -- problems ------------------------------------------------------------------------------------


def test_every_bad_value_is_one_structured_problem(tmp_path: Path) -> None:
    good = _encoded(_noise(40, 40), "PNG")
    (tmp_path / "good.png").write_bytes(good)
    (tmp_path / "notes.txt").write_text("not an image at all")
    (tmp_path / "cut.png").write_bytes(good[: len(good) // 2])
    jpeg = _encoded(_noise(40, 40), "JPEG")
    (tmp_path / "cut.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    webp = _encoded(_noise(40, 40), "WEBP")
    (tmp_path / "cut.webp").write_bytes(webp[: len(webp) // 2])
    (tmp_path / "small.png").write_bytes(_encoded(_noise(8, 40), "PNG"))
    (tmp_path / "anim.gif").write_bytes(_encoded(_noise(40, 40), "GIF"))
    grey16 = Image.fromarray(np.full((40, 40), 300, np.uint16))
    (tmp_path / "deep.png").write_bytes(_encoded(grey16, "PNG"))
    (tmp_path / "folder.png").mkdir()
    rows = [
        ("ok-path", "good.png", None),
        ("missing", "nope/missing.png", ImageProblemKind.MISSING),
        ("text", "notes.txt", ImageProblemKind.NOT_AN_IMAGE),
        ("cut-png", "cut.png", ImageProblemKind.CORRUPT),
        ("cut-jpg", "cut.jpg", ImageProblemKind.CORRUPT),
        ("cut-webp", "cut.webp", ImageProblemKind.CORRUPT),
        ("small", "small.png", ImageProblemKind.TOO_SMALL),
        ("gif", "anim.gif", ImageProblemKind.UNSUPPORTED),
        ("deep", "deep.png", ImageProblemKind.UNSUPPORTED),
        ("folder", "folder.png", ImageProblemKind.UNREADABLE),
        ("url", "https://example.com/a.png", ImageProblemKind.UNREADABLE),
        ("int", 17, ImageProblemKind.WRONG_TYPE),
        ("list", ["a.png"], ImageProblemKind.WRONG_TYPE),
        ("empty-path", "  ", ImageProblemKind.WRONG_TYPE),
        ("bad-struct", {"bytes": good, "url": "x"}, ImageProblemKind.WRONG_TYPE),
        ("struct-bytes-type", {"bytes": "text", "path": "a.png"}, ImageProblemKind.WRONG_TYPE),
        ("empty-struct", {"bytes": None, "path": None}, ImageProblemKind.WRONG_TYPE),
        ("empty-bytes", {"bytes": b"", "path": "x.png"}, ImageProblemKind.NOT_AN_IMAGE),
        ("no-image", None, None),
        ("ok-bytes", {"bytes": good, "path": "good.png"}, None),
        ("missing-again", "nope/missing.png", ImageProblemKind.MISSING),
    ]
    ids = [r[0] for r in rows]
    infos, problems = check_images(
        [r[1] for r in rows], base_dir=tmp_path, ids=ids, first_row=100, min_side=16
    )
    expected = {100 + i: (ident, kind) for i, (ident, _, kind) in enumerate(rows) if kind is not None}
    assert {p.row: (p.id, p.kind) for p in problems} == expected
    assert [i for i, info in enumerate(infos) if info is not None] == [0, 19]
    assert infos[0].sha256 == infos[19].sha256 == hashlib.sha256(good).hexdigest()  # type: ignore[union-attr]
    by_id = {p.id: p for p in problems}
    assert by_id["missing"].path == "nope/missing.png"
    assert str(tmp_path / "nope" / "missing.png") in by_id["missing"].reason
    assert by_id["empty-bytes"].path == "x.png"
    assert "8" in by_id["small"].reason and "16" in by_id["small"].reason
    assert "truncated" in by_id["cut-png"].reason
    assert "GIF" in by_id["gif"].reason
    assert "clips" in by_id["deep"].reason
    assert str(by_id["text"]).startswith("row 102 (id 'text'): notes.txt not an image:")
    error = images.ImageCheckError(problems)
    assert str(error).count("\n  - ") == len(expected) and f"{len(expected)} bad images" in str(error)


def test_a_single_bad_value_raises_an_image_error(tmp_path: Path) -> None:
    with pytest.raises(ImageError) as caught:
        load_image("missing.png", base_dir=tmp_path)
    assert caught.value.kind is ImageProblemKind.MISSING and caught.value.path == "missing.png"
    with pytest.raises(ImageError, match="wrong type"):
        load_image(3.5)
    with pytest.raises(ImageError, match="too small"):
        load_image(_encoded(_noise(10, 30), "PNG"), min_side=11)
    assert load_image(_encoded(_noise(10, 30), "PNG"), min_side=10).info.height == 10


def test_a_decompression_bomb_is_refused_before_decoding() -> None:
    """A 20000x20000 PNG header (Pillow refuses above 2 x MAX_IMAGE_PIXELS) costs nothing to reject."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")
    with pytest.raises(ImageError) as caught:
        load_image(data)
    assert caught.value.kind is ImageProblemKind.TOO_LARGE and "400000000 pixels" in caught.value.reason


def test_image_column_types() -> None:
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    for ok in (pa.string(), pa.large_string(), pa.binary(), pa.large_binary(), struct, pa.null()):
        assert images.column_type_problem(ok) is None, ok
    assert images.column_type_problem(pa.struct([("bytes", pa.binary())])) is None
    for bad in (pa.int64(), pa.list_(pa.string()), pa.float32()):
        assert "an image column holds" in str(images.column_type_problem(bad)), bad
    assert "fields" in str(images.column_type_problem(pa.struct([("url", pa.string())])))
    # What a Hugging Face `datasets` Image column looks like when read back from Parquet.
    table = pa.table({"image": pa.array([{"bytes": b"x", "path": "a.png"}, None], type=struct)})
    assert table["image"].to_pylist() == [{"bytes": b"x", "path": "a.png"}, None]


# -- the store -----------------------------------------------------------------------------------


@pytest.mark.parametrize("sync_each", [True, False])
def test_freezing_stores_each_distinct_content_once(tmp_path: Path, sync_each: bool) -> None:
    store = ImageStore(tmp_path / "run" / "images", sync_each=sync_each)
    first = _encoded(_noise(16, 16), "PNG")
    second = _encoded(_noise(16, 16, seed=5), "JPEG")
    path_a = store.freeze(first)
    assert store.freeze(first) == path_a
    path_b = store.freeze(second)
    sha_a, sha_b = hashlib.sha256(first).hexdigest(), hashlib.sha256(second).hexdigest()
    assert path_a == f"images/{sha_a[:2]}/{sha_a}.png"
    assert path_b == f"images/{sha_b[:2]}/{sha_b}.jpg"
    assert (store.written, store.reused, store.bytes_written) == (2, 1, len(first) + len(second))
    files = sorted(p for p in (tmp_path / "run").rglob("*") if p.is_file())
    assert files == sorted([tmp_path / "run" / path_a, tmp_path / "run" / path_b])  # no temporary left
    assert (tmp_path / "run" / path_a).read_bytes() == first
    one_byte_changed = bytearray(first)
    one_byte_changed[-5] ^= 1
    assert store.freeze(bytes(one_byte_changed)) != path_a
    (tmp_path / "run" / path_a).write_bytes(first[:10])  # what a crash before the folder's sync can leave
    assert store.freeze(first) == path_a and (tmp_path / "run" / path_a).read_bytes() == first


def test_check_images_freezes_while_checking_and_reads_a_repeated_path_once(tmp_path: Path) -> None:
    data = _encoded(_noise(20, 20), "PNG")
    (tmp_path / "a.png").write_bytes(data)
    store = ImageStore(tmp_path / "run" / "images")
    values = ["a.png", "a.png", {"bytes": data, "path": None}, str(tmp_path / "a.png")]
    infos, problems = check_images(values, base_dir=tmp_path, store=store)
    assert not problems
    assert {info.frozen for info in infos if info} == {
        ImageStore.relative_path(hashlib.sha256(data).hexdigest(), "png")
    }
    assert (store.written, store.reused) == (1, 2)  # the repeated relative path was read once
    assert infos[0].source == "a.png" and infos[2].source == "<bytes>"  # type: ignore[union-attr]


def test_a_frozen_image_is_what_was_submitted(tmp_path: Path) -> None:
    source = tmp_path / "a.png"
    data = _encoded(_noise(20, 20), "PNG")
    source.write_bytes(data)
    run = tmp_path / "run"
    (info,), _ = check_images(["a.png"], base_dir=tmp_path, store=ImageStore(run / "images"))
    assert info is not None and info.frozen is not None
    source.write_bytes(_encoded(_noise(20, 20, seed=9), "PNG"))  # the user edits the file after submit
    frozen = read_frozen(run, info.frozen, info.sha256)
    assert frozen.data == data and np.array_equal(np.asarray(frozen.image), _official_open(data))
    (run / info.frozen).write_bytes(source.read_bytes())
    with pytest.raises(ValueError, match="no longer has sha256"):
        read_frozen(run, info.frozen, info.sha256)
    (run / info.frozen).unlink()
    with pytest.raises(ValueError, match="cannot be read"):
        read_frozen(run, info.frozen, info.sha256)


# -- buckets -------------------------------------------------------------------------------------


def _official_crop_size_list(
    base_size: int, patch_size: int, max_ratio: float = 4.0
) -> list[tuple[int, int]]:
    """`generate_crop_size_list` as both official repositories write it."""
    num_patches = round((base_size / patch_size) ** 2)
    crop_size_list = []
    wp, hp = num_patches, 1
    while wp > 0:
        if max(wp, hp) / min(wp, hp) <= max_ratio:
            crop_size_list.append((wp * patch_size, hp * patch_size))
        if (hp + 1) * wp <= num_patches:
            hp += 1
        else:
            wp -= 1
    return crop_size_list


def _official_closest_15(height: int, width: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """HunyuanVideo-1.5 `get_closest_ratio`: numpy argmin of |rounded ratio - aspect|."""
    ratios = np.array([round(float(h) / float(w), 5) for h, w in buckets])
    return buckets[int(np.abs(ratios - float(height) / float(width)).argmin())]


def _official_closest_i2v(height: int, width: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """HunyuanVideo-I2V `get_closest_ratio`: one-sided, toward the square."""
    ratios = np.array([round(float(h) / float(w), 5) for h, w in buckets])
    aspect = float(height) / float(width)
    diff = ratios - aspect
    indices = [(i, x) for i, x in enumerate(diff) if (x <= 0 if aspect >= 1 else x > 0)]
    return buckets[min(indices, key=lambda pair: abs(pair[1]))[0]]


_SIZES = [
    (w, h)
    for w in (1, 3, 7, 64, 333, 640, 720, 1024, 1080, 1280, 1920, 4000)
    for h in (1, 5, 64, 480, 720, 1080, 1500)
]


def test_bucket_lists_are_the_official_ones() -> None:
    for base, stride in ((640, 16), (960, 16), (960, 32), (720, 32), (480, 32), (256, 16)):
        assert list(crop_size_list(base, stride)) == _official_crop_size_list(base, stride)
    assert variants.IMAGE_SIZING.buckets("480p") == variants.generate_crop_size_list(640)
    assert i2v_sizing.IMAGE_SIZING.buckets("540p") == tuple(_official_crop_size_list(720, 32))
    assert len(crop_size_list(960, 16)) > len(crop_size_list(960, 32))


def test_buckets_follow_each_official_closest_rule() -> None:
    for width, height in _SIZES:
        for resolution, base in (("480p", 640), ("720p", 960)):
            expected = _official_closest_15(height, width, _official_crop_size_list(base, 16))
            assert variants.IMAGE_SIZING.bucket(width, height, resolution) == expected, (width, height)
            assert variants.bucket_for((width, height), resolution) == expected
        for resolution, base in i2v_sizing.RESOLUTION_BASE_SIZE.items():
            expected = _official_closest_i2v(height, width, _official_crop_size_list(base, 32))
            assert i2v_sizing.IMAGE_SIZING.bucket(width, height, resolution) == expected, (width, height)
    # The two rules differ: 1.5 takes the nearest ratio, I2V never a more elongated one.
    buckets = crop_size_list(640, 16)
    assert closest_bucket(1000, 530, buckets, ClosestRule.NEAREST) == (464, 880)
    assert closest_bucket(1000, 530, buckets, ClosestRule.TOWARD_SQUARE) == (464, 864)
    with pytest.raises(ValueError, match="resolution='1080p'"):
        variants.IMAGE_SIZING.bucket(16, 9, "1080p")


def test_diffusers_buckets_agree_with_the_official_1_5_rule_except_toward_the_square() -> None:
    """diffusers' HunyuanVideo15ImageProcessor uses HunyuanVideo-I2V's one-sided rule (ties kept)."""
    from diffusers.pipelines.hunyuan_video1_5.image_processor import HunyuanVideo15ImageProcessor

    processor = HunyuanVideo15ImageProcessor(vae_scale_factor=16)
    agree = differ = 0
    for width, height in _SIZES:
        ours = variants.IMAGE_SIZING.bucket(width, height, "480p")
        theirs = tuple(processor.calculate_default_height_width(height, width, 640))
        agree, differ = agree + (ours == theirs), differ + (ours != theirs)
        if ours != theirs:  # diffusers picked the nearest bucket on the square side instead
            assert abs(ours[0] / ours[1] - height / width) <= abs(theirs[0] / theirs[1] - height / width)
    assert agree and differ
    assert tuple(processor.calculate_default_height_width(720, 1280, 640)) == variants.bucket_for(
        (1280, 720), "480p"
    )
    assert tuple(processor.calculate_default_height_width(530, 1000, 640)) == (
        464,
        864,
    )  # official: (464, 880)


# -- resize and crop -----------------------------------------------------------------------------


def _official_resize_and_center_crop(image: np.ndarray, target_width: int, target_height: int) -> np.ndarray:
    """HunyuanVideo-1.5 `hyvideo/utils/data_utils.py` `resize_and_center_crop` (the SigLIP input)."""
    if target_height == image.shape[0] and target_width == image.shape[1]:
        return image
    pil_image = Image.fromarray(image)
    original_width, original_height = pil_image.size
    scale_factor = max(target_width / original_width, target_height / original_height)
    resized_width = round(original_width * scale_factor)
    resized_height = round(original_height * scale_factor)
    resized = pil_image.resize((resized_width, resized_height), Image.LANCZOS)
    left, top = (resized_width - target_width) / 2, (resized_height - target_height) / 2
    right, bottom = (resized_width + target_width) / 2, (resized_height + target_height) / 2
    return np.array(resized.crop((left, top, right, bottom)))


def _torchvision_center_crop(image: Image.Image, crop_height: int, crop_width: int) -> Image.Image:
    """torchvision `F.center_crop` on a PIL image (pad with 0 via `F.pad`, then `F.crop`)."""
    if crop_width > image.width or crop_height > image.height:
        padding_ltrb = [
            (crop_width - image.width) // 2 if crop_width > image.width else 0,
            (crop_height - image.height) // 2 if crop_height > image.height else 0,
            (crop_width - image.width + 1) // 2 if crop_width > image.width else 0,
            (crop_height - image.height + 1) // 2 if crop_height > image.height else 0,
        ]
        image = ImageOps.expand(image, border=tuple(padding_ltrb), fill=0)
        if (crop_width, crop_height) == image.size:
            return image
    crop_top = round((image.height - crop_height) / 2.0)
    crop_left = round((image.width - crop_width) / 2.0)
    return image.crop((crop_left, crop_top, crop_left + crop_width, crop_top + crop_height))


def _official_vae_input_15(image: Image.Image, height: int, width: int) -> Image.Image:
    """HunyuanVideo-1.5 `get_image_condition_latents`: Resize((rh, rw), LANCZOS) + CenterCrop."""
    scale_factor = max(width / image.width, height / image.height)
    size = (round(image.width * scale_factor), round(image.height * scale_factor))
    return _torchvision_center_crop(image.resize(size, Image.LANCZOS), height, width)


def _official_vae_input_i2v(image: Image.Image, bucket: tuple[int, int]) -> Image.Image:
    """HunyuanVideo-I2V: Resize(min(bucket)) (torchvision's int size: shorter side, bilinear) + CenterCrop."""
    short_target = min(bucket)
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = short_target, int(short_target * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    resized = image if (new_w, new_h) == (w, h) else image.resize((new_w, new_h), Image.BILINEAR)
    return _torchvision_center_crop(resized, *bucket)


_FITS = [
    ((1280, 720), (480, 848)),
    ((1000, 563), (464, 848)),
    ((333, 500), (720, 480)),
    ((640, 640), (480, 848)),
]
_FITS += [
    ((848, 480), (480, 848)),
    ((97, 31), (240, 752)),
    ((1920, 1080), (720, 1280)),
    ((3, 400), (1280, 320)),
]


@pytest.mark.parametrize(("image_size", "target"), _FITS)
def test_cover_lanczos_is_both_official_1_5_transforms(
    image_size: tuple[int, int], target: tuple[int, int]
) -> None:
    image = _noise(image_size[1], image_size[0], seed=image_size[0])
    fitted = fit_image(image, *target, ResizeMode.COVER_LANCZOS)
    assert fitted.size == (target[1], target[0])
    assert np.array_equal(np.asarray(fitted), np.asarray(_official_vae_input_15(image, *target)))
    siglip_input = _official_resize_and_center_crop(np.asarray(image), target[1], target[0])
    assert np.array_equal(np.asarray(fitted), siglip_input)
    assert np.array_equal(np.asarray(variants.IMAGE_SIZING.fit(image, *target)), np.asarray(fitted))


def test_cover_lanczos_against_diffusers_resize_where_they_agree() -> None:
    """diffusers resizes to floor sizes and pastes at floor offsets: the same pixels as the
    official round() where those agree (1280x720 -> 480x848), not elsewhere (1000x563 -> 480x848)."""
    from diffusers.pipelines.hunyuan_video1_5.image_processor import HunyuanVideo15ImageProcessor

    processor = HunyuanVideo15ImageProcessor(vae_scale_factor=16, do_resize=False, do_convert_rgb=True)
    same = _noise(720, 1280, seed=3)
    theirs = processor.resize(same, height=480, width=848, resize_mode="crop")
    assert np.array_equal(np.asarray(theirs), np.asarray(fit_image(same, 480, 848, ResizeMode.COVER_LANCZOS)))
    other = _noise(563, 1000, seed=4)
    theirs = processor.resize(other, height=480, width=848, resize_mode="crop")
    ours = fit_image(other, 480, 848, ResizeMode.COVER_LANCZOS)
    assert theirs.size == ours.size and not np.array_equal(np.asarray(theirs), np.asarray(ours))
    # diffusers' pixels in [-1, 1] for the VAE are the official ToTensor + Normalize exactly.
    fitted = fit_image(same, 480, 848, ResizeMode.COVER_LANCZOS)
    assert torch.equal(
        processor.preprocess(fitted, height=480, width=848)[0], torch.from_numpy(model_pixels(fitted))
    )


@pytest.mark.parametrize(
    "image_size", [(1280, 720), (640, 640), (480, 640), (1000, 563), (300, 1200), (2000, 31)]
)
def test_short_side_bilinear_is_the_official_i2v_transform(image_size: tuple[int, int]) -> None:
    image = _noise(image_size[1], image_size[0], seed=7)
    for resolution in i2v_sizing.RESOLUTION_BASE_SIZE:
        bucket = i2v_sizing.IMAGE_SIZING.bucket(image.width, image.height, resolution)
        fitted = i2v_sizing.IMAGE_SIZING.fit(image, *bucket)
        assert fitted.size == (bucket[1], bucket[0])
        assert np.array_equal(np.asarray(fitted), np.asarray(_official_vae_input_i2v(image, bucket))), (
            resolution
        )


def test_i2v_center_crop_pads_with_black_where_the_resized_image_falls_short() -> None:
    """Never with the official buckets (never more elongated than the image); with an explicit size
    of the other orientation, torchvision's CenterCrop pads: a 9:16 image into 720x1280."""
    image = Image.new("RGB", (360, 640), (200, 200, 200))
    fitted = i2v_sizing.IMAGE_SIZING.fit(image, 720, 1280)
    assert fitted.size == (1280, 720)
    assert np.array_equal(np.asarray(fitted), np.asarray(_official_vae_input_i2v(image, (720, 1280))))
    array = np.asarray(fitted)
    assert array[:, :280].max() == 0 and array[:, -280:].max() == 0 and array[:, 280:-280].min() == 200
    for resolution in i2v_sizing.RESOLUTION_BASE_SIZE:
        for width, height in _SIZES:
            bucket = i2v_sizing.IMAGE_SIZING.bucket(width, height, resolution)
            short = min(bucket)
            resized = (
                (short, int(short * height / width))
                if width <= height
                else (int(short * width / height), short)
            )
            assert resized[0] >= bucket[1] and resized[1] >= bucket[0], (width, height, resolution)


def test_model_pixels_are_to_tensor_then_normalize() -> None:
    image = _noise(8, 12, seed=11)
    as_torchvision = torch.from_numpy(np.array(image)).permute(2, 0, 1).float().div(255)
    as_torchvision = as_torchvision.sub_(torch.tensor([0.5])[:, None, None]).div_(
        torch.tensor([0.5])[:, None, None]
    )
    pixels = model_pixels(image)
    assert pixels.dtype == np.float32 and pixels.shape == (3, 8, 12)
    assert torch.equal(torch.from_numpy(pixels), as_torchvision)
    assert pixels.min() >= -1 and pixels.max() <= 1


def test_images_module_imports_no_torch() -> None:
    code = "import sys, hvbatch.images; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
