"""The config tree: presets, overrides, errors, round trip, and the diffusers config mapping."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from hvbatch.config import Config, available_presets, load_config, save_config, transformer_preset
from hvbatch.models import HunyuanVideoTransformer, random_transformer
from hvbatch.models.convert import config_from_diffusers
from tests.helpers import DIFFUSERS_OTHER, DIFFUSERS_SMALL, small_config


def test_presets_ship_with_the_package() -> None:
    assert {"tiny", "hunyuan-video-t2v-720p"} <= set(available_presets())
    full = transformer_preset("hunyuan-video-t2v-720p")
    assert (full.hidden_size, full.num_double_blocks, full.num_single_blocks) == (3072, 20, 40)
    assert full.rope_axes_dim == [16, 56, 56] and full.text_dim == 4096 and full.pooled_text_dim == 768


def test_full_size_parameter_count_is_the_published_one() -> None:
    with torch.device("meta"):
        model = HunyuanVideoTransformer(transformer_preset("hunyuan-video-t2v-720p"))
    num_params = sum(p.numel() for p in model.parameters())
    assert 12.8e9 < num_params < 12.85e9  # about 12.82B (hunyuanvideo.md)
    keys = model.state_dict().keys()
    assert "double_blocks.19.img_attn_qkv.weight" in keys and "single_blocks.39.linear1.weight" in keys
    assert tuple(model.state_dict()["double_blocks.0.img_mod.linear.weight"].shape) == (18432, 3072)
    assert tuple(model.state_dict()["single_blocks.0.linear1.weight"].shape) == (21504, 3072)


def test_overrides_and_presets_compose(tmp_path: Path) -> None:
    config = load_config(overrides=["model=tiny", "sampling.seed=9", "sampling.height=256"])
    assert config.model.name == "tiny" and config.model.transformer.num_heads == 12
    assert (config.sampling.seed, config.sampling.height, config.sampling.flow_shift) == (9, 256, 7.0)
    user_file = tmp_path / "run.yaml"
    user_file.write_text("model:\n  name: tiny\nsampling:\n  num_inference_steps: 3\n")
    from_file = load_config(user_file, ["sampling.cfg_scale=2.5"])
    assert from_file.model.transformer.head_dim == 16
    assert (from_file.sampling.num_inference_steps, from_file.sampling.cfg_scale) == (3, 2.5)
    saved = tmp_path / "resolved.yaml"
    save_config(from_file, saved)
    assert load_config(saved) == from_file


def test_bad_overrides_say_what_is_wrong() -> None:
    with pytest.raises(ValueError, match=r"unknown model preset 'huge'.*tiny"):
        load_config(overrides=["model=huge"])
    with pytest.raises(ValueError, match="not of the form key=value"):
        load_config(overrides=["sampling.seed"])
    with pytest.raises(ValueError, match="invalid config override"):
        load_config(overrides=["sampling.sede=3"])
    with pytest.raises(ValueError, match="invalid config override"):
        load_config(overrides=["sampling.seed=abc"])
    with pytest.raises(ValueError, match=r"sum\(rope_axes_dim\)=16 must equal head_dim=32"):
        load_config(overrides=["model=tiny", "model.transformer.head_dim=32"])


def test_every_config_field_is_documented() -> None:
    source = Path(__import__("hvbatch.config").config.__file__).read_text()
    for cls in (Config,):
        for f in dataclasses.fields(cls):
            assert f"    {f.name}:" in source
    assert OmegaConf.structured(Config)  # the dataclasses are valid structured configs


@pytest.mark.parametrize("raw", [DIFFUSERS_SMALL, DIFFUSERS_OTHER])
def test_diffusers_config_maps_onto_ours(raw: dict) -> None:
    config = config_from_diffusers(dict(raw, _class_name="HunyuanVideoTransformer3DModel"), "config.json")
    assert config.num_heads == raw["num_attention_heads"] and config.head_dim == raw["attention_head_dim"]
    assert (
        config.rope_axes_dim == list(raw["rope_axes_dim"]) and config.guidance_embed == raw["guidance_embeds"]
    )


def test_tiny_preset_runs_and_is_seeded() -> None:
    config = transformer_preset("tiny")
    a, b = random_transformer(config, seed=3), random_transformer(config, seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert small_config().hidden_size == 64


def test_every_bundled_example_config_loads() -> None:
    examples = sorted((Path(__file__).parents[1] / "configs" / "examples").glob("*.yaml"))
    assert len(examples) >= 4
    for path in examples:
        config = load_config(path)
        assert config.sampling.height % 16 == 0, path
    official = load_config(Path(__file__).parents[1] / "configs/examples/hunyuan-720p-official.yaml")
    diffusers = load_config(Path(__file__).parents[1] / "configs/examples/hunyuan-544p-diffusers.yaml")
    assert (official.sampling.height, official.sampling.width) == (720, 1280)
    assert (diffusers.sampling.height, diffusers.sampling.width) == (544, 960)
    assert official.model.path and diffusers.model.path
