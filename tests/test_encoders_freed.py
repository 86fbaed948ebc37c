"""Encoders out of the way: prompts encoded once per window, text encoders off the GPU meanwhile,
and the planner's memory model counting them only while they encode."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch

from hvbatch.config import load_config
from hvbatch.models.encoding import PromptStore
from hvbatch.models.hunyuan_video.text_encoders import conditioning_key
from hvbatch.parallel.memory import estimate_memory
from hvbatch.parallel.plan import plan_for_config
from hvbatch.pipeline import Pipeline
from tests.helpers import model_size, released_components


@pytest.fixture(scope="module")
def pipeline() -> Pipeline:
    config = load_config(
        overrides=[
            *("model=tiny", "device=cpu", "sampling.height=16", "sampling.width=16"),
            *("sampling.num_frames=5", "sampling.num_inference_steps=2"),
        ]
    )
    return Pipeline.load(config)


def _count_encodes(pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    calls: list[tuple[str, int]] = []
    encode = pipeline.encode

    def counting(prompts: list[str], num_frames: int, **kwargs: Any) -> Any:
        calls.extend((p, num_frames) for p in prompts)
        return encode(prompts, num_frames, **kwargs)

    monkeypatch.setattr(pipeline, "encode", counting)
    return calls


def test_each_distinct_prompt_is_encoded_once(pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _count_encodes(pipeline, monkeypatch)
    video = pipeline.config.sampling
    cfg = dataclasses.replace(video, cfg_scale=2.0, negative_prompt="")
    image = dataclasses.replace(video, num_frames=1)
    store = PromptStore()
    # `fox` twice (num_videos), once more with true CFG (adds the negative prompt " "), once as an image.
    requests = [("a fox", video), ("a fox", video), ("a fox", cfg), ("a city", cfg), ("a fox", image)]
    assert pipeline.encode_prompts(requests, store) == 4
    assert calls == [("a fox", 2), (" ", 2), ("a city", 2), ("a fox", 1)]  # 2: any video
    assert pipeline.encode_prompts(requests, store) == 0  # kept: nothing encoded again
    assert len(calls) == 4
    stored = store.get(conditioning_key("a fox", 5))
    assert stored is not None and stored.conditioning.text_states.device.type == "cpu"
    # A prompt that cannot be encoded fails its video (raised on use), not the window.
    assert pipeline.encode_prompts([("   ", video), ("a kite", video)], store) == 2
    with pytest.raises(ValueError, match="empty prompt"):
        pipeline.conditioning("   ", video, store)
    assert store.get(conditioning_key("a kite", 5)) is not None


def test_precomputed_conditioning_gives_the_same_video(pipeline: Pipeline) -> None:
    sampling = dataclasses.replace(pipeline.config.sampling, cfg_scale=2.0, negative_prompt="blurry")
    alone = pipeline.generate("a red kite", sampling, decode=False)
    store = PromptStore()
    pipeline.encode_prompts([("a red kite", sampling)], store)
    windowed = pipeline.generate(
        "a red kite",
        sampling,
        decode=False,
        conditioning=pipeline.conditioning("a red kite", sampling, store),
    )
    assert torch.equal(alone.latents, windowed.latents)
    assert windowed.truncated == alone.truncated


@pytest.mark.parametrize(("offload", "moves"), [("cpu", ["cuda:0", "cpu"]), ("keep", ["cuda:0"])])
def test_text_encoders_visit_the_gpu_only_to_encode(
    pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch, offload: str, moves: list[str]
) -> None:
    # The moves are recorded, not made: this machine has no GPU.
    seen: list[str] = []
    monkeypatch.setattr(pipeline.text_encoder, "to", lambda device: seen.append(str(device)))
    monkeypatch.setattr(pipeline, "device", torch.device("cuda", 0))
    model = dataclasses.replace(pipeline.config.model, text_encoder_offload=offload)
    monkeypatch.setattr(pipeline, "config", dataclasses.replace(pipeline.config, model=model))
    store = PromptStore()
    pipeline.encode_prompts([("a boat", pipeline.config.sampling)], store)
    assert seen == moves
    pipeline.encode_prompts([("a boat", pipeline.config.sampling)], store)
    assert seen == moves  # nothing to encode: the encoders stay where they are


def _plan_720p_cfg(offload: str) -> Any:
    config = load_config(
        overrides=[
            "sampling.cfg_scale=6",
            "parallel.gpus_per_node=1",
            f"model.text_encoder_offload={offload}",
        ]
    )
    return plan_for_config(config)


def test_true_cfg_at_720p_fits_one_80gb_gpu_once_the_encoders_leave_it() -> None:
    plan = _plan_720p_cfg("cpu")
    assert (plan.dp, plan.ulysses, plan.ring, plan.world_size) == (1, 1, 1, 1)
    assert plan.memory.text_encoders_gib == 0.0  # denoising needs more than the encoders' 14.2 GiB
    assert plan.memory.total_gib == pytest.approx(74.8, abs=0.05)
    with pytest.raises(ValueError, match=r"sp=1\) the estimate is 90\.5 GiB"):
        _plan_720p_cfg("keep")


def test_offloaded_encoders_count_where_they_exceed_the_denoising_memory() -> None:
    model = model_size(load_config().model.transformer)
    small = dict(image_tokens=256, components=released_components(offloaded=True))
    resident = estimate_memory(model, image_tokens=256, components=released_components())
    offloaded = estimate_memory(model, **small)  # type: ignore[arg-type]
    working = offloaded.activations_gib + offloaded.vae_decode_gib
    assert offloaded.text_encoders_gib == pytest.approx(resident.text_encoders_gib - working)
    # The peak is then the encoding phase: weights + encoders, as if they were resident and the rest idle.
    assert offloaded.total_gib == pytest.approx(resident.total_gib - 1.1 * working)
