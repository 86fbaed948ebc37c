"""The config tree: presets, overrides, errors, round trip, and the diffusers config mapping."""

from __future__ import annotations

import contextlib
import dataclasses
import io
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from hvbatch.config import Config, available_presets, load_config, save_config, transformer_preset
from hvbatch.models.hunyuan_video import HunyuanVideoTransformer, random_transformer
from hvbatch.models.hunyuan_video.convert import config_from_diffusers
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
    with pytest.raises(ValueError, match=r"unknown key sampling\.sede: did you mean sampling\.seed"):
        load_config(overrides=["sampling.sede=3"])
    with pytest.raises(ValueError, match=r"override: sampling\.seed='abc' must be a whole number"):
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


OLD_RUN_CONFIG = Path(__file__).parent / "data" / "run-config-before-families.yaml"
"""A run's config.yaml as hvbatch saved it before model families (tiny, cfg 2.5, 128 text tokens)."""


def test_a_run_saved_before_families_still_loads_and_round_trips(tmp_path: Path) -> None:
    config = load_config(OLD_RUN_CONFIG)
    assert config.model.family == "hunyuan-video-1.0" and config.model.name == "tiny"
    assert config.model.transformer == transformer_preset("tiny")
    assert config.model.text_encoder.max_text_tokens == 128 and config.sampling.cfg_scale == 2.5
    assert config.batch.seconds_per_cost_unit == 0.0005
    saved = tmp_path / "config.yaml"
    save_config(config, saved)
    assert "family: hunyuan-video-1.0" in saved.read_text()
    assert load_config(saved) == config


def test_the_family_types_its_sections() -> None:
    """Keys and types under model.transformer / model.text_encoder are the family dataclasses'."""
    config = load_config(overrides=["model=tiny"])
    assert type(config.model.transformer).__name__ == "TransformerConfig"
    with pytest.raises(
        ValueError, match=r"unknown key model.transformer.num_head: did you mean model.transformer.num_heads"
    ):
        load_config(overrides=["model=tiny", "model.transformer.num_head=4"])
    with pytest.raises(ValueError, match=r"model.transformer.num_heads='many' must be a whole number"):
        load_config(overrides=["model=tiny", "model.transformer.num_heads=many"])
    with pytest.raises(ValueError, match=r"model\.text_encoder\.max_text_tokens=0 must be >= 1"):
        load_config(overrides=["model=tiny", "model.text_encoder.max_text_tokens=0"])
    assert (
        load_config(overrides=["model=tiny", "model.family=hunyuan-video-1.0"]).model.family
        == "hunyuan-video-1.0"
    )
    with pytest.raises(
        ValueError, match=r"unknown model family 'wan'; registered families: hunyuan-video-1.0"
    ):
        load_config(overrides=["model=tiny", "model.family=wan"])


def test_every_preset_names_a_family_that_lists_it() -> None:
    from hvbatch.models.family import families, family_for_preset

    for preset in available_presets():
        family = family_for_preset(preset)
        assert preset in family.presets
        assert load_config(overrides=[f"model={preset}"]).model.family == family.name
    assert sorted(p for f in families() for p in f.presets) == available_presets()


def test_a_second_family_brings_its_own_dataclasses(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A family registered with other section types is typed, validated and saved without config.py."""
    import importlib.resources

    from hvbatch.models import family as registry

    @dataclasses.dataclass
    class OtherArch:
        num_heads: int = 16
        head_dim: int = 128
        num_blocks: int = 54

    @dataclasses.dataclass
    class OtherEncoders:
        max_text_tokens: int = 1000

    released = registry.get_family("hunyuan-video-1.0")
    other = dataclasses.replace(
        released,
        name="other-family",
        presets=("other-preset",),
        default_preset=None,
        config_sections={"transformer": OtherArch, "text_encoder": OtherEncoders},
        sampling_defaults=lambda preset: {"num_frames": 121, "flow_shift": 5.0},
        config_problems=lambda model: (
            [] if model.transformer.num_blocks > 0 else ["model.transformer: no blocks"]
        ),
    )
    monkeypatch.setitem(registry._REGISTRY, other.name, other)
    presets = tmp_path / "configs" / "model"
    presets.mkdir(parents=True)
    for path in registry._preset_dir().glob("*.yaml"):
        (presets / path.name).write_text(path.read_text())
    (presets / "other-preset.yaml").write_text(
        "name: other-preset\nfamily: other-family\ntransformer:\n  num_blocks: 8\n"
    )
    monkeypatch.setattr(importlib.resources, "files", lambda package: tmp_path / "configs")
    config = load_config(overrides=["model=other-preset", "model.transformer.head_dim=64"])
    assert config.model.family == "other-family" and config.model.transformer == OtherArch(16, 64, 8)
    assert config.model.text_encoder == OtherEncoders() and config.sampling.num_frames == 121
    assert config.sampling.flow_shift == 5.0 and config.sampling.height == 720  # the rest: built-in defaults
    with pytest.raises(ValueError, match=r"unknown key model\.transformer\.text_dim"):
        load_config(overrides=["model=other-preset", "model.transformer.text_dim=64"])
    with pytest.raises(ValueError, match=r"model\.transformer: no blocks"):
        load_config(overrides=["model=other-preset", "model.transformer.num_blocks=0"])
    with pytest.raises(ValueError, match=r"preset 'tiny' is a model of family 'hunyuan-video-1.0'"):
        load_config(overrides=["model=tiny", "model.family=other-family"])
    saved = tmp_path / "config.yaml"
    save_config(config, saved)
    assert load_config(saved) == config


def test_a_config_file_with_several_mistakes_names_each_in_hvbatch_words(tmp_path: Path) -> None:
    from hvbatch.cli import main

    path = tmp_path / "my.yaml"
    path.write_text("sampling:\n  sed: 3\n  width: abc\nslurm:\n  nodez: 2\nsamplng:\n  seed: 1\n")
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main(["plan", "--config", str(path), "slurm.setup=3"]) == 2
    text = err.getvalue()
    assert "invalid config (5 problems" in text
    for problem in (
        f"config file {path}: unknown key sampling.sed: did you mean sampling.seed?",
        f"config file {path}: sampling.width='abc' must be a whole number",
        f"config file {path}: unknown key slurm.nodez: did you mean slurm.nodes?",
        f"config file {path}: unknown section samplng: did you mean sampling?",
        "override: slurm.setup=3 must be a list",
    ):
        assert problem in text
    for internal in ("full_key", "reference_type", "object_type", "Traceback"):
        assert internal not in text
