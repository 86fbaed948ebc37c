"""The HunyuanVideo-1.5 super-resolution stage against the official SR pipeline's math
(`tests/hv15_sr_official.py`, written out from the official code): the noise, the resize and
upsampler, the noising, the condition and its drop, and the denoising loop step by step."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from hvbatch.models.hunyuan_video_15.conditioning import HunyuanVideo15Conditioning
from hvbatch.models.hunyuan_video_15.config import HunyuanVideo15TransformerConfig
from hvbatch.models.hunyuan_video_15.sampling import initial_noise
from hvbatch.models.hunyuan_video_15.super_resolution import (
    denoise_super_resolution,
    prepare_super_resolution,
    sr_latent_grid,
    sr_noise,
    upsample_low_res_latents,
)
from hvbatch.models.hunyuan_video_15.transformer import HunyuanVideo15Transformer
from hvbatch.models.hunyuan_video_15.transformer_loading import random_transformer
from hvbatch.models.hunyuan_video_15.upsampler import (
    SRTo720pUpsamplerConfig,
    SRTo1080pUpsamplerConfig,
    Upsampler,
)
from hvbatch.models.hunyuan_video_15.upsampler_loading import random_upsampler
from hvbatch.models.hunyuan_video_15.variants import SRVariant15, sr_target_size, sr_variant
from tests import hv15_sr_official as official
from tests.helpers import rel_err
from tests.test_compile import sync_calls  # noqa: F401 (the fixture)

BASE_SHAPE = (1, 32, 3, 3, 4)
GRID_HW = (5, 6)
UPSAMPLERS = {"720p": SRTo720pUpsamplerConfig.tiny(), "1080p": SRTo1080pUpsamplerConfig.tiny()}


def _base_latents(seed: int = 0) -> torch.Tensor:
    return torch.randn(BASE_SHAPE, generator=torch.Generator().manual_seed(seed))


def _official_upsampler(kind: str, model: Upsampler):
    state, config = model.state_dict(), model.config
    if kind == "720p":
        return lambda x: official.upsampler_720p(state, x, global_residual=config.global_residual)
    return lambda x: official.upsampler_1080p(
        state, x, list(config.block_out_channels), config.num_res_blocks
    )


def _text(config: HunyuanVideo15TransformerConfig, seed: int = 3) -> HunyuanVideo15Conditioning:
    g = torch.Generator().manual_seed(seed)
    return HunyuanVideo15Conditioning(
        torch.randn(1, 7, config.text_dim, generator=g),
        (7,),
        torch.randn(1, 3, config.glyph_dim, generator=g),
        (2,),
    )


def test_sr_noise_is_the_official_start_then_a_second_draw() -> None:
    shape = (1, 32, 2, 3, 4)
    noise, lq_noise = sr_noise(shape, 42)
    generator = torch.Generator(device="cpu").manual_seed(42)  # prepare_latents with the SR generator
    assert torch.equal(noise, torch.randn(shape, generator=generator, device="cpu", dtype=torch.bfloat16))
    assert torch.equal(noise, initial_noise(shape, 42))
    assert torch.equal(lq_noise, torch.randn(shape, generator=generator, dtype=torch.bfloat16))
    assert not torch.equal(lq_noise, noise) and torch.equal(sr_noise(shape, 42)[1], lq_noise)


@pytest.mark.parametrize("kind", ["720p", "1080p"])
def test_upsampled_latents_match_the_official_resize_and_upsampler(kind: str) -> None:
    """Per-frame bilinear resize to the SR grid, then the upsampler in float32 (before the bf16 cast)."""
    upsampler = random_upsampler(UPSAMPLERS[kind], seed=1)
    base = _base_latents()
    ours = upsample_low_res_latents(base, GRID_HW, upsampler, dtype=torch.float32)
    latents = torch.zeros(1, 32, 3, *GRID_HW)  # the official resize reads the target from the latents
    reference = official.resize_and_upsample(base, latents, _official_upsampler(kind, upsampler))
    assert rel_err(ours, reference) <= 1e-5
    resized_only = official.resize_and_upsample(base, latents, lambda x: x)
    assert rel_err(ours, resized_only) > 0.05  # the upsampler matters


@pytest.mark.parametrize(("kind", "image"), [("720p", False), ("1080p", False), ("720p", True)])
def test_sr_inputs_match_the_official_pipeline(kind: str, image: bool) -> None:
    """Given the same upsampler output, the noising, the condition (text- and image-to-video), its drop,
    the schedule and the drop step are the official ones exactly."""
    sr, upsampler = sr_variant(kind), random_upsampler(UPSAMPLERS[kind], seed=2)
    image_latents = torch.randn(1, 32, 1, *GRID_HW) if image else None
    base = _base_latents(1)
    inputs = prepare_super_resolution(
        base, upsampler, sr, 7, grid_hw=GRID_HW, image_latents_BC1HW=image_latents
    )
    noise, lq_noise = sr_noise((1, 32, 3, *GRID_HW), 7)
    condition, zero_lq = official.sr_condition(base, lq_noise, noise, upsampler, image_cond=image_latents)
    assert torch.equal(inputs.noise, noise)
    assert inputs.condition.dtype == condition.dtype == torch.float32
    assert torch.equal(inputs.condition, condition) and torch.equal(inputs.dropped_condition, zero_lq)
    assert torch.equal(inputs.dropped_condition[:, :33], condition[:, :33])  # the image part is kept
    assert inputs.dropped_condition[:, 33:].abs().sum() == 0 and condition[:, 65].min() == 1
    sigmas, timesteps = official.schedule(sr.default_steps, sr.flow_shift)
    assert torch.equal(inputs.sigmas, sigmas) and torch.equal(inputs.timesteps, timesteps)
    drop = next(i for i, t in enumerate(timesteps) if t < 1000 * 0.7)
    assert inputs.drop_step == drop == {"720p": 3, "1080p": 4}[kind]  # 666.7 and 666.7 are the first below
    assert inputs.must_compute_steps == {0, drop, sr.default_steps - 1}


class _Recorder:
    """The transformer, recording what each step gives it."""

    def __init__(self, model: HunyuanVideo15Transformer, syncs: list[str] | None = None) -> None:
        self.model, self.calls, self.syncs, self.syncs_at_first_step = model, [], syncs, None

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.model.compute_dtype

    def __call__(self, x, t, cond, *, t_next_B=None, step_cache=None) -> torch.Tensor:
        if self.syncs is not None and self.syncs_at_first_step is None:
            self.syncs_at_first_step = len(self.syncs)
        self.calls.append((x, t, cond.cond_latents, t_next_B))
        return self.model(x, t, cond, t_next_B=t_next_B, step_cache=step_cache)


@pytest.mark.parametrize(
    ("kind", "steps"),
    [("720p", 2), ("1080p", 8)],  # a 2-step loop, and the 1080p model's own 8 steps
)
def test_sr_loop_gives_each_step_the_official_inputs(kind: str, steps: int) -> None:
    config = HunyuanVideo15TransformerConfig.tiny(super_resolution=True, use_meanflow=True)
    model = random_transformer(config, seed=0)
    sr: SRVariant15 = replace(sr_variant(kind), default_steps=steps)
    upsampler = random_upsampler(UPSAMPLERS[kind], seed=4)
    base, text = _base_latents(2), _text(config)
    inputs = prepare_super_resolution(base, upsampler, sr, 5, grid_hw=GRID_HW)
    recorder = _Recorder(model)
    with torch.no_grad():
        ours = denoise_super_resolution(recorder, inputs, text)

        def official_transformer(latent_model_input, t_expand, timesteps_r):
            x, condition = latent_model_input[:, :32].contiguous(), latent_model_input[:, 32:]
            return model(x, t_expand, replace(text, cond_latents=condition), t_next_B=timesteps_r)

        noise, lq_noise = sr_noise(tuple(inputs.noise.shape), 5)
        condition, zero_lq = official.sr_condition(base, lq_noise, noise, upsampler)
        reference, seen = official.sr_loop(
            noise, condition, zero_lq, official_transformer, steps, use_meanflow=True
        )
        first_input = seen[0][0]
        cond = replace(text, cond_latents=first_input[:, 32:])  # the model concatenates in the official order
        embedded = model.embed_image(first_input[:, :32], cond)
        assert torch.equal(embedded, model.img_in(first_input))
    assert len(recorder.calls) == len(seen) == steps
    for i, ((x, t, cond_latents, t_next), (latent_input, t_expand, timesteps_r)) in enumerate(
        zip(recorder.calls, seen, strict=True)
    ):
        ours_input = torch.cat([x, cond_latents], dim=1)
        assert torch.equal(t, t_expand) and torch.equal(t_next, timesteps_r), i
        assert torch.equal(cond_latents, latent_input[:, 32:]), i  # condition, dropped from the drop step
        if i == 0:  # the starting noise and the condition, exactly
            assert torch.equal(ours_input, latent_input)
        else:
            assert rel_err(ours_input, latent_input) <= 1e-5, i
    assert (
        sum(torch.equal(c, inputs.dropped_condition) for _, _, c, _ in recorder.calls)
        == steps - inputs.drop_step
    )
    assert 0 < inputs.drop_step < steps
    assert rel_err(ours, reference) <= 1e-5
    with torch.no_grad():
        never_dropped = denoise_super_resolution(model, replace(inputs, drop_step=steps), text)
    assert rel_err(never_dropped, ours) > 1e-3  # the drop matters


def test_sr_steps_never_wait_for_the_device(sync_calls: list[str]) -> None:  # noqa: F811 (the fixture)
    config = HunyuanVideo15TransformerConfig.tiny(super_resolution=True)
    model = random_transformer(config, seed=0)
    sr = replace(sr_variant("720p"), default_steps=3)
    upsampler = random_upsampler(UPSAMPLERS["720p"])
    inputs = prepare_super_resolution(_base_latents(), upsampler, sr, 1, grid_hw=(2, 3))
    recorder = _Recorder(model, sync_calls)
    with torch.no_grad():
        denoise_super_resolution(recorder, inputs, _text(config))
    assert len(recorder.calls) == 3 and sync_calls[recorder.syncs_at_first_step :] == []


def test_official_size_path_uses_the_bucket_map() -> None:
    """Without `grid_hw` the SR grid is the official bucket of the base size (one latent frame)."""
    sr = sr_variant("720p")
    base = torch.randn(1, 32, 1, 20, 80)  # 320 x 1280, a 480p bucket
    assert sr_latent_grid(base.shape, sr) == (1, *(s // 16 for s in sr_target_size(320, 1280, sr)))
    upsampler = random_upsampler(SRTo720pUpsamplerConfig(hidden_channels=4, num_blocks=1))
    inputs = prepare_super_resolution(base, upsampler, sr, 0)
    assert tuple(inputs.condition.shape) == (1, 66, *sr_latent_grid(base.shape, sr))
    with pytest.raises(ValueError, match="runs 6 steps, not 4"):
        prepare_super_resolution(base, upsampler, sr, 0, num_steps=4)
    with pytest.raises(ValueError, match="is not one"):
        prepare_super_resolution(torch.randn(1, 32, 1, 21, 80), upsampler, sr, 0)
