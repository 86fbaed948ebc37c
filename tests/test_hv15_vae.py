"""The HunyuanVideo-1.5 VAE against diffusers' AutoencoderKLHunyuanVideo15, its tiling, its loader.

Everything runs on CPU with the tiny flavor (widths 8..64, 32 latent channels, 16x / 4x) and
random weights saved by diffusers and loaded through hvbatch's loader.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKLHunyuanVideo15
from safetensors.torch import save_file

from hvbatch.models.hunyuan_video_15.vae import (
    DIFFUSERS_TILING,
    OFFICIAL_SMALL_GPU_TILING,
    OFFICIAL_TILING,
    AutoencoderKLConv3D,
    official_tiling,
)
from hvbatch.models.hunyuan_video_15.vae_config import HunyuanVideo15VaeConfig
from hvbatch.models.hunyuan_video_15.vae_loading import inspect_vae, load_vae, random_vae
from hvbatch.models.hunyuan_video_15.vae_names import diffusers_names
from hvbatch.models.vae_tiling import (
    VaeTilingConfig,
    add_tile,
    blend_weights,
    sequential_weights,
    tile_plan,
    tiled_decode,
)

TINY = HunyuanVideo15VaeConfig.tiny()
PARITY_REL_TOL = 1e-4
SCALE = TINY.scaling_factor


def _rel(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.double() - ref.double()).norm() / ref.double().norm()).item()


def _randomize_(model: torch.nn.Module, seed: int) -> None:
    """Non-trivial random weights: no zeros, RMS gains around 1, activations of order one."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif p.ndim > 1:
                p.copy_(torch.randn(p.shape, generator=gen) / p[0].numel() ** 0.5)
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))


def _diffusers_kwargs(config: HunyuanVideo15VaeConfig) -> dict[str, object]:
    return {k: v for k, v in config.to_diffusers_config().items() if not k.startswith("_")}


@pytest.fixture(scope="module")
def reference() -> AutoencoderKLHunyuanVideo15:
    ref = AutoencoderKLHunyuanVideo15(**_diffusers_kwargs(TINY)).eval()
    _randomize_(ref, seed=0)
    # diffusers' mid-block attention passes its [B, L, L] mask without the head axis, which fails
    # for a batch of two or more (the official code adds the axis): decode one sample at a time.
    ref.enable_slicing()
    return ref


@pytest.fixture(scope="module")
def diffusers_dir(tmp_path_factory: pytest.TempPathFactory, reference: AutoencoderKLHunyuanVideo15) -> Path:
    folder = tmp_path_factory.mktemp("diffusers") / "vae"
    reference.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def ours(diffusers_dir: Path) -> AutoencoderKLConv3D:
    return load_vae(diffusers_dir)


def _latent(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _write_official(folder: Path, state: dict[str, torch.Tensor], config: dict[str, object]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, folder / "diffusion_pytorch_model.safetensors")
    (folder / "config.json").write_text(json.dumps(config))
    return folder


# ---------------------------------------------------------------- parity with diffusers


@pytest.mark.parametrize("shape", [(1, 32, 1, 2, 3), (2, 32, 3, 2, 2), (1, 32, 2, 3, 1)])
def test_decode_matches_diffusers(
    ours: AutoencoderKLConv3D, reference: AutoencoderKLHunyuanVideo15, shape: tuple[int, ...]
) -> None:
    z = _latent(shape, 1)
    with torch.no_grad():
        got, want = ours.decode(z), reference.decode(z).sample
    batch, _, frames, height, width = shape
    assert got.shape == want.shape == (batch, 3, 1 + 4 * (frames - 1), 16 * height, 16 * width)
    assert want.std() > 0.1
    assert _rel(got, want) <= PARITY_REL_TOL


@pytest.mark.parametrize("shape", [(1, 3, 1, 32, 48), (2, 3, 9, 32, 16)])
def test_encode_matches_diffusers(
    ours: AutoencoderKLConv3D, reference: AutoencoderKLHunyuanVideo15, shape: tuple[int, ...]
) -> None:
    x = _latent(shape, 2).clamp(-1, 1)
    with torch.no_grad():
        got, want = ours.encode(x), reference.encode(x).latent_dist
    batch, _, frames, height, width = shape
    assert got.mean.shape == (batch, 32, (frames - 1) // 4 + 1, height // 16, width // 16)
    assert _rel(got.mean, want.mean) <= PARITY_REL_TOL
    assert _rel(got.logvar, want.logvar) <= PARITY_REL_TOL
    assert _rel(got.std, want.std) <= PARITY_REL_TOL


def test_full_config_matches_diffusers_names_shapes_and_size() -> None:
    with torch.device("meta"):
        ref = AutoencoderKLHunyuanVideo15()
        full = AutoencoderKLConv3D(HunyuanVideo15VaeConfig.from_diffusers_config(dict(ref.config)))
    assert full.config == HunyuanVideo15VaeConfig.full()
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    names = diffusers_names(list(full.state_dict()))
    assert {d: tuple(full.state_dict()[o].shape) for d, o in names.items()} == ref_shapes
    count = sum(p.numel() for p in full.parameters())
    assert count == sum(p.numel() for p in ref.parameters())
    assert round(count / 1e9, 2) == 1.26  # the published 1.26B
    assert full.state_dict()["decoder.mid.attn_1.q.weight"].shape == (1024, 1024, 1, 1, 1)


def test_first_latent_frame_decodes_to_the_first_frame(ours: AutoencoderKLConv3D) -> None:
    """Causal in time: latent frames 0..k decode to video frames 0..4k whatever follows them."""
    z = _latent((1, 32, 3, 2, 2), 3)
    later = z.clone()
    later[:, :, 1:] = _latent((1, 32, 2, 2, 2), 4)
    earlier = z.clone()
    earlier[:, :, :1] += 1.0
    with torch.no_grad():
        video, video_later, video_earlier = ours.decode(z), ours.decode(later), ours.decode(earlier)
        alone = ours.decode(z[:, :, :1])
    assert alone.shape[2] == 1
    assert (video_later[:, :, :1] - video[:, :, :1]).abs().max().item() == 0.0
    assert (alone - video[:, :, :1]).abs().max().item() < 1e-5
    assert (video_later[:, :, 1:] - video[:, :, 1:]).abs().max().item() > 0.1  # later frames did change
    assert (video_earlier - video).abs().amax(dim=(0, 1, 3, 4)).min().item() > 0.01  # frame 0 reaches all
    x = _latent((1, 3, 5, 16, 16), 5)
    x_later = x.clone()
    x_later[:, :, 1:] = 0.0
    with torch.no_grad():
        assert torch.equal(ours.encode(x).mean[:, :, :1], ours.encode(x_later).mean[:, :, :1])


def test_decode_latents_divides_by_the_scaling_factor(ours: AutoencoderKLConv3D) -> None:
    latents = _latent((1, 32, 2, 2, 2), 6)
    with torch.no_grad():
        video = ours.decode_latents(latents)
        want = (ours.decode(latents / SCALE) / 2 + 0.5).clamp(0, 1)
    assert video.dtype == torch.float32 and video.shape == (1, 3, 5, 32, 32)
    assert (video - want).abs().max().item() < 1e-6
    assert 0.0 < (video == 1.0).float().mean().item() < 0.5  # clamped, but not everywhere
    assert (ours.latent_channels, ours.spatial_compression_ratio, ours.temporal_compression_ratio) == (
        32,
        16,
        4,
    )
    assert (
        ours.scaling_factor == TINY.scaling_factor == 1.03682
        and ours.shift_factor == TINY.shift_factor == 0.0
    )


# ---------------------------------------------------------------- tiling


def official_spatial_tiled_decode(
    decode: object, z: torch.Tensor, sample_size: int, overlap_factor: float, ratio: int = 16
) -> torch.Tensor:
    """The official `spatial_tiled_decode` rule, written out from its formulas (sizes in pixels).

    Tiles start every int(latent_tile * (1 - f)) cells; each decoded tile is blended in place,
    first with the finished tile above it (blend_v), then with the finished tile to its left
    (blend_h), over int(sample_size * f) pixels (fewer if a tile is shorter), then cropped to
    sample_size - that many and concatenated.
    """
    latent_tile = sample_size // ratio
    stride = int(latent_tile * (1 - overlap_factor))
    extent = int(sample_size * overlap_factor)
    limit = sample_size - extent
    height, width = z.shape[-2:]
    if height <= latent_tile and width <= latent_tile:
        return decode(z)
    rows = [
        [decode(z[..., i : i + latent_tile, j : j + latent_tile]).clone() for j in range(0, width, stride)]
        for i in range(0, height, stride)
    ]
    for i, row in enumerate(rows):
        for j, tile in enumerate(row):
            if i > 0:
                above, n = rows[i - 1][j], min(rows[i - 1][j].shape[-2], tile.shape[-2], extent)
                for y in range(n):
                    tile[..., y, :] = above[..., -n + y, :] * (1 - y / n) + tile[..., y, :] * (y / n)
            if j > 0:
                left, n = row[j - 1], min(row[j - 1].shape[-1], tile.shape[-1], extent)
                for x in range(n):
                    tile[..., x] = left[..., -n + x] * (1 - x / n) + tile[..., x] * (x / n)
    return torch.cat([torch.cat([t[..., :limit, :limit] for t in row], dim=-1) for row in rows], dim=-2)


def _tiling_for(sample_size: int, overlap_factor: float, ratio: int = 16) -> VaeTilingConfig:
    latent_tile = sample_size // ratio
    return VaeTilingConfig(
        tile_latent_size=latent_tile,
        tile_latent_overlap=int(latent_tile * overlap_factor),
        temporal=False,
        blend="sequential",
    )


def _context_free_decode(z: torch.Tensor) -> torch.Tensor:
    """A decoder without context: each latent cell becomes a 16 x 16 block, frame 0 one frame."""
    mixed = torch.einsum("oc,bcthw->bothw", torch.arange(96.0, dtype=z.dtype).reshape(3, 32).cos(), z)
    frames = torch.cat([mixed[:, :, :1], mixed[:, :, 1:].repeat_interleave(4, dim=2)], dim=2)
    return frames.repeat_interleave(16, dim=3).repeat_interleave(16, dim=4)


def _contextual_decode(z: torch.Tensor) -> torch.Tensor:
    """Adds the tile's mean: every tile decodes differently, so the blending weights all show."""
    return _context_free_decode(z) + z.mean() * torch.linspace(1, 2, z.shape[-1] * 16, dtype=z.dtype)


@pytest.mark.parametrize(
    ("height", "width", "sample_size", "factor"),
    [
        (45, 80, 256, 0.125),  # 720p, official on GPUs over 21 GiB
        (45, 80, 128, 0.25),  # 720p, official otherwise
        (30, 53, 256, 0.25),  # 480p, diffusers
        (16, 43, 256, 0.125),  # one tile high: tiled in H too, since W exceeds a tile
        (15, 29, 256, 0.125),  # short last tiles on both axes
        (17, 7, 128, 0.25),
    ],
)
def test_sequential_tiling_equals_the_official_rule(
    height: int, width: int, sample_size: int, factor: float
) -> None:
    """Every weight of the plan: a decoder whose tiles all differ; the official loops in float64."""
    z = _latent((1, 32, 2, height, width), 7)
    tiling = _tiling_for(sample_size, factor)
    want = official_spatial_tiled_decode(_contextual_decode, z.double(), sample_size, factor)
    tiles = tile_plan(tuple(z.shape), tiling, 4, 16)
    assert len(tiles) > 1 and all(tile.t.latent_stop == 2 for tile in tiles)  # spatial only
    got = tiled_decode(_contextual_decode, z, tiling, 4, 16)
    assert got.dtype == torch.float32 and got.shape == want.shape == (1, 3, 5, 16 * height, 16 * width)
    assert (got - want).abs().max().item() < 1e-5 * want.abs().max().item()
    assert (_context_free_decode(z.double()) - want).abs().max().item() > 1e-2  # the tiles did differ


def test_official_tilings_partition_unity_and_match_the_pipeline_choice() -> None:
    assert official_tiling(80 * 2**30) == OFFICIAL_TILING == _tiling_for(256, 0.125)
    assert official_tiling(21 * 2**30) == official_tiling(16 * 2**30) == OFFICIAL_SMALL_GPU_TILING
    assert _tiling_for(128, 0.25) == OFFICIAL_SMALL_GPU_TILING
    assert _tiling_for(256, 0.25) == DIFFUSERS_TILING
    for tiling in (OFFICIAL_TILING, OFFICIAL_SMALL_GPU_TILING, DIFFUSERS_TILING):
        for height, width in ((45, 80), (30, 53), (15, 29), (80, 45)):
            tiles = tile_plan((1, 32, 31, height, width), tiling, 4, 16)
            stride = tiling.tile_latent_size - tiling.tile_latent_overlap
            assert sorted({t.h.latent_start for t in tiles}) == list(range(0, height, stride))
            total = torch.zeros(1, 1, 1, 16 * height, 16 * width)
            for tile in tiles:
                assert tile.t.out_stop == 121 and tile.blend == "sequential"
                add_tile(
                    total, sequential_weights(tile.h, tile.w, torch.device("cpu"))[None, None, None], tile
                )
            assert (total - 1).abs().max().item() < 1e-6, (tiling, height, width)


def test_bottom_band_ramps_are_squared() -> None:
    tiles = tile_plan((1, 32, 1, 6, 6), _tiling_for(64, 0.25), 4, 16)  # stride 3: 2 x 2 tiles
    first = tiles[0]
    weights = sequential_weights(first.h, first.w, torch.device("cpu"))
    band = blend_weights(first.h, torch.device("cpu"))[-1]
    assert first.h.ramp_out == first.w.ramp_out == 16
    assert torch.allclose(weights[-1], band * blend_weights(first.w, torch.device("cpu"), squared=True))
    assert weights[-1, -1].item() == pytest.approx(band.item() * (1 - (15 / 16) ** 2))
    assert weights[0, -1].item() == pytest.approx(1 / 16)  # outside the band: the plain ramp


@pytest.mark.parametrize("shape", [(1, 32, 2, 5, 7), (1, 32, 3, 4, 6)])
def test_tiled_decode_equals_official_rule_and_diffusers(
    ours: AutoencoderKLConv3D, reference: AutoencoderKLHunyuanVideo15, shape: tuple[int, ...]
) -> None:
    """64 px tiles over 1/4 (stride 3 cells): 2 x 3 and 2 x 2 tiles, short last ones."""
    z = _latent(shape, 8)
    tiling = _tiling_for(64, 0.25)
    with torch.no_grad():
        got = ours.decode_latents(z * SCALE, tiling)
        official = official_spatial_tiled_decode(ours.decode, z, 64, 0.25)
        untiled = ours.decode(z)
        reference.enable_tiling(
            tile_sample_min_height=64, tile_sample_min_width=64, tile_latent_min_height=4,
            tile_latent_min_width=4, tile_overlap_factor=0.25,
        )  # fmt: skip
        try:
            ref_tiled = reference.decode(z).sample
        finally:
            reference.disable_tiling()
    assert len(tile_plan(tuple(z.shape), tiling, 4, 16)) > 3
    assert got.shape == official.shape == ref_tiled.shape == untiled.shape
    assert (got - (official / 2 + 0.5).clamp(0, 1)).abs().max().item() < 1e-5
    assert _rel(official, ref_tiled) <= PARITY_REL_TOL
    assert _rel(official, untiled) > 0.05  # the tiles really see less than the whole latent


def test_decode_latents_refuses_temporal_tiling(ours: AutoencoderKLConv3D) -> None:
    with pytest.raises(ValueError, match="temporal=False"):
        ours.decode_latents(_latent((1, 32, 2, 2, 2), 9), VaeTilingConfig())
    untiled = ours.decode_latents(_latent((1, 32, 2, 2, 2), 9), VaeTilingConfig(enabled=False))
    assert untiled.shape == (1, 3, 5, 32, 32)


def test_tiling_config_rejects_unknown_blend() -> None:
    with pytest.raises(ValueError, match="blend='cubic'"):
        VaeTilingConfig(blend="cubic")


# ---------------------------------------------------------------- configs and loading


def test_configs_of_both_layouts_read_back() -> None:
    full = HunyuanVideo15VaeConfig.full()
    assert HunyuanVideo15VaeConfig.from_official_config(full.to_official_config()) == full
    assert HunyuanVideo15VaeConfig.from_diffusers_config(full.to_diffusers_config()) == full
    assert (
        HunyuanVideo15VaeConfig.from_diffusers_config({"_class_name": "AutoencoderKLHunyuanVideo15"}) == full
    )
    official = full.to_official_config() | {"_diffusers_version": "0.35.0", "shift_factor": None}
    assert HunyuanVideo15VaeConfig.from_official_config(official) == full
    assert HunyuanVideo15VaeConfig.from_diffusers_config(TINY.to_diffusers_config()) == TINY


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"shift_factor": 0.1}, "shift_factor=0.1"),
        ({"downsample_match_channel": False}, "downsample_match_channel=False"),
        ({"use_magic": True}, r"unknown keys \['use_magic'\]"),
        ({"_class_name": "AutoencoderKLHunyuanVideo15"}, "expected 'AutoencoderKLConv3D'"),
        ({"ffactor_spatial": 32}, "spatial_compression_ratio=32"),
        ({"ffactor_temporal": 3}, "powers of two"),
        ({"latent_channels": 48}, "multiple of 2 \\* latent_channels"),
        ({"block_out_channels": [128, 256, 500, 1024, 1024]}, "encoder level 1 cannot pixel-unshuffle"),
    ],
)
def test_official_config_rejects_what_is_not_built(change: dict[str, object], words: str) -> None:
    with pytest.raises(ValueError, match=words):
        HunyuanVideo15VaeConfig.from_official_config(
            HunyuanVideo15VaeConfig.full().to_official_config() | change
        )


def test_official_layout_loads_by_its_names(tmp_path: Path, ours: AutoencoderKLConv3D) -> None:
    state = {k: v.clone() for k, v in ours.state_dict().items()}
    assert "encoder.down.0.block.0.norm1.gamma" in state and "decoder.up.1.upsample.conv.conv.weight" in state
    folder = _write_official(tmp_path / "ckpts" / "vae", state, TINY.to_official_config())
    model, ckpt = inspect_vae(folder.parent)  # a model root holding vae/ works too
    assert ckpt.layout == "official" and "official" in ckpt.format_name
    assert all(p.is_meta for p in model.parameters()) and set(ckpt.shapes) == set(state)
    loaded = load_vae(folder, dtype=torch.float32)
    assert loaded.config == ours.config
    z, x = _latent((1, 32, 2, 2, 3), 11), _latent((1, 3, 5, 32, 16), 12)
    with torch.no_grad():
        assert torch.equal(loaded.decode(z), ours.decode(z))
        assert torch.equal(loaded.encode(x).mean, ours.encode(x).mean)


def test_sharded_diffusers_layout_loads(tmp_path: Path, reference: AutoencoderKLHunyuanVideo15) -> None:
    reference.save_pretrained(tmp_path, max_shard_size="200KB")
    assert (tmp_path / "diffusion_pytorch_model.safetensors.index.json").is_file()
    model = load_vae(tmp_path, dtype=torch.bfloat16)
    assert not model.training and model.dtype == torch.bfloat16
    assert all(not p.requires_grad for p in model.parameters())
    names = diffusers_names(list(model.state_dict()))
    for key, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[names[key]], value.to(torch.bfloat16)), key


def test_missing_unexpected_and_misshapen_keys_are_named(tmp_path: Path, ours: AutoencoderKLConv3D) -> None:
    state = {k: v.clone() for k, v in ours.state_dict().items()}
    del state["decoder.conv_out.conv.bias"]
    state["decoder.extra.weight"] = torch.ones(2)
    state["encoder.mid.attn_1.q.weight"] = torch.ones(64, 64)
    _write_official(tmp_path, state, TINY.to_official_config())
    with pytest.raises(ValueError, match=r"official HunyuanVideo-1\.5") as info:
        load_vae(tmp_path)
    message = str(info.value)
    assert "1 missing keys: decoder.conv_out.conv.bias" in message
    assert "1 unexpected keys: decoder.extra.weight" in message
    assert "encoder.mid.attn_1.q.weight (checkpoint (64, 64), model (64, 64, 1, 1, 1))" in message
    assert str(tmp_path / "diffusion_pytorch_model.safetensors") in message


def test_diffusers_keys_are_named_in_diffusers_terms(tmp_path: Path, diffusers_dir: Path) -> None:
    (tmp_path / "config.json").write_text((diffusers_dir / "config.json").read_text())
    state = dict(AutoencoderKLHunyuanVideo15(**_diffusers_kwargs(TINY)).state_dict())
    del state["decoder.mid_block.attentions.0.to_q.bias"]
    save_file(state, tmp_path / "diffusion_pytorch_model.safetensors")
    with pytest.raises(ValueError, match="diffusers AutoencoderKLHunyuanVideo15") as info:
        load_vae(tmp_path)
    assert "1 missing keys: decoder.mid_block.attentions.0.to_q.bias" in str(info.value)


def test_names_of_the_other_layout_get_a_hint(tmp_path: Path, diffusers_dir: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(TINY.to_official_config()))
    (tmp_path / "diffusion_pytorch_model.safetensors").write_bytes(
        (diffusers_dir / "diffusion_pytorch_model.safetensors").read_bytes()
    )
    with pytest.raises(ValueError, match=r"the tensors use diffusers' names, but .* is an official config"):
        load_vae(tmp_path)


def test_wrong_family_and_unknown_layouts_are_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKLCausal3D"}))
    (tmp_path / "pytorch_model.pt").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"HunyuanVideo 1\.0 VAE"):
        load_vae(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(ValueError, match=r"unknown VAE layout .* Found: pytorch_model.pt"):
        load_vae(tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        load_vae(tmp_path / "missing")


def test_random_vae_is_seeded() -> None:
    a, b, c = random_vae(TINY, seed=1), random_vae(TINY, seed=1), random_vae(TINY, seed=2)
    key = "decoder.conv_in.conv.weight"
    assert torch.equal(a.state_dict()[key], b.state_dict()[key])
    assert not torch.equal(a.state_dict()[key], c.state_dict()[key])
    half = random_vae(TINY, seed=1, dtype=torch.float16)
    assert half.dtype == torch.float16 and not half.training
