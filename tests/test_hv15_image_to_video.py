"""HunyuanVideo-1.5 image-to-video pieces: the SigLIP image encoder (in memory and both checkpoint
layouts, strict) and the condition latents and mask, against transformers and diffusers."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from torch import nn

from hvbatch.images import model_pixels
from hvbatch.models.hunyuan_video_15 import variants
from hvbatch.models.hunyuan_video_15.conditioning import HunyuanVideo15Conditioning
from hvbatch.models.hunyuan_video_15.image_condition import (
    condition_from_latents,
    encode_first_frame,
    image_condition_latents,
)
from hvbatch.models.hunyuan_video_15.image_encoder import (
    IMAGE_EMBED_DIM,
    IMAGE_TOKENS,
    ImageEncoderPaths15,
    SiglipImageEncoder15,
    inspect_image_encoder_15,
    load_image_encoder_15,
    processor_class,
    siglip_processor,
    tiny_image_encoder_15,
)
from hvbatch.models.hunyuan_video_15.transformer import HunyuanVideo15Transformer
from tests.hv15_helpers import SMALL, randomize_fan_in_


def _image(height: int, width: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def tiny() -> SiglipImageEncoder15:
    return tiny_image_encoder_15(24, seed=3)


# -- SigLIP ----------------------------------------------------------------------------------------


def test_tiny_siglip_is_transformers_called_as_the_official_code(tiny: SiglipImageEncoder15) -> None:
    fitted = [_image(48, 80, seed=1), _image(48, 80, seed=2)]
    ours = tiny.encode(fitted)
    assert ours.shape == (2, tiny.num_tokens, 24) and tiny.num_tokens == (56 // 14) ** 2
    # Official: the Pillow SigLIP processor on a uint8 array, then `last_hidden_state`, one image a call.
    processor = transformers.SiglipImageProcessorPil(
        size={"height": 56, "width": 56}, resample=3, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    for i, image in enumerate(fitted):
        inputs = processor.preprocess(images=np.array(image), return_tensors="pt")
        official = tiny.model(**inputs).last_hidden_state
        torch.testing.assert_close(ours[i : i + 1], official, rtol=1e-5, atol=1e-6)
        assert torch.equal(tiny.encode([np.array(image)]), official)
    # diffusers' HunyuanVideo15ImageToVideoPipeline._get_image_embeds with the same model and processor.
    from diffusers import HunyuanVideo15ImageToVideoPipeline

    theirs = HunyuanVideo15ImageToVideoPipeline._get_image_embeds(
        tiny.model, tiny.processor, fitted[0], "cpu"
    )
    assert torch.equal(tiny.encode(fitted[:1]), theirs)
    assert torch.equal(tiny.encode(fitted[:1]), tiny.encode([np.array(fitted[0])]))  # PIL or uint8 array
    assert not torch.allclose(ours[0], ours[1])


def test_the_processor_is_pillow_based_with_the_redux_settings() -> None:
    processor = siglip_processor(384)
    assert type(processor).__name__ in ("SiglipImageProcessorPil", "SiglipImageProcessor")
    assert processor_class() is type(processor)
    settings = processor.to_dict()
    assert settings["size"] == {"height": 384, "width": 384} and settings["resample"] == 3
    assert list(settings["image_mean"]) == list(settings["image_std"]) == [0.5, 0.5, 0.5]
    assert settings["do_resize"] and settings["do_rescale"] and settings["do_normalize"]
    assert (IMAGE_TOKENS, IMAGE_EMBED_DIM) == ((384 // 14) ** 2, 1152)


def _write_layout(encoder: SiglipImageEncoder15, root: Path, layout: str, *, prefixed: bool = True) -> Path:
    """`image_encoder/` and `feature_extractor/` where each layout keeps them; `prefixed`: tensor
    names as transformers 4.x writes them (`vision_model.*`, the FLUX.1-Redux-dev file)."""
    from safetensors.torch import load_file, save_file

    base = root / "vision_encoder" / "siglip" if layout == "official" else root
    encoder.model.save_pretrained(base / "image_encoder")
    encoder.processor.save_pretrained(base / "feature_extractor")
    weights = base / "image_encoder" / "model.safetensors"
    state = {k.removeprefix("vision_model."): v for k, v in load_file(weights).items()}
    if prefixed:
        state = {"vision_model." + k: v for k, v in state.items()}
    save_file(state, weights, metadata={"format": "pt"})
    return root


@pytest.mark.parametrize(
    ("layout", "prefixed"), [("official", True), ("diffusers", True), ("diffusers", False)]
)
def test_both_layouts_load_strictly_and_give_the_same_tokens(
    tiny: SiglipImageEncoder15, tmp_path: Path, layout: str, prefixed: bool
) -> None:
    root = _write_layout(tiny, tmp_path / layout, layout, prefixed=prefixed)
    paths = ImageEncoderPaths15.find(root)
    assert paths.layout == layout
    loaded = load_image_encoder_15(root, dtype=torch.float32)
    images = [_image(40, 72, seed=5)]
    assert torch.equal(loaded.encode(images), tiny.encode(images))
    assert load_image_encoder_15(root).dtype == torch.float16  # the official precision by default
    model, shapes = inspect_image_encoder_15(root)
    assert next(model.parameters()).is_meta
    expected = {("vision_model." if prefixed else "") + k.removeprefix("vision_model."): v.shape
                for k, v in tiny.model.state_dict().items()}  # fmt: skip
    assert shapes == expected


def test_a_checkpoint_that_does_not_fit_is_refused_naming_the_tensors(
    tiny: SiglipImageEncoder15, tmp_path: Path
) -> None:
    from safetensors.torch import load_file, save_file

    root = _write_layout(tiny, tmp_path / "ckpts", "official")
    weights = root / "vision_encoder/siglip/image_encoder/model.safetensors"
    state = load_file(weights)
    dropped = "post_layernorm.weight"
    broken = {k: v for k, v in state.items() if k != "vision_model." + dropped}
    broken["vision_model.extra.weight"] = torch.zeros(2)
    broken["vision_model.embeddings.patch_embedding.bias"] = torch.zeros(5)
    save_file(broken, weights, metadata={"format": "pt"})
    for call in (load_image_encoder_15, inspect_image_encoder_15):
        with pytest.raises(ValueError) as caught:
            call(root)
        message = str(caught.value)
        assert dropped in message and "patch_embedding.bias (checkpoint (5,)" in message, call
        assert "extra.weight" in message, call
    save_file(state, weights, metadata={"format": "pt"})
    config = root / "vision_encoder/siglip/feature_extractor/preprocessor_config.json"
    raw = json.loads(config.read_text())
    config.write_text(json.dumps(raw | {"size": {"height": 384, "width": 384}}))
    with pytest.raises(ValueError, match="do not match"):
        load_image_encoder_15(root)
    config.unlink()
    with pytest.raises(ValueError, match=r"preprocessor_config\.json"):
        inspect_image_encoder_15(root)
    with pytest.raises(ValueError, match=r"FLUX\.1-Redux-dev"):
        ImageEncoderPaths15.find(tmp_path / "empty")


# -- the condition latents -----------------------------------------------------------------------


class _Posterior:
    def __init__(self, mean: torch.Tensor) -> None:
        self.mean = mean
        self.latent_dist = self  # diffusers' retrieve_latents reads encoder_output.latent_dist.mode()

    def mode(self) -> torch.Tensor:
        return self.mean


class StandInVae(nn.Module):
    """A VAE-like module: one frame in, C latent channels at 1/16 the size, a posterior with mode().

    `contiguous=True` makes its input contiguous first: diffusers hands the VAE a channels-last view
    of the same pixels (its HWC array permuted), the official code a contiguous CHW tensor, and a
    convolution picks another kernel for another memory layout (~1e-6 apart)."""

    def __init__(
        self, channels: int = 8, ratio: int = 16, scaling_factor: float = 1.03682, *, contiguous: bool = False
    ) -> None:
        super().__init__()
        self.contiguous = contiguous
        self.moments = nn.Conv3d(3, 2 * channels, (1, ratio, ratio), stride=(1, ratio, ratio))
        self.config = SimpleNamespace(scaling_factor=scaling_factor)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            nn.init.normal_(self.moments.weight)

    @property
    def dtype(self) -> torch.dtype:
        return self.moments.weight.dtype

    def encode(self, x: torch.Tensor) -> _Posterior:
        assert x.ndim == 5 and x.shape[2] == 1
        return _Posterior(self.moments(x.contiguous() if self.contiguous else x).chunk(2, dim=1)[0])


def _diffusers_cond(
    vae: StandInVae, image: Image.Image, latents: torch.Tensor, batch: int, dtype: torch.dtype
):
    from diffusers import HunyuanVideo15ImageToVideoPipeline
    from diffusers.pipelines.hunyuan_video1_5.image_processor import HunyuanVideo15ImageProcessor

    pipeline = SimpleNamespace(
        vae=vae,
        video_processor=HunyuanVideo15ImageProcessor(
            vae_scale_factor=16, do_resize=False, do_convert_rgb=True
        ),
        _get_image_latents=HunyuanVideo15ImageToVideoPipeline._get_image_latents,
    )
    return HunyuanVideo15ImageToVideoPipeline.prepare_cond_latents_and_mask(
        pipeline, latents, image, batch, image.height, image.width, dtype, torch.device("cpu")
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_condition_latents_and_mask_are_exactly_diffusers(dtype: torch.dtype) -> None:
    height, width = variants.bucket_for((1280, 720), "480p")
    image = variants.IMAGE_SIZING.fit(_image(720, 1280, seed=8), height, width)
    num_frames, batch = 5, 2
    latents = torch.zeros(batch, 8, num_frames, height // 16, width // 16, dtype=dtype)
    pixels = [model_pixels(image)] * batch
    vae = StandInVae(contiguous=True)
    cond, mask = _diffusers_cond(vae, image, latents, batch, dtype)
    ours = image_condition_latents(vae, pixels, num_frames, dtype=dtype)
    assert ours.shape == (batch, 9, num_frames, height // 16, width // 16) and ours.dtype == dtype
    assert torch.equal(ours, torch.cat([cond, mask], dim=1))
    # Fed its channels-last pixels, a layout-sensitive VAE rounds differently; we give the VAE the
    # official contiguous tensor.
    vae = StandInVae()
    cond, mask = _diffusers_cond(vae, image, latents, batch, torch.float32)
    ours = image_condition_latents(vae, pixels, num_frames)
    torch.testing.assert_close(ours, torch.cat([cond, mask], dim=1), rtol=1e-5, atol=1e-5)


def test_with_the_1_5_vae_the_condition_matches_diffusers_with_its_vae(tmp_path: Path) -> None:
    """hvbatch's HunyuanVideo-1.5 VAE and diffusers' AutoencoderKLHunyuanVideo15 on the same random
    weights: the condition latents agree to the VAE's encode parity, the mask exactly."""
    from diffusers import AutoencoderKLHunyuanVideo15

    from hvbatch.models.hunyuan_video_15.vae_config import HunyuanVideo15VaeConfig
    from hvbatch.models.hunyuan_video_15.vae_loading import load_vae

    config = HunyuanVideo15VaeConfig.tiny()
    kwargs = {k: v for k, v in config.to_diffusers_config().items() if not k.startswith("_")}
    reference = AutoencoderKLHunyuanVideo15(**kwargs).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in reference.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            scale = 0.2 if param.ndim <= 1 else 1 / param[0].numel() ** 0.5
            param.copy_(1.0 + 0.2 * noise if name.endswith("gamma") else scale * noise)
    reference.save_pretrained(tmp_path / "vae")
    ours_vae = load_vae(tmp_path / "vae")
    image = variants.IMAGE_SIZING.fit(_image(50, 70, seed=4), 32, 48)
    latents = torch.zeros(1, 32, 3, 2, 3)
    cond, mask = _diffusers_cond(reference, image, latents, 1, torch.float32)
    ours = image_condition_latents(ours_vae, [model_pixels(image)], 3)
    assert ours.shape == (1, 33, 3, 2, 3)
    assert torch.equal(ours[:, 32:], mask) and not ours[:, :32, 1:].any()
    relative = ((ours[:, :32] - cond).norm() / cond.norm()).item()
    assert relative <= 1e-4 and cond.abs().mean() > 0.01


def test_condition_latents_as_the_official_pipeline_builds_them() -> None:
    """Official `_prepare_cond_latents`: repeat the image latent over T, zero frames 1..; mask from
    `get_task_mask("i2v")` (1 on frame 0) merged over the frames."""
    vae = StandInVae(channels=4, ratio=8, scaling_factor=0.5)
    images = [_image(32, 48, seed=s) for s in (1, 2)]
    first = encode_first_frame(vae, torch.stack([torch.from_numpy(model_pixels(i)) for i in images]))
    num_frames = 3
    repeated = first.repeat(1, 1, num_frames, 1, 1)
    repeated[:, :, 1:] = 0.0
    task_mask = torch.zeros(num_frames)
    task_mask[0] = 1.0
    mask = task_mask[None, None, :, None, None].expand(2, 1, num_frames, 4, 6)
    official = torch.cat([repeated, mask], dim=1)
    ours = image_condition_latents(vae, [model_pixels(i) for i in images], num_frames)
    assert torch.equal(ours, official)
    assert torch.equal(ours[:, 4:], mask) and not ours[:, :4, 1:].any() and ours[:, :4, 0].abs().min() > 0
    # The product is taken in the VAE's dtype and the batch order is kept.
    raw = vae.moments(torch.from_numpy(model_pixels(images[1]))[None, :, None]).chunk(2, dim=1)[0]
    assert torch.equal(ours[1:2, :4, :1], raw * 0.5)
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        encode_first_frame(vae, torch.zeros(1, 4, 8, 8))
    with pytest.raises(ValueError, match="num_latent_frames"):
        condition_from_latents(first, 0)


def test_the_pieces_feed_the_1_5_transformer_as_its_conditioning(tiny: SiglipImageEncoder15) -> None:
    """SigLIP tokens as `image_embeds` and the condition as `cond_latents` run through the model;
    the output depends on the image."""
    model = randomize_fan_in_(HunyuanVideo15Transformer(SMALL), seed=0).eval()
    encoder = tiny_image_encoder_15(SMALL.image_embed_dim, seed=1)
    vae = StandInVae(channels=SMALL.out_channels)
    outputs = []
    for seed in (1, 2):
        fitted = variants.IMAGE_SIZING.fit(_image(60, 100, seed=seed), 32, 48)
        cond = HunyuanVideo15Conditioning(
            torch.randn(1, 5, SMALL.text_dim, generator=torch.Generator().manual_seed(0)),
            (5,),
            torch.zeros(1, 0, SMALL.glyph_dim),
            (0,),
            image_embeds=encoder.encode([fitted]),
            cond_latents=image_condition_latents(vae, [model_pixels(fitted)], 2),
        )
        x = torch.randn(1, SMALL.out_channels, 2, 2, 3, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            outputs.append(model(x, torch.tensor([500.0]), cond))
    assert outputs[0].shape == (1, SMALL.out_channels, 2, 2, 3)
    assert not torch.allclose(outputs[0], outputs[1])
