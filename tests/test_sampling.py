"""Scheduler, guidance, latent shapes, noise, and the whole denoising loop against diffusers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline, HunyuanVideoTransformer3DModel

from hvbatch.config import SamplingConfig
from hvbatch.models.hunyuan_video import TextConditioning, embedded_guidance, load_transformer
from hvbatch.sampling import euler_step, flow_match_schedule, initial_noise, sample
from tests.helpers import DIFFUSERS_SMALL, GEOMETRY, latent_shape, randomize_, rel_err


def _diffusers_scheduler(num_steps: int, shift: float) -> FlowMatchEulerDiscreteScheduler:
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(sigmas=list(np.linspace(1.0, 0.0, num_steps + 1)[:-1]))
    return scheduler


@pytest.mark.parametrize(("num_steps", "shift"), [(50, 7.0), (4, 7.0), (30, 5.0), (10, 1.0)])
def test_schedule_matches_diffusers(num_steps: int, shift: float) -> None:
    ours = flow_match_schedule(num_steps, shift)
    theirs = _diffusers_scheduler(num_steps, shift)
    assert ours.num_steps == num_steps
    torch.testing.assert_close(ours.sigmas, theirs.sigmas.float(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours.timesteps, theirs.timesteps.float(), rtol=1e-6, atol=1e-4)
    assert ours.sigmas[0] == 1.0 and ours.sigmas[-1] == 0.0
    assert ours.timesteps[0] == 1000.0  # flow-reverse: the first step is pure noise


def test_euler_steps_match_diffusers() -> None:
    ours = flow_match_schedule(50, 7.0)
    theirs = _diffusers_scheduler(50, 7.0)
    g = torch.Generator().manual_seed(0)
    x_ours = x_theirs = torch.randn(1, 4, 2, 3, 3, generator=g)
    for i, t in enumerate(theirs.timesteps):
        v = torch.randn(x_ours.shape, generator=g)
        x_theirs = theirs.step(v, t, x_theirs, return_dict=False)[0]
        x_ours = euler_step(x_ours, v, ours.sigmas[i].item(), ours.sigmas[i + 1].item())
    assert rel_err(x_ours, x_theirs) < 1e-6


def test_embedded_guidance_rounds_like_the_references() -> None:
    assert embedded_guidance(6.0, 2, torch.bfloat16, "cpu").tolist() == [6016.0, 6016.0]
    assert embedded_guidance(6.0, 1, torch.float32, "cpu").item() == 6000.0


def test_latent_shape_and_its_errors() -> None:
    assert latent_shape(720, 1280, 129) == (16, 33, 90, 160)
    assert latent_shape(544, 960, 1) == (16, 1, 68, 120)
    with pytest.raises(ValueError, match=r"height=721 .*nearest valid: 720 or 736"):
        latent_shape(721, 1280, 129)
    with pytest.raises(ValueError, match=r"num_frames=128 .*nearest valid: 125 or 129") as info:
        latent_shape(720, 1000, 128)
    assert "width=1000" in str(info.value)  # every problem is named at once
    with pytest.raises(ValueError, match=r"width=8 .*nearest valid: 16"):
        latent_shape(16, 8, 1)


def test_initial_noise_is_a_function_of_the_seed() -> None:
    a = initial_noise((1, 16, 2, 4, 4), seed=42)
    torch.manual_seed(0)  # the global RNG must not matter
    b = initial_noise((1, 16, 2, 4, 4), seed=42)
    assert a.dtype == torch.float32 and torch.equal(a, b)
    assert not torch.equal(a, initial_noise((1, 16, 2, 4, 4), seed=43))


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, torch.nn.Module]:
    reference = randomize_(HunyuanVideoTransformer3DModel(**DIFFUSERS_SMALL), seed=11).eval()
    folder: Path = tmp_path_factory.mktemp("pipeline") / "transformer"
    reference.save_pretrained(folder)
    return reference, load_transformer(folder, dtype=torch.float32)


def _conditioning(seed: int, text_len: int) -> TextConditioning:
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(1, 16, dtype=torch.long)
    mask[0, :text_len] = 1
    return TextConditioning.from_mask(
        torch.randn(1, 16, 32, generator=g), mask, torch.randn(1, 24, generator=g)
    )


@pytest.mark.parametrize("cfg_scale", [1.0, 3.5])
def test_denoising_loop_matches_diffusers_pipeline(
    models: tuple[torch.nn.Module, torch.nn.Module], cfg_scale: float
) -> None:
    reference, ours = models
    sampling = SamplingConfig(
        height=32, width=48, num_frames=5, num_inference_steps=4, seed=5, cfg_scale=cfg_scale
    )
    cond, negative = _conditioning(1, 9), _conditioning(2, 4)
    noise = initial_noise((1, *latent_shape(32, 48, 5)), seed=5)
    pipe = HunyuanVideoPipeline(
        text_encoder=None,
        tokenizer=None,
        transformer=reference,
        vae=None,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=sampling.flow_shift),
        text_encoder_2=None,
        tokenizer_2=None,
    )
    negative_kwargs = {}
    if cfg_scale > 1:
        negative_kwargs = dict(
            negative_prompt_embeds=negative.text_states,
            negative_pooled_prompt_embeds=negative.text_states_2,
            negative_prompt_attention_mask=negative.text_mask,
        )
    with torch.no_grad():
        expected = pipe(
            prompt_embeds=cond.text_states,
            pooled_prompt_embeds=cond.text_states_2,
            prompt_attention_mask=cond.text_mask,
            height=32,
            width=48,
            num_frames=5,
            num_inference_steps=4,
            guidance_scale=sampling.guidance_scale,
            true_cfg_scale=cfg_scale,
            latents=noise.clone(),
            output_type="latent",
            return_dict=False,
            **negative_kwargs,
        )[0]
        got = sample(ours, cond, sampling, geometry=GEOMETRY, negative=negative if cfg_scale > 1 else None)
    assert got.shape == expected.shape == noise.shape
    assert rel_err(got, expected) <= 1e-4
    assert rel_err(got, noise) > 0.1  # the loop really ran


def test_cfg_without_negative_is_refused(models: tuple[torch.nn.Module, torch.nn.Module]) -> None:
    sampling = SamplingConfig(height=16, width=16, num_frames=1, num_inference_steps=1, cfg_scale=2.0)
    with pytest.raises(ValueError, match="negative"):
        sample(models[1], _conditioning(0, 3), sampling, geometry=GEOMETRY)


def test_every_step_gets_the_next_timestep(models: tuple[torch.nn.Module, torch.nn.Module]) -> None:
    """`t_next_B` is the next step's timestep, 0 at the last step (1.5's MeanFlow reads it)."""
    ours = models[1]
    seen: list[tuple[list[float], list[float]]] = []

    class Recording:
        compute_dtype = ours.compute_dtype

        def __call__(self, x, t_B, cond, *, t_next_B=None, **kwargs):  # type: ignore[no-untyped-def]
            seen.append((t_B.tolist(), t_next_B.tolist()))
            return ours(x, t_B, cond, t_next_B=t_next_B, **kwargs)

    sampling = SamplingConfig(height=16, width=16, num_frames=1, num_inference_steps=3, cfg_scale=2.0)
    sample(Recording(), _conditioning(0, 3), sampling, geometry=GEOMETRY, negative=_conditioning(1, 5))
    timesteps = flow_match_schedule(3, sampling.flow_shift).timesteps.tolist()
    assert seen == [([t, t], [n, n]) for t, n in zip(timesteps, [*timesteps[1:], 0.0], strict=True)]
