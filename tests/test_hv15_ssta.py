"""SSTA of the sparse HunyuanVideo-1.5 checkpoints: the selection against a direct transcription of
the official one, the kernel against dense attention under the same block mask (built densely here,
only here), text in full, the attention mode per checkpoint, the model wired to it."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from safetensors.torch import save_file

from hvbatch.config_checks import CHOICES
from hvbatch.models.attention import LocalAttention
from hvbatch.models.attention_backends import AttentionBackend
from hvbatch.models.hunyuan_video_15.config import HunyuanVideo15TransformerConfig
from hvbatch.models.hunyuan_video_15.transformer_loading import load_transformer, random_transformer
from hvbatch.models.ssta import SstaParams, TilePlan, select_tiles, tile_means, tile_sums
from hvbatch.models.ssta_attention import (
    ATTENTION_MODES,
    SstaAttention,
    configure_attention,
    resolve_attention_mode,
    ssta_full_grid,
)
from tests.helpers import rel_err
from tests.hv15_helpers import SMALL, make_inputs
from tests.hv15_ssta_worker import TEST_PARAMS
from tests.test_compile import sync_calls  # noqa: F401 (the fixture)

DEFAULT = AttentionBackend("default")
OFFICIAL_ATTN_PARAM = {  # the official model's default `attn_param`
    "win_size": [[3, 3, 3]], "win_type": "fixed", "win_ratio": 10, "tile_size": [6, 8, 8],
    "ssta_topk": 64, "ssta_threshold": 0.0, "ssta_lambda": 0.7, "ssta_sampling_type": "importance",
    "ssta_adaptive_pool": None, "attn_sparse_type": "ssta", "attn_pad_type": "zero",
    "attn_use_text_mask": 1, "attn_mask_share_within_head": 0,
}  # fmt: skip
OFFICIAL_TILE_TOPK = SstaParams(sparse_type="block_attn", topk=8)
"""The official (6, 8, 8) tiles with a top-k small enough to leave tiles out of a small grid."""
CASES = {
    # name: (params, grid): padded in t and w; divisible (no padding); one frame (the one-frame tile
    # (1, 4, 4), window 1); more than 31 frames (top-k not halved); the official tile, 12 tiles.
    "pad-t-w": (TEST_PARAMS, (5, 6, 9)),
    "divisible": (TEST_PARAMS, (4, 4, 8)),
    "one-frame": (TEST_PARAMS, (1, 9, 10)),
    "long": (TEST_PARAMS, (33, 3, 4)),
    "official-tile": (OFFICIAL_TILE_TOPK, (7, 9, 17)),
}


# --- the official selection, transcribed (ssta_attention.py / attention.py, Tencent-Hunyuan/HunyuanVideo-1.5)
def official_choices(params: SstaParams, thw: tuple[int, int, int]) -> tuple[list[int], list[int], int]:
    """`sequence_parallel_attention`'s flex-block-attn branch: one-frame tile and window, top-k // 2."""
    tile, win, topk = list(params.tile), list(params.window), params.topk
    if thw[0] == 1:
        tile = {384: [1, 16, 24], 128: [1, 16, 8], 64: [1, 8, 8], 16: [1, 4, 4]}[math.prod(tile)]
        win = [1, 1, 1]
    elif thw[0] <= 31:
        topk = topk // 2
    return tile, win, topk


def official_tiled(x: torch.Tensor, thw: tuple[int, int, int], tile: list[int]) -> torch.Tensor:
    """`ssta_3d_attention`'s zero padding (t, then h, then w) and `tile()`."""
    b, hd, _, d = x.shape
    t, h, w = thw
    x = x.reshape(b, hd, t, h, w, d)
    for axis, (size, step) in enumerate(zip(thw, tile, strict=True)):
        if size % step:
            shape = list(x.shape)
            shape[2 + axis] = step - size % step
            x = torch.cat([x, torch.zeros(shape, dtype=x.dtype)], dim=2 + axis)
    nt, nh, nw = (x.shape[2] // tile[0], x.shape[3] // tile[1], x.shape[4] // tile[2])
    return rearrange(
        x.reshape(b, hd, -1, d),
        "b h (n_t ts_t n_h ts_h n_w ts_w) d -> b h (n_t n_h n_w ts_t ts_h ts_w) d",
        n_t=nt, n_h=nh, n_w=nw, ts_t=tile[0], ts_h=tile[1], ts_w=tile[2],
    )  # fmt: skip


def official_sta(canvas: tuple[int, ...], tile: list[int], kernel: list[int]) -> torch.Tensor:
    """`create_sta_3d_mask_optimize`."""
    num = [c // t for c, t in zip(canvas, tile, strict=True)]
    blocks = num[0] * num[1] * num[2]
    i, j = np.meshgrid(np.arange(blocks), np.arange(blocks), indexing="ij")
    q = (i // (num[1] * num[2]), (i % (num[1] * num[2])) // num[2], i % num[2])
    kv = (j // (num[1] * num[2]), (j % (num[1] * num[2])) // num[2], j % num[2])
    mask = np.ones_like(i, dtype=bool)
    for axis in range(3):
        centre = np.clip(q[axis], kernel[axis] // 2, (num[axis] - 1) - kernel[axis] // 2)
        mask &= np.abs(centre - kv[axis]) <= kernel[axis] // 2
    return torch.tensor(mask)


def official_moba(
    q: torch.Tensor, k: torch.Tensor, thw: tuple[int, ...], topk: int, tile: list[int], lam: float
):
    """`create_moba_3d_mask` + `importance_sampling` for one sample (tiled q, k), heads kept apart."""
    b, hd, _, d = k.shape
    n = [math.ceil(c / t) for c, t in zip(thw, tile, strict=True)]

    def means(x: torch.Tensor) -> torch.Tensor:
        x = x.view(b, hd, n[0], n[1], n[2], tile[0], tile[1], tile[2], d)
        return x.mean(dim=(-2, -3, -4)).view(b, hd, -1, d).type(torch.float32)

    qm, km = means(q), means(k)
    qm = qm / qm.norm(dim=-1, keepdim=True)
    km = km / km.norm(dim=-1, keepdim=True)
    similarity = (torch.einsum("bhsd,bhkd->bhsk", qm, km) + 1.0) / 2.0
    unique = (torch.einsum("bhsd,bhkd->bhsk", km, km) + 1.0) / 2.0
    diag = torch.arange(km.shape[2])
    unique[:, :, diag, diag] = torch.nan
    scores = lam * similarity - (1 - lam) * torch.nanmean(unique, dim=-2, keepdim=True)
    top = scores.topk(k=min(topk, scores.size(-1)), dim=-1, sorted=False)[1][0]
    blocks = qm.shape[2]
    return torch.stack(
        [torch.zeros(blocks, blocks, dtype=torch.bool).scatter_(-1, top[h], True) for h in range(hd)]
    )


def official_selection(params: SstaParams, q: torch.Tensor, k: torch.Tensor, thw: tuple[int, int, int]):
    """`[B, H, N, N]`: per sample, the SSTA / STA / block-attention block mask over the image tiles."""
    tile, win, topk = official_choices(params, thw)
    q_t, k_t = official_tiled(q, thw, tile), official_tiled(k, thw, tile)
    canvas = tuple(math.ceil(c / t) * t for c, t in zip(thw, tile, strict=True))
    masks = []
    for i in range(q.shape[0]):
        moba = official_moba(q_t[i : i + 1], k_t[i : i + 1], thw, topk, tile, params.importance_lambda)
        sta = official_sta(canvas, tile, win)
        mask = {"ssta": sta[None] | moba, "sta": sta[None].expand_as(moba), "block_attn": moba}
        masks.append(mask[params.sparse_type])
    return torch.stack(masks)


# --- dense attention under the same block mask, built densely (test only)
def dense_reference(
    plan: TilePlan, selected: torch.Tensor, qkv: list[torch.Tensor], text: list[torch.Tensor]
):
    """Zero-padded grid (flat t, h, w order) + text, a token mask from the tile selection, float64."""
    (t, h, w), (pt, ph, pw) = plan.grid, plan.padded
    b, hd, _, d = qkv[0].shape
    padded = [
        F.pad(x.double().reshape(b, hd, t, h, w, d), (0, 0, 0, pw - w, 0, ph - h, 0, pt - t)).reshape(
            b, hd, -1, d
        )
        for x in qkv
    ]
    pos = torch.arange(pt * ph * pw)
    ti, hi, wi = pos // (ph * pw), (pos // pw) % ph, pos % pw
    (tt, th, tw), (_, nh, nw) = plan.tile, plan.counts
    tile_of = ((ti // tt) * nh + hi // th) * nw + wi // tw
    real = (ti < t) & (hi < h) & (wi < w)
    size, num_text = len(pos), text[0].shape[2]
    mask = torch.ones(b, hd, size + num_text, size + num_text, dtype=torch.bool)
    mask[:, :, :size, :size] = selected[:, :, tile_of][:, :, :, tile_of]
    q, k, v = (torch.cat([p, x.double()], dim=2) for p, x in zip(padded, text, strict=True))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out[:, :, :size][:, :, real], out[:, :, size:]


def _random(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _qkv(grid: tuple[int, int, int], heads: int, seed: int, batch: int = 2, num_text: int = 5):
    image = [_random((batch, heads, math.prod(grid), 16), seed + i) for i in range(3)]
    text = [_random((batch, heads, num_text, 16), seed + 3 + i) for i in range(3)]
    return image, text


@pytest.mark.parametrize("name", list(CASES))
def test_selection_equals_the_official_transcription(name: str) -> None:
    params, grid = CASES[name]
    plan = params.plan(grid)
    for sparse_type in ("ssta", "sta", "block_attn"):
        typed = SstaParams(sparse_type, params.tile, params.window, params.topk, params.importance_lambda)
        (q, k, _), _ = _qkv(grid, heads=3, seed=1)
        expected = official_selection(typed, q, k, grid)
        seen: list[torch.Tensor] = []
        ssta_full_grid(
            typed.plan(grid), q, k, k, None, DEFAULT, "portable", lambda _p, s, out=seen: out.append(s)
        )
        assert torch.equal(seen[0], expected), (name, sparse_type)
        # The ring path's tile sums (two partial ranges added) select the same tiles.
        typed_plan = typed.plan(grid)
        cut = plan.num_tokens // 3
        sums = [
            tile_sums(typed_plan, x[:, :, :cut]) + tile_sums(typed_plan, x[:, :, cut:], cut) for x in (q, k)
        ]
        means = [tile_means(typed_plan, s, q.dtype) for s in sums]
        assert torch.equal(select_tiles(typed_plan, *means), expected), (name, sparse_type)
    selected = official_selection(params, q, k, grid)
    assert not selected.all(), "the case leaves tiles out"


@pytest.mark.parametrize("name", list(CASES))
def test_ssta_equals_dense_attention_under_the_block_mask(name: str) -> None:
    params, grid = CASES[name]
    plan = params.plan(grid)
    heads = 2 if name == "official-tile" else 3
    (q, k, v), text = _qkv(grid, heads, seed=7, batch=1 if name == "official-tile" else 2)
    seen: list[torch.Tensor] = []
    img, txt = ssta_full_grid(plan, q, k, v, tuple(text), DEFAULT, "portable", lambda _p, s: seen.append(s))
    assert torch.equal(seen[0], official_selection(params, q, k, grid))
    ref_img, ref_txt = dense_reference(plan, seen[0], [q, k, v], text)
    assert rel_err(img, ref_img) <= 1e-5 and rel_err(txt, ref_txt) <= 1e-5, (rel_err(img, ref_img), name)
    # Without text: the image queries alone (no log-sum-exp merge).
    img_only, none = ssta_full_grid(plan, q, k, v, None, DEFAULT, "portable")
    empty = [x[:, :, :0] for x in text]
    assert none is None and rel_err(img_only, dense_reference(plan, seen[0], [q, k, v], empty)[0]) <= 1e-5


def test_text_attends_and_is_attended_in_full() -> None:
    params, grid = CASES["pad-t-w"]
    plan = params.plan(grid)
    (q, k, v), text = _qkv(grid, heads=2, seed=3)
    img, txt = ssta_full_grid(plan, q, k, v, tuple(text), DEFAULT, "portable")
    # Text queries: every image token (zero-padded ones included, as in the official layout) and text.
    everything = torch.ones(q.shape[0], q.shape[1], plan.num_tiles, plan.num_tiles, dtype=torch.bool)
    assert rel_err(txt, dense_reference(plan, everything, [q, k, v], text)[1]) <= 1e-5
    # Image queries: every text key (a change in the last text value reaches every image token).
    text[2][:, :, -1] += 1.0
    img_2, _ = ssta_full_grid(plan, q, k, v, tuple(text), DEFAULT, "portable")
    assert bool(((img_2 - img).abs().amax(-1) > 1e-6).all())


class DenseMaskedAttention:
    """Test-only attention_fn: the official selection and a dense token mask (L x L), float64."""

    def __init__(self, params: SstaParams) -> None:
        self.params, self.grid = params, None

    def set_grid(self, grid: tuple[int, int, int]) -> None:
        self.grid = grid

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, num_text_tokens: int = 0):
        num_image = q.shape[1] - num_text_tokens
        qkv = [x.transpose(1, 2) for x in (q, k, v)]
        selected = official_selection(
            self.params, qkv[0][:, :, :num_image], qkv[1][:, :, :num_image], self.grid
        )
        img, txt = dense_reference(
            self.params.plan(self.grid),
            selected,
            [x[:, :, :num_image] for x in qkv],
            [x[:, :, num_image:] for x in qkv],
        )
        return torch.cat([img, txt], dim=2).transpose(1, 2).to(q.dtype)


def test_model_runs_ssta_through_its_attention_fn(sync_calls: list[str]) -> None:  # noqa: F811
    """The tiny model with SSTA equals it with dense masked attention (ragged text lengths: one call per
    sample), differs from dense attention, and never waits for the device."""
    model = random_transformer(HunyuanVideo15TransformerConfig.tiny(), seed=2)
    inputs = make_inputs(model.config, grid=(5, 6, 9), text_lens=[9, 4], glyph_lens=[3, 0], image=False)
    cond = inputs.cond()  # (reads the lengths once, outside the forward)
    outputs = {}
    for name, fn in [
        ("ssta", SstaAttention(TEST_PARAMS, DEFAULT, kernel="portable")),
        ("masked", DenseMaskedAttention(TEST_PARAMS)),
        ("dense", LocalAttention(DEFAULT)),
    ]:
        model.attention_fn = fn
        sync_calls.clear()
        with torch.no_grad():
            outputs[name] = model(inputs.x, inputs.t, cond)
        if name == "ssta":
            assert sync_calls == [] and fn.grid == (5, 6, 9)
    assert rel_err(outputs["ssta"], outputs["masked"]) <= 1e-5
    assert rel_err(outputs["ssta"], outputs["dense"]) > 1e-2


def test_official_parameters() -> None:
    assert SstaParams.from_official(None) == SstaParams.from_official(OFFICIAL_ATTN_PARAM) == SstaParams()
    assert SstaParams() == SstaParams("ssta", (6, 8, 8), (3, 3, 3), 64, 0.7)
    plan = SstaParams().plan((31, 45, 80))  # 720p x 121 frames
    assert (plan.counts, plan.topk, plan.num_tiles, plan.max_slots, plan.min_slots) == (
        (6, 6, 10),
        32,
        360,
        59,
        32,
    )
    assert SstaParams().plan((32, 45, 80)).topk == 64 and SstaParams().plan((1, 45, 80)).tile == (1, 16, 24)
    for key, value in [
        ("win_type", "hybrid"),
        ("ssta_sampling_type", "similarity"),
        ("attn_pad_type", "repeat"),
    ]:
        with pytest.raises(ValueError, match=rf"{key}={value!r}.*model.attention_mode=dense"):
            SstaParams.from_official({**OFFICIAL_ATTN_PARAM, key: value}, "x/config.json")
    with pytest.raises(ValueError, match=r"win_size=\[2, 3, 3\] must be 3 odd sizes"):
        SstaParams.from_official({"win_size": [[2, 3, 3]]})


def test_attention_mode_follows_the_checkpoint(tmp_path: Path) -> None:
    assert CHOICES["model.attention_mode"] == ATTENTION_MODES
    config = SMALL  # official-compatible widths
    weights = {k: v.contiguous() for k, v in random_transformer(config, seed=0).state_dict().items()}
    custom = {**OFFICIAL_ATTN_PARAM, "ssta_topk": 16}
    for version, meta in [
        ("720p_i2v_distilled_sparse", {"attn_mode": "flex-block-attn", "attn_param": custom}),
        ("720p_i2v_distilled", {"attn_mode": "flash"}),
    ]:
        folder = tmp_path / version
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(config.to_official_config(**meta)))
        save_file(weights, folder / "model.safetensors")
    sparse = load_transformer(tmp_path / "720p_i2v_distilled_sparse", dtype=torch.float32)
    dense = load_transformer(tmp_path / "720p_i2v_distilled", dtype=torch.float32)
    assert sparse.checkpoint_facts.sparse_attention and not dense.checkpoint_facts.sparse_attention
    assert resolve_attention_mode("auto", sparse.checkpoint_facts) == SstaParams(topk=16)
    assert resolve_attention_mode("auto", dense.checkpoint_facts) is None
    assert resolve_attention_mode("dense", sparse.checkpoint_facts) is None
    assert resolve_attention_mode("ssta", dense.checkpoint_facts) == SstaParams()
    assert resolve_attention_mode("ssta", None) == SstaParams()  # random weights
    assert configure_attention(sparse, "auto", DEFAULT).startswith("ssta (tile (6, 8, 8)")
    assert isinstance(sparse.attention_fn, SstaAttention) and sparse.attention_fn.params.topk == 16
    assert configure_attention(dense, "auto", DEFAULT) == "dense"
    assert isinstance(dense.attention_fn, LocalAttention)
    with pytest.raises(ValueError, match=r"model.attention_mode='sparse' is not one of auto, dense, ssta"):
        resolve_attention_mode("sparse", None)


def test_ssta_phase_cpu_smoke() -> None:
    """benchmarks/ssta_phase.py's function (gpu_check's SSTA phase) runs on the CPU at tiny sizes."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "ssta_phase.py"
    spec = importlib.util.spec_from_file_location("ssta_phase", script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    record = module.ssta_phase(
        device="cpu", dtype=torch.float32, grid=(5, 6, 9), heads=2, head_dim=16, text_tokens=8,
        params=TEST_PARAMS, repeats=1, budget_s=30.0,
    )  # fmt: skip
    assert (record["tiles"], record["topk"], record["tiles_per_query_max"]) == (27, 2, 11)
    assert record["tile_share_min"] <= record["attended_tile_share"] <= record["tile_share_max"]
    assert record["dense_ms"] > 0 and record["portable"]["ms"] > 0 and "official" not in record
    bounds = module.share_bounds(module.GRID_720P)
    assert (bounds["tiles"], bounds["topk"], bounds["tile_share_max"]) == (360, 32, round(59 / 360, 4))
