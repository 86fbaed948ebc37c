"""A video's input image on the job side: its frozen file in the run, checked against its sha256,
decoded and fitted to the video's size by the family's rule (`ImageInput.sizing`).

A video whose image cannot be used (the file gone or changed, or a model that takes no image)
raises a ValueError naming it: the video fails alone, the shard's other videos go on.
"""

from __future__ import annotations

from typing import Any

from hvbatch.batch.rundir import RunDir
from hvbatch.batch.videos import sampling_for
from hvbatch.config import SamplingConfig
from hvbatch.images import InputImage, read_frozen
from hvbatch.models.family import ModelFamily
from hvbatch.text import printable


def input_image(
    run: RunDir, video: dict[str, Any], family: ModelFamily, sampling: SamplingConfig
) -> InputImage | None:
    """The video's fitted input image; None for a text-to-video video."""
    sha256 = video.get("image_sha256")
    if not sha256:
        return None
    spec = family.image_input
    if spec is None:
        raise ValueError(
            f"video {printable(video['video_id'])} has an input image ({video.get('image_source')}), but "
            f"model family {family.name} takes none: submit it with an image-to-video preset"
        )
    if not video.get("image_path"):
        raise ValueError(f"video {printable(video['video_id'])}: its shard row names no frozen image file")
    loaded = read_frozen(run.root, video["image_path"], sha256)
    return InputImage(sha256, spec.sizing.fit(loaded.image, sampling.height, sampling.width))


def window_images(
    run: RunDir, videos: list[dict[str, Any]], family: ModelFamily, defaults: SamplingConfig
) -> dict[str, InputImage | Exception]:
    """The input images of an encoding window's videos, by video id (an error where one cannot be
    used: raised by the video that needs it)."""
    found: dict[str, InputImage | Exception] = {}
    for video in videos:
        if not video.get("image_sha256"):
            continue
        try:
            image = input_image(run, video, family, sampling_for(video, defaults))
            assert image is not None
            found[video["video_id"]] = image
        except (ValueError, OSError) as err:
            found[video["video_id"]] = err
    return found


def take_image(
    images: dict[str, InputImage | Exception], run: RunDir, video: dict[str, Any], family: ModelFamily,
    defaults: SamplingConfig,
) -> InputImage | None:  # fmt: skip
    """The video's fitted input image from its window's `images` (read now if not there); None
    for text-to-video; raises what stopped reading it (the video fails alone)."""
    if not video.get("image_sha256"):
        return None
    if video["video_id"] not in images:
        images |= window_images(run, [video], family, defaults)
    image = images.pop(video["video_id"])
    if isinstance(image, Exception):
        raise image
    return image


def encode_apart(
    pipeline: Any, videos: list[dict[str, Any]], images: dict[str, InputImage | Exception], store: Any,
    defaults: SamplingConfig,
) -> int:  # fmt: skip
    """Encode an encoding window's prompts, text-to-video and image-to-video videos apart (never one
    batch), each distinct (prompt, image) once (`Pipeline.encode_prompts`); a video whose image
    cannot be read is left out (it fails alone, with that error, when its turn comes)."""
    encoded = 0
    for with_image in (False, True):
        kind = [video for video in videos if bool(video.get("image_sha256")) == with_image]
        if with_image:
            kind = [video for video in kind if not isinstance(images[video["video_id"]], Exception)]
        if not kind:
            continue
        requests = [(video["prompt"], sampling_for(video, defaults)) for video in kind]
        chosen = [images[video["video_id"]] for video in kind] if with_image else None
        encoded += pipeline.encode_prompts(requests, store, chosen)
    return int(encoded)
