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
