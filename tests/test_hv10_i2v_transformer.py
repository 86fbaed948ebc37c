"""HunyuanVideo-I2V's token_replace transformer against diffusers' on the same random weights, in
both checkpoint layouts; which image tokens are first-frame ones is per forward, never a mask."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from diffusers import HunyuanVideoTransformer3DModel

from hvbatch.models.hunyuan_video import load_transformer
from hvbatch.models.hunyuan_video.convert import config_from_diffusers
from tests.helpers import DIFFUSERS_SMALL, cond_of, make_inputs, randomize_, rel_err

TOKEN_REPLACE = {**DIFFUSERS_SMALL, "image_condition_type": "token_replace"}


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    reference = randomize_(HunyuanVideoTransformer3DModel(**TOKEN_REPLACE), seed=7).eval()
    folder = tmp_path_factory.mktemp("i2v") / "transformer"
    reference.save_pretrained(folder)
    return folder, reference


def _reference(reference: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return reference(
            hidden_states=inputs["x"],
            timestep=inputs["t"],
            encoder_hidden_states=inputs["text_states"],
            encoder_attention_mask=inputs["text_mask"],
            pooled_projections=inputs["text_states_2"],
            guidance=inputs["guidance"],
            return_dict=False,
        )[0]


@pytest.mark.parametrize(
    ("batch", "frames", "height", "width", "text_lens"),
    [(1, 3, 6, 10, [11]), (2, 2, 4, 6, [5, 16]), (1, 1, 4, 4, [7])],
)
def test_token_replace_forward_matches_diffusers(
    saved: tuple[Path, torch.nn.Module],
    batch: int,
    frames: int,
    height: int,
    width: int,
    text_lens: list[int],
) -> None:
    folder, reference = saved
    model = load_transformer(folder, dtype=torch.float32)
    assert model.config.image_condition_type == "token_replace" and model.config.in_channels == 16
    inputs = make_inputs(
        model.config, batch=batch, frames=frames, height=height, width=width, text_lens=text_lens
    )
    with torch.no_grad():
        ours = model(inputs["x"], inputs["t"], cond_of(inputs))
    expected = _reference(reference, inputs)
    assert rel_err(ours, expected) <= 1e-5
    # The first-frame modulation matters: the same weights read as text-to-video give another output.
    plain = load_transformer(folder, dtype=torch.float32)
    plain.config = dataclasses.replace(plain.config, image_condition_type=None)
    with torch.no_grad():
        assert rel_err(plain(inputs["x"], inputs["t"], cond_of(inputs)), expected) > 1e-3


def test_the_official_layout_loads_the_same_weights(
    saved: tuple[Path, torch.nn.Module], tmp_path: Path
) -> None:
    """An official `mp_rank_00_model_states.pt` (official names, `module`) of the I2V architecture:
    the same keys as text-to-video, loaded strictly with weights_only."""
    folder, reference = saved
    from_diffusers = load_transformer(folder, dtype=torch.float32)
    official = tmp_path / "hunyuan-video-i2v-720p" / "transformers" / "mp_rank_00_model_states.pt"
    official.parent.mkdir(parents=True)
    torch.save({"module": from_diffusers.state_dict()}, official)
    model = load_transformer(official, dtype=torch.float32, config=from_diffusers.config)
    assert model.checkpoint_format == "official .pt" and model.config.token_replace
    inputs = make_inputs(model.config, batch=1, frames=2, height=4, width=4, text_lens=[9], seed=2)
    with torch.no_grad():
        assert (
            rel_err(model(inputs["x"], inputs["t"], cond_of(inputs)), _reference(reference, inputs)) <= 1e-5
        )
    state = from_diffusers.state_dict()
    state.pop("img_in.proj.bias")
    torch.save({"module": state}, official)
    with pytest.raises(ValueError, match=r"img_in\.proj\.bias"):
        load_transformer(official, dtype=torch.float32, config=from_diffusers.config)


def test_a_shard_modulates_only_the_first_frame_tokens_it_holds(saved: tuple[Path, torch.nn.Module]) -> None:
    """A range of the image tokens holds the first-frame tokens that fall in it (the runners' shards;
    N-rank sampling is in test_hv10_i2v_parallel.py); forward_tokens without a range is refused."""
    model = load_transformer(saved[0], dtype=torch.float32)
    inputs = make_inputs(model.config, batch=1, frames=3, height=6, width=10, text_lens=[16])
    cond = cond_of(inputs)
    grid = model.token_grid(inputs["x"].shape)
    assert grid == (3, 3, 5)  # 15 first-frame tokens of 45
    for start, stop, expected in [(0, 23, 15), (23, 45, 0), (10, 30, 5), (0, 10, 10)]:
        assert cond.for_image_tokens(grid, start, stop).first_frame_tokens == expected
    with pytest.raises(ValueError, match="frame 0"):
        img = model.embed_image(inputs["x"], cond)
        model.forward_tokens(img, model.rope(grid, "cpu"), inputs["t"], cond)


def test_diffusers_configs_of_other_image_conditions_are_refused() -> None:
    raw = {
        "_class_name": "HunyuanVideoTransformer3DModel",
        "image_condition_type": "latent_concat",
        "in_channels": 33,
    }
    with pytest.raises(ValueError, match="latent_concat"):
        config_from_diffusers(raw, "config.json")
    assert (
        config_from_diffusers({"image_condition_type": "token_replace"}, "c").image_condition_type
        == "token_replace"
    )


def test_the_i2v_presets_are_flavors_of_the_1_0_family() -> None:
    from hvbatch.config import load_config
    from hvbatch.models.family import family_of

    released = load_config(overrides=["model=hunyuan-video-i2v-720p"])
    family = family_of(released.model)
    assert family.name == "hunyuan-video-1.0" and released.model.transformer.token_replace
    assert (released.sampling.flow_shift, released.sampling.guidance_scale, released.sampling.cfg_scale) == (
        7,
        6,
        1,
    )
    figures = family.memory(released.model)
    assert figures.text_tokens == 576 // 4 + 256 - 4  # LLaVA's kept image tokens, then the prompt's
    text_to_video = load_config().model
    assert figures.encoder_params > family.memory(text_to_video).encoder_params  # the vision tower, lm_head
    assert (
        family.memory(text_to_video).text_tokens == 256
        and text_to_video.transformer.image_condition_type is None
    )
    with pytest.raises(ValueError, match="makes videos only"):
        load_config(overrides=["model=tiny-i2v", "sampling.num_frames=1"])
