"""HunyuanVideo-1.5 super-resolution components: the upsamplers against the official forward, their
official folders (by their own names, weights_only, strict), the SR transformer's official folders,
the SR variants, the official bucket map and the stage cost figures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from hvbatch.models.hunyuan_video_15 import variants
from hvbatch.models.hunyuan_video_15.config import HunyuanVideo15TransformerConfig
from hvbatch.models.hunyuan_video_15.transformer import HunyuanVideo15Transformer
from hvbatch.models.hunyuan_video_15.transformer_loading import load_transformer, random_transformer
from hvbatch.models.hunyuan_video_15.upsampler import (
    SRTo720pUpsamplerConfig,
    SRTo1080pUpsamplerConfig,
    build_upsampler,
)
from hvbatch.models.hunyuan_video_15.upsampler_loading import (
    inspect_upsampler,
    load_upsampler,
    random_upsampler,
)
from hvbatch.models.hunyuan_video_15.variants import (
    SR_VARIANTS,
    sr_target_size,
    sr_variant,
    sr_variant_for_base,
    variant,
    video_stages,
)
from tests import hv15_sr_official as official
from tests.helpers import rel_err
from tests.hv15_helpers import make_inputs

SR_SMALL = HunyuanVideo15TransformerConfig(
    in_channels=26, out_channels=8, num_heads=4, head_dim=16, num_double_blocks=1,
    rope_axes_dim=[4, 6, 6], text_dim=32, image_embed_dim=24,
)  # fmt: skip
"""Official-compatible and super-resolution: 8 latent channels, 3 * 8 + 2 input channels."""


def _write_upsampler(folder: Path, config: dict, state: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({**config, "_diffusers_version": "0.33.1"}))
    save_file({k: v.contiguous() for k, v in state.items()}, folder / "diffusion_pytorch_model.safetensors")
    return folder


CONFIG_720 = {"_class_name": "SRTo720pUpsampler", "in_channels": 32, "out_channels": 32,
              "hidden_channels": 16, "num_blocks": 2, "global_residual": True}  # fmt: skip
CONFIG_1080 = {"_class_name": "SRTo1080pUpsampler", "z_channels": 32, "out_channels": 32,
               "block_out_channels": [64, 32], "num_res_blocks": 1, "is_residual": False}  # fmt: skip


@pytest.fixture(scope="module")
def upsampler_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An official `ckpts/upsampler/` with both versions, weights by the official key names."""
    root = tmp_path_factory.mktemp("ckpts")
    _write_upsampler(
        root / "upsampler" / "720p_sr_distilled", CONFIG_720, official.state_720p(32, 32, 16, 2, 1)
    )
    state = official.state_1080p(32, 32, [64, 32], 1, 2)
    _write_upsampler(root / "upsampler" / "1080p_sr_distilled", CONFIG_1080, state)
    return root


def test_upsamplers_match_the_official_forward() -> None:
    """Our modules on random weights against the official forward on the same state dict (float32)."""
    x = torch.randn(1, 32, 3, 5, 6, generator=torch.Generator().manual_seed(0))
    for residual in (True, False):
        model = random_upsampler(
            SRTo720pUpsamplerConfig(hidden_channels=16, num_blocks=2, global_residual=residual)
        )
        ref = official.upsampler_720p(model.state_dict(), x, global_residual=residual)
        assert rel_err(model(x), ref) <= 1e-5
        assert rel_err(model(x), x) > 0.1  # the blocks matter
    model = random_upsampler(SRTo1080pUpsamplerConfig.tiny(), seed=3)
    assert any("nin_shortcut" in k for k in model.state_dict())
    ref = official.upsampler_1080p(model.state_dict(), x, [64, 32], 1)
    assert rel_err(model(x), ref) <= 1e-5
    small = x[..., :3, :4]
    ref = official.upsampler_1080p(model.state_dict(), small, [64, 32], 1, target_shape=(5, 6))
    assert rel_err(model(small, target_hw=(5, 6)), ref) <= 1e-5


def test_official_upsampler_folders_load_by_their_own_names(upsampler_root: Path) -> None:
    x = torch.randn(1, 32, 2, 4, 5, generator=torch.Generator().manual_seed(1))
    model = load_upsampler(upsampler_root, version="720p_sr_distilled")
    assert model.config == SRTo720pUpsamplerConfig(32, 32, 16, 2, True)
    state = official.state_720p(32, 32, 16, 2, 1)
    assert rel_err(model(x), official.upsampler_720p(state, x, global_residual=True)) <= 1e-5
    model = load_upsampler(upsampler_root / "upsampler" / "1080p_sr_distilled")
    assert model.config == SRTo1080pUpsamplerConfig(32, 32, (64, 32), 1, False)
    state = official.state_1080p(32, 32, [64, 32], 1, 2)
    assert rel_err(model(x), official.upsampler_1080p(state, x, [64, 32], 1)) <= 1e-5
    meta, checkpoint = inspect_upsampler(upsampler_root, version="1080p_sr_distilled")
    assert next(meta.parameters()).is_meta and checkpoint.class_name == "SRTo1080pUpsampler"
    with pytest.raises(
        ValueError, match=r"holds upsampler versions \['1080p_sr_distilled', '720p_sr_distilled'\]"
    ):
        load_upsampler(upsampler_root)
    assert model.config.to_official_config() == CONFIG_1080
    assert (
        SRTo720pUpsamplerConfig.from_official_config({**CONFIG_720, "hidden_channels": None}).hidden_channels
        == 64
    )


def test_pickled_upsampler_weights_load_with_weights_only(tmp_path: Path) -> None:
    state = official.state_720p(32, 32, 16, 2, 5)
    folder = tmp_path / "720p_sr_distilled"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(CONFIG_720))
    torch.save(state, folder / "diffusion_pytorch_model.bin")
    x = torch.randn(1, 32, 2, 3, 3)
    ours = load_upsampler(folder)(x)
    assert rel_err(ours, official.upsampler_720p(state, x, global_residual=True)) <= 1e-5
    torch.save({**state, "extra": Path("/etc/passwd")}, folder / "diffusion_pytorch_model.bin")
    with pytest.raises(
        ValueError,
        match=r"weights_only=True: .*Unsupported global: GLOBAL pathlib.PosixPath.*never arbitrary pickled",
    ):
        load_upsampler(folder)


def test_upsampler_loading_is_strict_and_names_keys(tmp_path: Path) -> None:
    state = official.state_720p(32, 32, 16, 2, 1)
    del state["blocks.1.block.4.conv.bias"]
    state["blocks.2.block.0.conv.weight"] = torch.zeros(16, 16, 3, 3, 3)
    state["out_conv.conv.weight"] = torch.zeros(32, 8, 3, 3, 3)
    _write_upsampler(tmp_path / "bad" / "720p_sr_distilled", CONFIG_720, state)
    with pytest.raises(ValueError) as info:
        load_upsampler(tmp_path / "bad")
    message = str(info.value)
    assert "1 missing keys: blocks.1.block.4.conv.bias" in message
    assert "1 unexpected keys: blocks.2.block.0.conv.weight" in message
    assert "out_conv.conv.weight (checkpoint (32, 8, 3, 3, 3), model (32, 16, 3, 3, 3))" in message
    swapped = tmp_path / "swapped" / "1080p_sr_distilled"
    _write_upsampler(swapped, CONFIG_720, official.state_720p(32, 32, 16, 2, 1))
    with pytest.raises(ValueError, match="official 1080p_sr_distilled upsampler is a SRTo1080pUpsampler"):
        load_upsampler(swapped)
    other = _write_upsampler(
        tmp_path / "other" / "x", {**CONFIG_720, "_class_name": "AutoencoderKLConv3D"}, {}
    )
    with pytest.raises(ValueError, match=r"'AutoencoderKLConv3D' is not a HunyuanVideo-1\.5 upsampler"):
        load_upsampler(other)
    no_field = _write_upsampler(tmp_path / "nofield" / "x", {"_class_name": "SRTo1080pUpsampler"}, {})
    with pytest.raises(ValueError, match="missing field 'z_channels'"):
        load_upsampler(no_field)
    with pytest.raises(ValueError, match="must be a multiple of z_channels=32"):
        build_upsampler(SRTo1080pUpsamplerConfig(block_out_channels=(48, 32)))


def _sr_folder(root: Path, version: str, config: HunyuanVideo15TransformerConfig, raw: dict, seed: int):
    folder = root / "transformer" / version
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(raw))
    model = random_transformer(config, seed=seed)
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        folder / "diffusion_pytorch_model.safetensors",
    )
    return model


def test_sr_transformers_load_from_the_official_folders(tmp_path: Path) -> None:
    """`transformer/720p_sr_distilled/` and `1080p_sr_distilled/` beside a base version: the same DiT
    with 3C + 2 input channels, recognised from config.json, output equal to the saved model's."""
    root = tmp_path / "ckpts"
    base = SR_SMALL.with_changes(in_channels=17)
    _sr_folder(root, "480p_t2v", base, base.to_official_config(ideal_resolution="480p", ideal_task="t2v"), 0)
    raw = SR_SMALL.to_official_config(ideal_resolution="720p")
    assert (raw["concat_condition"], raw["in_channels"], raw["out_channels"]) == (False, 26, 8)
    saved = _sr_folder(root, "720p_sr_distilled", SR_SMALL, raw, 1)
    # The same width as the official PatchEmbed computes it with is_reshape_temporal_channels: 17 + 8 + 1.
    # No ideal_resolution: the folder name says 1080p.
    other = {**raw, "concat_condition": True, "is_reshape_temporal_channels": True, "in_channels": 17}
    del other["ideal_resolution"]
    _sr_folder(root, "1080p_sr_distilled", SR_SMALL, other, 2)
    inputs = make_inputs(SR_SMALL, grid=(2, 3, 2), text_lens=[5], glyph_lens=[2], image=False)
    inputs.cond_latents.normal_(generator=torch.Generator().manual_seed(0))
    for version, resolution in (("720p_sr_distilled", "720p"), ("1080p_sr_distilled", "1080p")):
        model = load_transformer(root, version=version, dtype=torch.float32)
        facts = model.checkpoint_facts
        assert (facts.version, facts.resolution, facts.super_resolution) == (version, resolution, True)
        assert model.config == SR_SMALL and model.config.condition_channels == 18
        assert tuple(model.img_in.proj.weight.shape) == (64, 26, 1, 1, 1)
    model = load_transformer(root, version="720p_sr_distilled", dtype=torch.float32)
    with torch.no_grad():
        ours, reference = model(inputs.x, inputs.t, inputs.cond()), saved(inputs.x, inputs.t, inputs.cond())
    assert rel_err(ours, reference) <= 1e-6
    assert (
        load_transformer(root, version="480p_t2v", dtype=torch.float32).checkpoint_facts.super_resolution
        is False
    )


def test_sr_checkpoint_with_base_input_width_names_the_key(tmp_path: Path) -> None:
    folder = tmp_path / "transformer" / "720p_sr_distilled"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(SR_SMALL.to_official_config()))
    base = random_transformer(SR_SMALL.with_changes(in_channels=17))
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, folder / "model.safetensors")
    with pytest.raises(
        ValueError, match=r"img_in\.proj\.weight \(checkpoint \(64, 17, 1, 1, 1\), model \(64, 26"
    ):
        load_transformer(folder)
    with pytest.raises(ValueError, match=r"or, for super-resolution, 3 \* out_channels \+ 2 = 98"):
        HunyuanVideo15TransformerConfig(in_channels=97).validate()
    full = HunyuanVideo15TransformerConfig.full(super_resolution=True)
    assert full.is_super_resolution and full.condition_channels == 66
    assert HunyuanVideo15TransformerConfig.from_official_config(full.to_official_config()) == full
    assert HunyuanVideo15TransformerConfig.from_diffusers_config(full.to_diffusers_config()) == full
    with torch.device("meta"):
        sizes = {n: p.numel() for n, p in HunyuanVideo15Transformer(full).named_parameters()}
    assert sizes["img_in.proj.weight"] == 2048 * 98


def test_sr_variants_carry_the_official_defaults() -> None:
    assert [(v.name, v.base_resolution, v.resolution, v.default_steps) for v in SR_VARIANTS.values()] == [
        ("720p_sr_distilled", "480p", "720p", 6),
        ("1080p_sr_distilled", "720p", "1080p", 8),
    ]
    for sr in SR_VARIANTS.values():
        assert (sr.flow_shift, sr.cfg_scale, sr.noise_strength, sr.embedded_guidance_scale) == (
            2.0,
            1.0,
            0.7,
            None,
        )
        assert sr.condition_drop_timestep == pytest.approx(700.0)
        sr.check_steps(sr.default_steps)
        with pytest.raises(ValueError, match=f"runs {sr.default_steps} steps, not 5: it is step-distilled"):
            sr.check_steps(5)
    assert (
        sr_variant("1080p")
        is sr_variant("hunyuan-video-1.5-1080p-sr-distilled")
        is SR_VARIANTS["1080p_sr_distilled"]
    )
    official_pairs = {  # TRANSFORMER_VERSION_TO_SR_VERSION, for the released base variants
        name: "720p_sr_distilled" if name.startswith("480p") else "1080p_sr_distilled"
        for name in variants.VARIANTS
    }
    for name, sr_name in official_pairs.items():
        base = variant(name)
        assert sr_variant_for_base(base, sr_name.split("_")[0]).name == sr_name
        assert sr_variant_for_base(base, "none") is None
    with pytest.raises(
        ValueError,
        match=r"takes a 720p base video, but hunyuan-video-1\.5-480p-t2v makes 480p: "
        r"use super_resolution='720p'",
    ):
        sr_variant_for_base(variant("480p_t2v"), "1080p")
    with pytest.raises(ValueError, match="is a super-resolution transformer, not a base model"):
        variant("720p_sr_distilled")
    with pytest.raises(
        ValueError, match=r"unknown HunyuanVideo-1\.5 super-resolution '4k'; known: none, 720p"
    ):
        sr_variant("4k")


def test_sr_target_size_is_the_official_bucket_map() -> None:
    for sr in SR_VARIANTS.values():
        mapping = official.bucket_map(
            variants.SR_BUCKET_BASE_SIZE[sr.base_resolution], variants.SR_BUCKET_BASE_SIZE[sr.resolution]
        )
        assert len(mapping) > 100
        for (lr_w, lr_h), (hr_w, hr_h) in mapping.items():
            assert sr_target_size(lr_h, lr_w, sr) == (hr_h, hr_w)
    assert sr_target_size(720, 1280, sr_variant("1080p")) == (1072, 1904)
    with pytest.raises(
        ValueError,
        match=r"takes a 480p bucket size; 480x864 \(h x w\) is not one "
        r"\(the nearest by aspect ratio is 464x848\)",
    ):
        sr_target_size(480, 864, sr_variant("720p"))


def test_stage_costs_count_both_stages() -> None:
    base = variant("480p_t2v")
    stages = video_stages(base, 480, 848, 121, super_resolution="720p")
    assert [(s.stage, s.variant, s.height, s.width) for s in stages] == [
        ("base", "480p_t2v", 480, 848), ("sr", "720p_sr_distilled", 720, 1280),
    ]  # fmt: skip
    frames = (121 - 1) // 4 + 1
    assert [s.tokens for s in stages] == [
        frames * (480 // 16) * (848 // 16),
        frames * (720 // 16) * (1280 // 16),
    ]
    assert [(s.steps, s.passes_per_step, s.transformer_passes) for s in stages] == [(50, 2, 100), (6, 1, 6)]
    assert video_stages(variant("720p_t2v_distilled"), 720, 1280, 121, super_resolution="1080p")[1].grid == (
        frames, 1072 // 16, 1904 // 16,
    )  # fmt: skip
    assert len(video_stages(base, 480, 848, 121)) == 1
    # The per-token linear FLOPs are twice the image stream's block matrices of the real model.
    with torch.device("meta"):
        model = HunyuanVideo15Transformer(HunyuanVideo15TransformerConfig.full())
    stream = [f"img_attn_{n}" for n in "qkv"] + ["img_attn_proj", "img_mlp"]
    macs = sum(
        p.numel()
        for n, p in model.double_blocks.named_parameters()
        if n.split(".")[1] in stream and n.endswith("weight")
    )
    assert variants.transformer_pass_flops(1) == pytest.approx(2 * macs + 4 * 2048 * 54, rel=1e-12)


def test_stage_costs_import_no_torch() -> None:
    code = (
        "import importlib.util, sys; "
        f"spec = importlib.util.spec_from_file_location('v', {variants.__file__!r}); "
        "m = sys.modules['v'] = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
        "s = m.video_stages(m.variant('720p_t2v'), 720, 1280, 121, super_resolution='1080p'); "
        "print([x.tokens for x in s], [x.steps for x in s], 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"[{31 * 45 * 80}, {31 * 67 * 119}] [50, 8] False"
