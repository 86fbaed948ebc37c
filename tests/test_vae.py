"""The causal 3D VAE against diffusers' AutoencoderKLHunyuanVideo, its tiling, and its loader.

Everything runs on CPU with a tiny random-weight VAE (channels 8/16/32/32, 4 groups, 1 layer).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLHunyuanVideo
from safetensors.torch import save_file

from hvbatch.models import vae_blocks
from hvbatch.models.hunyuan_video.vae import AutoencoderKLCausal3D, VaeConfig
from hvbatch.models.hunyuan_video.vae_loading import load_vae
from hvbatch.models.vae_blocks import frame_causal_attention
from hvbatch.models.vae_tiling import (
    VaeTilingConfig,
    blend_weights,
    spatial_spans,
    temporal_spans,
    tiled_decode,
)

TINY = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "block_out_channels": (8, 16, 32, 32),
    "layers_per_block": 1,
    "norm_num_groups": 4,
}
PARITY_REL_TOL = 1e-4
# Tiled vs untiled decoding, relative L2 error, on these random weights and SMALL_TILES: measured
# 0.49 (temporal + width tiles) and 0.61 (plus height tiles) for the seeds used below, 0.49-0.73
# over weight seeds 0-4. Diffusers' own tiling gives the same numbers (to 1e-8 in 1-D, see
# test_tiled_decode_vs_untiled), so the gap is the model's, not the tiler's: GroupNorm statistics
# and the frame-causal attention only see one tile, and random weights have a receptive field
# (~13 latent cells, ~25 latent frames) far wider than these tiles. The tiler itself is checked
# exactly with a context-free decoder and against diffusers' tiling.
TILED_VS_UNTILED_REL_TOL = 0.9
# Small tiles so that a small latent spans several tiles on every axis (stride 3 frames / 4 cells).
SMALL_TILES = VaeTilingConfig(
    tile_latent_size=6, tile_latent_overlap=2, tile_latent_frames=4, tile_latent_frame_overlap=1
)


def _rel(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.double() - ref.double()).norm() / ref.double().norm()).item()


def _randomize_(model: torch.nn.Module, seed: int) -> None:
    """Non-trivial random weights: no zeros, norm scales around 1, activations of order one."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim > 1:
                p.copy_(torch.randn(p.shape, generator=gen) / p[0].numel() ** 0.5)
            elif name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))


def _untiled(ref: AutoencoderKLHunyuanVideo) -> AutoencoderKLHunyuanVideo:
    ref.disable_tiling()
    ref.use_framewise_decoding = False
    ref.use_framewise_encoding = False
    return ref


@pytest.fixture(scope="module")
def reference() -> AutoencoderKLHunyuanVideo:
    ref = AutoencoderKLHunyuanVideo(**TINY).eval()
    _randomize_(ref, seed=0)
    return _untiled(ref)


@pytest.fixture(scope="module")
def diffusers_dir(tmp_path_factory: pytest.TempPathFactory, reference: AutoencoderKLHunyuanVideo) -> Path:
    folder = tmp_path_factory.mktemp("diffusers") / "vae"
    reference.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def ours(diffusers_dir: Path) -> AutoencoderKLCausal3D:
    return load_vae(diffusers_dir)


def _official_config() -> dict[str, object]:
    """The official vae/config.json keys (time_compression_ratio, *Causal3D block names)."""
    return {
        "_class_name": "AutoencoderKLCausal3D",
        "act_fn": "silu",
        "block_out_channels": list(TINY["block_out_channels"]),
        "down_block_types": ["DownEncoderBlockCausal3D"] * 4,
        "up_block_types": ["UpDecoderBlockCausal3D"] * 4,
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 4,
        "layers_per_block": 1,
        "norm_num_groups": 4,
        "sample_size": 256,
        "sample_tsize": 64,
        "scaling_factor": 0.476986,
        "time_compression_ratio": 4,
        "mid_block_add_attention": True,
    }


def _write_official(folder: Path, payload: object, *, legacy: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(payload, folder / "pytorch_model.pt", _use_new_zipfile_serialization=not legacy)
    (folder / "config.json").write_text(json.dumps(_official_config()))
    return folder


# ---------------------------------------------------------------- parity with diffusers


@pytest.mark.parametrize("shape", [(1, 4, 1, 5, 7), (2, 4, 3, 6, 6), (1, 4, 5, 3, 9)])
def test_decode_matches_diffusers(
    ours: AutoencoderKLCausal3D, reference: AutoencoderKLHunyuanVideo, shape: tuple[int, ...]
) -> None:
    z = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, want = ours.decode(z), reference.decode(z).sample
    batch, _, frames, height, width = shape
    assert got.shape == want.shape == (batch, 3, 1 + 4 * (frames - 1), 8 * height, 8 * width)
    assert want.std() > 0.1
    assert _rel(got, want) <= PARITY_REL_TOL


@pytest.mark.parametrize("shape", [(1, 3, 1, 16, 24), (2, 3, 9, 24, 16)])
def test_encode_matches_diffusers(
    ours: AutoencoderKLCausal3D, reference: AutoencoderKLHunyuanVideo, shape: tuple[int, ...]
) -> None:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2)).clamp(-1, 1)
    with torch.no_grad():
        got, want = ours.encode(x), reference.encode(x).latent_dist
    batch, _, frames, height, width = shape
    assert got.mean.shape == (batch, 4, (frames - 1) // 4 + 1, height // 8, width // 8)
    assert _rel(got.mean, want.mean) <= PARITY_REL_TOL
    assert _rel(got.logvar, want.logvar) <= PARITY_REL_TOL
    assert _rel(got.std, want.std) <= PARITY_REL_TOL


def test_full_size_keys_match_diffusers() -> None:
    with torch.device("meta"):
        ref = AutoencoderKLHunyuanVideo()
        ours = AutoencoderKLCausal3D(VaeConfig.from_diffusers_config(dict(ref.config)))
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    our_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert our_shapes == ref_shapes
    assert len(our_shapes) == len(ref_shapes) > 200
    assert our_shapes["decoder.mid_block.attentions.0.to_out.0.weight"] == (512, 512)


@pytest.mark.parametrize("max_scores", [None, 100])
def test_frame_causal_attention_equals_masked_sdpa(
    monkeypatch: pytest.MonkeyPatch, max_scores: int | None
) -> None:
    if max_scores is not None:  # force several query chunks per frame
        monkeypatch.setattr(vae_blocks, "MAX_SCORES_PER_CALL", max_scores)
    gen = torch.Generator().manual_seed(3)
    frames, per_frame, dim = 4, 6, 8
    q, k, v = (torch.randn(2, frames * per_frame, dim, generator=gen) for _ in range(3))
    frame_of = torch.arange(frames).repeat_interleave(per_frame)
    allowed = frame_of[None, :] <= frame_of[:, None]  # [L, L]: key frame <= query frame
    want = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None], attn_mask=allowed)[:, 0]
    got = frame_causal_attention(q, k, v, frames)
    assert (got - want).abs().max().item() < 1e-5
    assert not torch.allclose(got, F.scaled_dot_product_attention(q, k, v), atol=1e-3)


def test_decode_latents_scales_and_maps_to_unit_range(ours: AutoencoderKLCausal3D) -> None:
    latents = torch.randn(1, 4, 2, 3, 4, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        video = ours.decode_latents(latents)
        want = (ours.decode(latents / 0.476986) / 2 + 0.5).clamp(0, 1)
    assert video.dtype == torch.float32 and video.shape == (1, 3, 5, 24, 32)
    assert (video - want).abs().max().item() < 1e-6
    assert video.min().item() >= 0.0 and video.max().item() <= 1.0
    assert 0.0 < (video == 1.0).float().mean().item() < 0.5  # clamping happened, but not everywhere


# ---------------------------------------------------------------- tiling


def test_official_tiling_spans_cover_720p_129_frames() -> None:
    official = VaeTilingConfig()
    t_spans = temporal_spans(33, official.tile_latent_frames, official.tile_latent_frame_overlap, 4)
    assert [(s.latent_start, s.latent_stop) for s in t_spans] == [(0, 17), (12, 29), (24, 33)]
    assert [(s.out_start, s.out_stop) for s in t_spans] == [(0, 65), (49, 113), (97, 129)]
    w_spans = spatial_spans(160, official.tile_latent_size, official.tile_latent_overlap, 8)
    assert [s.latent_start for s in w_spans] == [0, 24, 48, 72, 96, 120, 144]
    for spans, total in ((t_spans, 129), (w_spans, 1280), (spatial_spans(90, 32, 8, 8), 720)):
        weight = torch.zeros(total)
        for s in spans:
            weight[s.out_start : s.out_stop] += blend_weights(s, torch.device("cpu"))
        assert (weight - 1).abs().max().item() < 1e-6  # a partition of unity
    second = blend_weights(t_spans[1], torch.device("cpu"))  # rises over 16 frames, falls over 16
    assert second[0] == 0 and second[15] == 15 / 16 and second[16] == 1 and second[-1] == 1 / 16


def _local_decode(z: torch.Tensor) -> torch.Tensor:
    """A stand-in decoder without context: frame 0 -> 1 frame, later frames -> 4, 8x nearest in H, W."""
    mixed = torch.einsum("oc,bcthw->bothw", torch.arange(12.0).reshape(3, 4).cos(), z)
    frames = torch.cat([mixed[:, :, :1], mixed[:, :, 1:].repeat_interleave(4, dim=2)], dim=2)
    return frames.repeat_interleave(8, dim=3).repeat_interleave(8, dim=4)


def test_tiled_decode_is_exact_for_a_context_free_decoder() -> None:
    z = torch.randn(2, 4, 11, 13, 17, generator=torch.Generator().manual_seed(5))
    tiled = tiled_decode(_local_decode, z, SMALL_TILES, 4, 8)
    assert tiled.shape == (2, 3, 41, 104, 136)
    assert (tiled - _local_decode(z)).abs().max().item() < 1e-5


@pytest.mark.parametrize(("shape", "max_vs_diffusers"), [((1, 4, 6, 4, 8), 1e-5), ((1, 4, 6, 8, 8), 5e-2)])
def test_tiled_decode_vs_untiled(
    ours: AutoencoderKLCausal3D,
    reference: AutoencoderKLHunyuanVideo,
    shape: tuple[int, ...],
    max_vs_diffusers: float,
) -> None:
    """2 temporal x 2 width (x 2 height) tiles. In 1-D blending equals diffusers' (official) tiling;
    where four tiles meet, our bilinear weights differ from its sequential blending by ~2%."""
    z = torch.randn(shape, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        untiled = ours.decode(z)
        tiled = tiled_decode(ours.decode, z, SMALL_TILES, 4, 8)
        reference.enable_tiling(
            tile_sample_min_height=48, tile_sample_min_width=48, tile_sample_min_num_frames=16,
            tile_sample_stride_height=32, tile_sample_stride_width=32, tile_sample_stride_num_frames=12,
        )  # fmt: skip
        reference.use_framewise_decoding = True
        try:
            ref_tiled = reference.decode(z).sample
        finally:
            _untiled(reference)
    assert tiled.shape == untiled.shape == ref_tiled.shape
    error, ref_error = _rel(tiled, untiled), _rel(ref_tiled, untiled)
    assert 0.05 < error <= TILED_VS_UNTILED_REL_TOL  # not accidentally untiled
    assert error <= 1.01 * ref_error
    assert _rel(tiled, ref_tiled) <= max_vs_diffusers
    with torch.no_grad():
        video = ours.decode_latents(z * 0.476986, tiling=SMALL_TILES)
    assert (video - (tiled / 2 + 0.5).clamp(0, 1)).abs().max().item() < 1e-5


@pytest.mark.parametrize(
    "kwargs",
    [
        {"tile_latent_size": 4, "tile_latent_overlap": 3},
        {"tile_latent_frames": 0},
        {"tile_latent_overlap": -1},
    ],
)
def test_tiling_config_rejects_bad_sizes(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError, match="VaeTilingConfig"):
        VaeTilingConfig(**kwargs)


# ---------------------------------------------------------------- loading


def test_sharded_safetensors_load(tmp_path: Path, reference: AutoencoderKLHunyuanVideo) -> None:
    reference.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "diffusion_pytorch_model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    model = load_vae(tmp_path, dtype=torch.bfloat16)
    assert not model.training and next(model.parameters()).dtype == torch.bfloat16
    assert all(not p.requires_grad and p.device.type == "cpu" for p in model.parameters())
    ref_state = reference.state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(value, ref_state[key].to(torch.bfloat16)), key


@pytest.mark.parametrize("variant", ["plain", "wrapped", "legacy"])
def test_official_layout_loads(
    tmp_path: Path, reference: AutoencoderKLHunyuanVideo, ours: AutoencoderKLCausal3D, variant: str
) -> None:
    """Plain state dict, {"state_dict": {"vae.<key>": ...}}, and a pre-zipfile .pt (no mmap)."""
    state = {k: v.clone() for k, v in reference.state_dict().items()}
    payload = {"state_dict": {f"vae.{k}": v for k, v in state.items()}} if variant == "wrapped" else state
    folder = _write_official(tmp_path / "hunyuan-video-t2v-720p" / "vae", payload, legacy=variant == "legacy")
    model = load_vae(folder.parent)  # a model root holding vae/ works too
    assert model.config == ours.config
    z = torch.randn(1, 4, 3, 5, 6, generator=torch.Generator().manual_seed(7))
    x = torch.randn(1, 3, 5, 16, 16, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        assert torch.equal(model.decode(z), ours.decode(z))
        assert torch.equal(model.encode(x).mean, ours.encode(x).mean)


def test_official_config_maps_to_defaults() -> None:
    config = _official_config() | {"block_out_channels": [128, 256, 512, 512], "latent_channels": 16}
    config |= {"layers_per_block": 2, "norm_num_groups": 32}
    assert VaeConfig.from_diffusers_config(config) == VaeConfig()


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"temporal_compression_ratio": 8}, "temporal_compression_ratio=8"),
        ({"time_compression_ratio": 8}, "temporal_compression_ratio=8"),
        ({"act_fn": "relu"}, "act_fn"),
        ({"_class_name": "AutoencoderKL"}, "_class_name"),
        ({"norm_num_groups": 5}, "norm_num_groups=5"),
        ({"down_block_types": ["DownBlock2D"] * 4}, "DownBlock2D"),
        ({"use_magic": True}, "unknown VAE config keys"),
        ({"shift_factor": 0.1}, "shift_factor"),
    ],
)
def test_config_rejects_unsupported_values(change: dict[str, object], words: str) -> None:
    with pytest.raises(ValueError, match=words):
        VaeConfig.from_diffusers_config(_official_config() | change)


def test_missing_and_unexpected_keys_are_named(tmp_path: Path, reference: AutoencoderKLHunyuanVideo) -> None:
    state = dict(reference.state_dict())
    del state["decoder.conv_out.conv.bias"]
    state["decoder.extra.weight"] = torch.ones(2)
    _write_official(tmp_path, state)
    with pytest.raises(ValueError, match="official") as info:
        load_vae(tmp_path)
    message = str(info.value)
    assert "1 missing keys: decoder.conv_out.conv.bias" in message
    assert "1 unexpected keys: decoder.extra.weight" in message
    assert str(tmp_path / "pytorch_model.pt") in message


def test_wrong_shape_is_named(tmp_path: Path, diffusers_dir: Path) -> None:
    (tmp_path / "config.json").write_text((diffusers_dir / "config.json").read_text())
    state = dict(load_vae(diffusers_dir).state_dict())
    state["post_quant_conv.weight"] = torch.ones(4, 3, 1, 1, 1)
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "diffusion_pytorch_model.safetensors")
    with pytest.raises(ValueError, match="diffusers") as info:
        load_vae(tmp_path)
    assert "post_quant_conv.weight (checkpoint (4, 3, 1, 1, 1), model (4, 4, 1, 1, 1))" in str(info.value)
    assert "shape mismatches" in str(info.value)


def test_pickled_objects_are_refused(tmp_path: Path, reference: AutoencoderKLHunyuanVideo) -> None:
    payload = {"state_dict": dict(reference.state_dict()), "args": argparse.Namespace(lr=1e-4)}
    _write_official(tmp_path, payload)
    with pytest.raises(ValueError, match="unsafe unpickling") as info:
        load_vae(tmp_path)
    assert "weights_only" in str(info.value)


def test_non_tensor_entries_are_refused(tmp_path: Path, reference: AutoencoderKLHunyuanVideo) -> None:
    _write_official(tmp_path, dict(reference.state_dict()) | {"step": 1000})
    with pytest.raises(ValueError, match=r"non-tensor entries: step \(int\)"):
        load_vae(tmp_path)


def test_unknown_layouts_list_expected_and_found_files(tmp_path: Path) -> None:
    (tmp_path / "model.ckpt").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match="unknown VAE layout") as info:
        load_vae(tmp_path)
    message = str(info.value)
    for word in ("config.json", "pytorch_model.pt", "diffusion_pytorch_model.safetensors", "model.ckpt"):
        assert word in message
    (tmp_path / "config.json").write_text(json.dumps(_official_config()))
    with pytest.raises(ValueError, match=re.escape("Found: config.json, model.ckpt, notes.txt")):
        load_vae(tmp_path)  # a config alone is not enough
    with pytest.raises(ValueError, match="does not exist"):
        load_vae(tmp_path / "missing")
