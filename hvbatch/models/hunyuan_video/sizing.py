"""HunyuanVideo-I2V's image sizing: its bucket list, bucket choice and first-frame resize.

Plain Python (no torch). Transcribed from Tencent-Hunyuan/HunyuanVideo-I2V `hyvideo/inference.py`
(`predict`, the i2v branch) and `hyvideo/utils/data_utils.py`:
- `--i2v-resolution` 720p / 540p / 360p -> bucket base size 960 / 720 / 480, buckets from
  `generate_crop_size_list(base, 32)` (stride 32, not 1.5's 16);
- the bucket is the closest ratio among those no more elongated than the image
  (`ClosestRule.TOWARD_SQUARE`: for a wide image only buckets with a strictly larger h/w);
- the image: `Resize(min(bucket))` (the shorter side, bilinear) then `CenterCrop(bucket)`, which
  would pad with black where the resized image falls short: never for the bucket this rule picks
  (never more elongated than the image), but for an explicit size of the other orientation (a
  9:16 image into 720x1280 gets black bars); then `ToTensor()` and `Normalize([0.5], [0.5])`.
Its sequence-parallel bucket filter (`ALLOW_RESIZE_FOR_SP`, a bucket whose latent side the rank
count divides) is not reproduced: hvbatch's sequence parallelism takes any size.
"""

from __future__ import annotations

from hvbatch.images import ClosestRule, ImageSizing, ResizeMode

RESOLUTION_BASE_SIZE = {"720p": 960, "540p": 720, "360p": 480}
BUCKET_STRIDE = 32
DEFAULT_RESOLUTION = "720p"

IMAGE_SIZING = ImageSizing(
    tuple(RESOLUTION_BASE_SIZE.items()),
    BUCKET_STRIDE,
    ClosestRule.TOWARD_SQUARE,
    ResizeMode.SHORT_SIDE_BILINEAR,
)
