"""HunyuanVideo-I2V end to end on tiny random weights saved by diffusers: the prompt-and-image
encoding and the denoising loop against `HunyuanVideoImageToVideoPipeline(output_type="latent")`,
with our loaders reading diffusers' folder; frame 0 pinned to the image latent at every step."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKLHunyuanVideo,
    FlowMatchEulerDiscreteScheduler,
    HunyuanVideoImageToVideoPipeline,
    HunyuanVideoTransformer3DModel,
)
from PIL import Image

from hvbatch.config import SamplingConfig, load_config
from hvbatch.models.family import detect_family
from hvbatch.models.hunyuan_video.i2v_text_encoder import (
    IMAGE_EMB_START,
    VIDEO_I2V_TEMPLATE,
    HunyuanI2VTextEncoder,
    black_image,
    tiny_i2v_text_encoder,
)
from hvbatch.models.hunyuan_video.image_to_video import (
    condition_video,
    encode_first_frame,
    first_frame_pixels,
)
from hvbatch.pipeline import Pipeline
from tests.helpers import DIFFUSERS_SMALL, randomize_, rel_err

HEIGHT, WIDTH, FRAMES, STEPS = 64, 48, 9, 3
VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 16,
    "block_out_channels": (8, 16, 32, 32),
    "layers_per_block": 1,
    "norm_num_groups": 4,
}
PROMPT = "a red fox jumps over a log"
NEGATIVE = "blurry, static"


def _image(height: int = HEIGHT, width: int = WIDTH, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _randomize_vae_(vae: torch.nn.Module) -> None:
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if p.ndim > 1:
                p.copy_(torch.randn(p.shape, generator=gen) / p[0].numel() ** 0.5)
            else:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn(p.shape, generator=gen))


@pytest.fixture(scope="module")
def diffusers_pipe(tmp_path_factory: pytest.TempPathFactory) -> tuple[HunyuanVideoImageToVideoPipeline, Path]:
    encoder = tiny_i2v_text_encoder(64, 32, seed=3)
    transformer = HunyuanVideoTransformer3DModel(
        **{
            **DIFFUSERS_SMALL,
            "text_embed_dim": 64,
            "pooled_projection_dim": 32,
            "image_condition_type": "token_replace",
        }
    )
    randomize_(transformer, seed=11)
    vae = AutoencoderKLHunyuanVideo(**VAE).eval()
    _randomize_vae_(vae)
    vae.disable_tiling()
    pipe = HunyuanVideoImageToVideoPipeline(
        text_encoder=encoder.llm,
        tokenizer=encoder.llm_tokenizer,
        transformer=transformer.eval(),
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        text_encoder_2=encoder.clip,
        tokenizer_2=encoder.clip_tokenizer,
        image_processor=encoder.image_processor,
    )
    folder = tmp_path_factory.mktemp("i2v-diffusers")
    pipe.save_pretrained(folder)
    return pipe, folder


@pytest.fixture(scope="module")
def ours(diffusers_pipe: tuple[HunyuanVideoImageToVideoPipeline, Path]) -> Pipeline:
    overrides = ["model=tiny-i2v", "model.random_weights=false", f"model.path={diffusers_pipe[1]}"]
    return Pipeline.load(load_config(overrides=overrides))


def _template(encoder: HunyuanI2VTextEncoder) -> dict[str, Any]:
    n = encoder.num_image_tokens
    return {
        "template": VIDEO_I2V_TEMPLATE,
        "crop_start": encoder.crop_start(),
        "image_emb_start": IMAGE_EMB_START,
        "image_emb_end": IMAGE_EMB_START + n,
        "image_emb_len": n,
    }


def _sampling(**overrides: Any) -> SamplingConfig:
    base = dict(
        height=HEIGHT, width=WIDTH, num_frames=FRAMES, num_inference_steps=STEPS, seed=4, flow_shift=7.0
    )
    return SamplingConfig(**{**base, **overrides})  # type: ignore[arg-type]


def _valid(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return states[0, : int(mask.sum())]


def test_our_loaders_read_the_diffusers_folder(
    diffusers_pipe: tuple[HunyuanVideoImageToVideoPipeline, Path], ours: Pipeline
) -> None:
    assert isinstance(ours.text_encoder, HunyuanI2VTextEncoder)
    assert ours.transformer.config.token_replace and ours.transformer.checkpoint_format == "diffusers folder"
    assert ours.text_encoder.num_image_tokens == 16  # (56 / 14)^2
    folder = diffusers_pipe[1]
    family, words = detect_family(folder) or (None, "")
    assert family is ours.family and "image_condition_type=token_replace" in words
    model = load_config(
        overrides=["model=tiny-i2v", "model.random_weights=false", f"model.path={folder}"]
    ).model
    reports = {r.check: r for r in ours.family.check_weights(model)}
    assert {r.status for r in reports.values()} <= {"ok", "warn"} and reports[
        "image_processor"
    ].status == "ok"
    assert "LLaVA" in reports["text_encoder"].detail
    text_to_video = load_config(
        overrides=["model=tiny", "model.random_weights=false", f"model.path={folder}"]
    )
    with pytest.raises(ValueError, match=r"holds an image-to-video .* model=tiny is a text-to-video preset"):
        Pipeline.load(text_to_video)
    with pytest.raises(ValueError, match="needs an image"):
        ours.generate(PROMPT, _sampling())


@pytest.mark.parametrize("prompt", [PROMPT, "a long prompt " * 30])
def test_encoding_matches_diffusers(
    diffusers_pipe: tuple[HunyuanVideoImageToVideoPipeline, Path], ours: Pipeline, prompt: str
) -> None:
    """Prompt with the image (every 4th image token), and the black-image negative as the official
    code makes it (every 4th too; diffusers' own negative keeps every 2nd)."""
    pipe, encoder = diffusers_pipe[0], ours.text_encoder
    assert isinstance(encoder, HunyuanI2VTextEncoder)
    image = _image(80, 60, seed=1)
    encoded = encoder.encode_with_images([prompt], [image], FRAMES)
    cond = encoded.conditioning
    assert encoded.truncated == [len(prompt) > 200]
    embeds, pooled, mask = pipe.encode_prompt(
        image=image, prompt=prompt, prompt_template=_template(encoder), device="cpu", image_embed_interleave=4
    )
    assert cond.text_lens == (int(mask.sum()),) and torch.equal(
        mask[0, : cond.text_lens[0]], torch.ones(cond.text_lens[0])
    )
    assert rel_err(cond.text_states[0, : cond.text_lens[0]], _valid(embeds, mask)) <= 1e-6
    assert rel_err(cond.text_states_2, pooled) <= 1e-6
    black = black_image(image)
    negative = encoder.encode_with_images([NEGATIVE], [black], FRAMES, allow_blank=True).conditioning
    official, _, official_mask = pipe.encode_prompt(
        image=black,
        prompt=NEGATIVE,
        prompt_template=_template(encoder),
        device="cpu",
        image_embed_interleave=4,
    )
    assert rel_err(negative.text_states[0, : negative.text_lens[0]], _valid(official, official_mask)) <= 1e-6
    _, _, diffusers_mask = pipe.encode_prompt(
        image=black, prompt=NEGATIVE, prompt_template=_template(encoder)
    )
    assert int(diffusers_mask.sum()) == negative.text_lens[0] + 4  # 8 image tokens, not 4


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_denoising_loop_matches_diffusers(
    diffusers_pipe: tuple[HunyuanVideoImageToVideoPipeline, Path], ours: Pipeline, cfg_scale: float
) -> None:
    """Embedded guidance 6, stability start, flow shift 7; with true CFG both sides get the black-image
    negative of the official code. The image already has the video's size (diffusers resizes it to
    the size without the official centre crop)."""
    pipe, encoder = diffusers_pipe[0], ours.text_encoder
    assert isinstance(encoder, HunyuanI2VTextEncoder)
    image = _image()
    sampling = _sampling(cfg_scale=cfg_scale, negative_prompt=NEGATIVE)
    made = condition_video(ours, PROMPT, image, sampling)
    latents = ours.generate(PROMPT, sampling, conditioning=made, decode=False).latents  # type: ignore[arg-type]
    extra: dict[str, Any] = {}
    if cfg_scale > 1:
        negative = made.negative
        assert negative is not None
        extra = dict(
            negative_prompt_embeds=negative.text_states,
            negative_prompt_attention_mask=negative.text_mask,
            negative_pooled_prompt_embeds=negative.text_states_2,
        )
    expected = pipe(
        image=image,
        prompt=PROMPT,
        height=HEIGHT,
        width=WIDTH,
        num_frames=FRAMES,
        num_inference_steps=STEPS,
        guidance_scale=6.0,
        true_cfg_scale=cfg_scale,
        generator=torch.Generator().manual_seed(sampling.seed),
        output_type="latent",
        prompt_template=_template(encoder),
        **extra,
    ).frames
    assert latents.shape == expected.shape == (1, 16, 3, 8, 6)
    assert rel_err(latents, expected) <= 1e-4
    assert torch.equal(latents[:, :, :1], made.positive.first_frame_latent)


def test_frame_zero_is_the_image_latent_at_every_step(ours: Pipeline) -> None:
    image = _image(90, 70, seed=2)  # fitted: shorter side resized, centre-cropped to 64 x 48
    sampling = _sampling(cfg_scale=3.0, num_inference_steps=4)
    made = condition_video(ours, PROMPT, image, sampling)
    latent = made.positive.first_frame_latent
    assert latent is not None and latent.dtype == torch.float32
    assert torch.equal(latent, encode_first_frame(ours.vae, first_frame_pixels(image, HEIGHT, WIDTH)))
    seen: list[torch.Tensor] = []
    model = ours.transformer

    def recording(x: torch.Tensor, t: torch.Tensor, cond: Any, **kwargs: Any) -> torch.Tensor:
        seen.append(x.clone())
        return model(x, t, cond, **kwargs)

    recorder = type(
        "Recorder", (), {"compute_dtype": model.compute_dtype, "__call__": staticmethod(recording)}
    )()
    ours.transformer = recorder
    try:
        latents = ours.generate(PROMPT, sampling, conditioning=made, decode=False).latents  # type: ignore[arg-type]
    finally:
        ours.transformer = model
    assert len(seen) == 4 and all(x.shape[0] == 2 for x in seen)
    assert all(torch.equal(x[:, :, :1], latent.expand(2, -1, -1, -1, -1)) for x in seen)
    assert torch.equal(latents[:, :, :1], latent)
    assert not torch.equal(seen[0][:, :, 1:], seen[1][:, :, 1:])  # the other frames do move
    plain = dataclasses.replace(made.positive, stability=False)
    assert not torch.equal(plain.initial_latents(torch.ones(1, 16, 3, 8, 6))[:, :, 1:], seen[0][:1, :, 1:])


def test_the_official_folders_give_the_same_video(
    diffusers_pipe: tuple[HunyuanVideoImageToVideoPipeline, Path], ours: Pipeline, tmp_path: Path
) -> None:
    """`ckpts/hunyuan-video-i2v-720p/{transformers/mp_rank_00_model_states.pt, vae/}`,
    `ckpts/text_encoder_i2v/` (LLaVA, its tokenizer and image processor in one folder) and
    `ckpts/text_encoder_2/`: the same latents as the diffusers folder."""
    pipe = diffusers_pipe[0]
    model_dir = tmp_path / "hunyuan-video-i2v-720p"
    (model_dir / "transformers").mkdir(parents=True)
    torch.save(
        {"module": ours.transformer.state_dict()}, model_dir / "transformers" / "mp_rank_00_model_states.pt"
    )
    pipe.vae.save_pretrained(model_dir / "vae")
    for component, folder in ((pipe.text_encoder, "text_encoder_i2v"), (pipe.tokenizer, "text_encoder_i2v")):
        component.save_pretrained(tmp_path / folder)
    pipe.image_processor.save_pretrained(tmp_path / "text_encoder_i2v")
    pipe.text_encoder_2.save_pretrained(tmp_path / "text_encoder_2")
    pipe.tokenizer_2.save_pretrained(tmp_path / "text_encoder_2")
    overrides = ["model=tiny-i2v", "model.random_weights=false", f"model.path={tmp_path}"]
    with pytest.raises(ValueError, match="shape mismatches"):  # official files carry no architecture
        Pipeline.load(load_config(overrides=overrides))
    arch = ["model.transformer.num_heads=4", "model.transformer.num_refiner_blocks=2"]  # DIFFUSERS_SMALL's
    official = Pipeline.load(load_config(overrides=overrides + arch))
    assert official.transformer.checkpoint_format == "official .pt"
    assert "hunyuan-video-i2v-720p" in (detect_family(tmp_path) or (None, ""))[1]
    sampling, image = _sampling(), _image()
    video = official.generate(
        PROMPT, sampling, conditioning=condition_video(official, PROMPT, image, sampling)
    )
    reference = ours.generate(PROMPT, sampling, conditioning=condition_video(ours, PROMPT, image, sampling))
    assert torch.equal(video.latents, reference.latents) and video.frames is not None
