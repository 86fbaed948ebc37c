"""HunyuanVideo-I2V's conditioning of one video: a prompt and an RGB image in, the model's inputs out.

`image_to_video_conditioning(encoder, vae, prompt, image, sampling)` is what a pipeline calls per
video (or `condition_video(pipeline, prompt, image, sampling)`, the same with a pipeline's
components). As the official `predict` + pipeline build them:
- the first frame: the image resized and centre-cropped to the video's size (`sizing.IMAGE_SIZING`:
  shorter side bilinear, torchvision's centre crop), in [-1, 1], VAE-encoded as a one-frame video,
  `mode()` times the scaling factor (taken in the VAE's dtype), float32: latent frame 0 is pinned to it;
- the prompt's LLaVA states see the image as given (its processor resizes it to 336 x 336);
- with true CFG (`sampling.cfg_scale > 1`) the unconditional branch is the negative prompt with a
  black image, and the same first-frame latent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from hvbatch.images import model_pixels
from hvbatch.models.hunyuan_video.conditioning import TextConditioning
from hvbatch.models.hunyuan_video.i2v_text_encoder import (
    HunyuanI2VTextEncoder,
    black_image,
    rgb_image,
    with_image_latent,
)
from hvbatch.models.hunyuan_video.sizing import IMAGE_SIZING


@dataclass(frozen=True)
class ImageToVideoConditioning:
    """One video's conditioning: the prompt with the image, the negative with a black image (true
    CFG only), both pinning frame 0 to the image latent."""

    positive: TextConditioning
    negative: TextConditioning | None
    truncated: bool


def first_frame_pixels(image: Any, height: int, width: int) -> torch.Tensor:
    """`[1, 3, height, width]` float32 in [-1, 1]: the image fitted as the official code fits it."""
    fitted = IMAGE_SIZING.fit(rgb_image(image), height, width)
    return torch.from_numpy(model_pixels(fitted))[None]


@torch.no_grad()
def encode_first_frame(vae: Any, pixels_B3HW: torch.Tensor) -> torch.Tensor:
    """`[B, C, 1, H/8, W/8]` float32: each image as a one-frame video, `mode()` x scaling factor."""
    device = next(vae.parameters()).device
    x_BCTHW = pixels_B3HW[:, :, None].to(device=device, dtype=vae.dtype)
    factor = vae.config.scaling_factor
    return torch.cat(
        [(vae.encode(x_BCTHW[i : i + 1]).mode() * factor).float() for i in range(x_BCTHW.shape[0])]
    )


def image_to_video_conditioning(
    encoder: HunyuanI2VTextEncoder,
    vae: Any,
    prompt: str,
    image: Any,
    sampling: Any,
    *,
    negative_prompt: str | None = None,
) -> ImageToVideoConditioning:
    """The video's conditioning (on the CPU) for `prompt` and `image` (PIL or uint8 `[H, W, 3]`) at
    `sampling`'s size; `negative_prompt` (default `sampling.negative_prompt` or " ") with true CFG."""
    image = rgb_image(image)
    latent = encode_first_frame(vae, first_frame_pixels(image, sampling.height, sampling.width)).cpu()
    stability = encoder.settings.i2v_stability
    encoded = encoder.encode_with_images([prompt], [image], sampling.num_frames)
    positive = with_image_latent(encoded.conditioning.to("cpu"), latent, stability)
    negative = None
    if sampling.cfg_scale > 1.0:
        text = negative_prompt if negative_prompt is not None else (sampling.negative_prompt or " ")
        blank = encoder.encode_with_images(
            [text], [black_image(image)], sampling.num_frames, allow_blank=True
        )
        negative = with_image_latent(blank.conditioning.to("cpu"), latent, stability)
    return ImageToVideoConditioning(positive, negative, encoded.truncated[0])


def condition_video(pipeline: Any, prompt: str, image: Any, sampling: Any) -> ImageToVideoConditioning:
    """The video's conditioning made by a pipeline's components (its I2V encoder, brought to its
    device for the call and released after as `model.text_encoder_offload` says, and its VAE). It has
    the fields of the pipeline's own video conditioning: `pipeline.generate(prompt, sampling,
    conditioning=...)` samples with it."""
    encoder = pipeline.text_encoder
    if not isinstance(encoder, HunyuanI2VTextEncoder):
        raise ValueError(f"model={pipeline.config.model.name} is a text-to-video preset and takes no image")
    encoder.to(pipeline.device)
    try:
        return image_to_video_conditioning(encoder, pipeline.vae, prompt, image, sampling)
    finally:
        pipeline.release_text_encoders()
