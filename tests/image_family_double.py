"""A test double of an image-to-video family: the tiny 1.0 family, taking images.

Imported through `HVBATCH_FAMILY_MODULES=tests.image_family_double` (so the job's ranks see it
too), it replaces the registered 1.0 family by `make()`: the family with an `image_input` of
HunyuanVideo-1.5's
bucket rule and resize at a tiny base size (64 px, stride 16) and whose `condition` records the
image the pipeline received (`RECORD_VAR`: a folder; one PNG per video) and leaves the text
conditioning as it is: the videos are the tiny model's text-to-video ones, made at the image's size.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from hvbatch.images import ClosestRule, ImageSizing, InputImage, ResizeMode
from hvbatch.models.family import FAMILY_MODULES_VAR, ImageInput, ModelFamily, get_family, replace_family

MODULE = "tests.image_family_double"
NAME = "hunyuan-video-1.0"
RECORD_VAR = "HVBATCH_TEST_IMAGE_RECORD"
SIZING = ImageSizing((("tiny", 64),), 16, ClosestRule.NEAREST, ResizeMode.COVER_LANCZOS)
MIN_SIDE = 16


def record(pipeline: Any, conditioning: Any, image: InputImage, sampling: Any) -> Any:
    folder = os.environ.get(RECORD_VAR)
    if folder:
        name = f"{image.sha256}-{sampling.height}x{sampling.width}-{sampling.seed}.png"
        image.image.save(Path(folder) / name)
    return conditioning


IMAGE_INPUT = ImageInput(
    SIZING,
    resolution=lambda model: "tiny",
    min_side=MIN_SIDE,
    encoder_params=400_000_000,
    encoder_words="a test image encoder",
    image_tokens=729,
    condition_channels=33,
    encode_cost=1000.0,
    condition=record,
)


def make() -> ModelFamily:
    return dataclasses.replace(get_family(NAME), image_input=IMAGE_INPUT)


if MODULE in os.environ.get(FAMILY_MODULES_VAR, "").split(","):  # a job's rank (tests swap it in themselves)
    replace_family(make())
