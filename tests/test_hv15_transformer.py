"""The HunyuanVideo-1.5 transformer: parity with diffusers' HunyuanVideo15Transformer3DModel on the same
random weights, both checkpoint layouts, padding, the step cache, the 8.3B shapes, loader errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import HunyuanVideo15Transformer3DModel
from safetensors.torch import load_file, save_file

from hvbatch.models.hunyuan_video_15.conditioning import HunyuanVideo15Conditioning
from hvbatch.models.hunyuan_video_15.config import HunyuanVideo15TransformerConfig
from hvbatch.models.hunyuan_video_15.transformer import HunyuanVideo15Transformer
from hvbatch.models.hunyuan_video_15.transformer_loading import (
    inspect_transformer,
    load_transformer,
    random_transformer,
)
from hvbatch.models.hunyuan_video_15.transformer_names import official_to_diffusers
from hvbatch.sampling.cache import CachePolicy, StepCache
from tests.helpers import rel_err
from tests.hv15_helpers import ODD, SMALL, Inputs, make_inputs, randomize_fan_in_
from tests.test_compile import sync_calls  # noqa: F401 (the fixture)

FLAVORS = {
    "small": SMALL,
    "small-meanflow": SMALL.with_changes(use_meanflow=True),
    "odd": ODD,
}


def _diffusers_model(config: HunyuanVideo15TransformerConfig, seed: int) -> HunyuanVideo15Transformer3DModel:
    kwargs = config.to_diffusers_config()
    kwargs.pop("_class_name")
    return randomize_fan_in_(HunyuanVideo15Transformer3DModel(**kwargs), seed).eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, torch.nn.Module]]:
    """Each flavor saved by diffusers' save_pretrained as a diffusers model root (`<root>/transformer`)."""
    out = {}
    for seed, (name, config) in enumerate(FLAVORS.items()):
        reference = _diffusers_model(config, seed)
        root = tmp_path_factory.mktemp(name)
        reference.save_pretrained(root / "transformer")
        out[name] = (root, reference)
    return out


def _reference(reference: torch.nn.Module, inputs: Inputs) -> torch.Tensor:
    with torch.no_grad():
        return reference(**inputs.diffusers_kwargs(reference.config.use_meanflow))[0]


def _ours(model: HunyuanVideo15Transformer, inputs: Inputs, **kwargs: object) -> torch.Tensor:
    with torch.no_grad():
        return model(inputs.x, inputs.t, inputs.cond(), t_next_B=inputs.t_next, **kwargs)  # type: ignore[arg-type]


CASES = [
    # (flavor, latent grid (T, H, W), LLM lengths of 9, byT5 lengths of 6, image-to-video)
    ("small", (3, 5, 7), [7, 4], [3, 0], False),  # batch 2, both streams padded differently, odd grid
    ("small", (3, 5, 7), [7, 4], [3, 0], True),  # the same with image tokens and condition latents
    ("small", (1, 3, 3), [9], [6], True),  # batch 1, nothing padded
    ("small", (2, 2, 5), [2, 9], [0, 0], False),  # no glyph text at all
    ("small-meanflow", (3, 5, 7), [5, 8], [6, 1], True),
    ("small-meanflow", (2, 3, 1), [1, 9], [0, 4], False),
    ("odd", (3, 1, 5), [3, 6], [1, 2], False),  # 3 heads of 8, one block, one refiner block
    ("odd", (2, 5, 3), [8, 8], [5, 5], True),  # equal lengths: one attention call for the batch
]


@pytest.mark.parametrize(("flavor", "grid", "text_lens", "glyph_lens", "image"), CASES)
def test_matches_diffusers(
    saved: dict[str, tuple[Path, torch.nn.Module]],
    flavor: str,
    grid: tuple[int, int, int],
    text_lens: list[int],
    glyph_lens: list[int],
    image: bool,
) -> None:
    root, reference = saved[flavor]
    model = load_transformer(root, dtype=torch.float32)
    assert model.checkpoint_format == "HunyuanVideo-1.5 diffusers folder"
    assert model.config == FLAVORS[flavor]
    assert model.checkpoint_facts.use_meanflow == FLAVORS[flavor].use_meanflow
    inputs = make_inputs(model.config, grid=grid, text_lens=text_lens, glyph_lens=glyph_lens, image=image)
    assert inputs.cond().is_text_to_video is not image  # zero embeds with mask_type t2v: dropped
    ours, ref = _ours(model, inputs), _reference(reference, inputs)
    assert ours.shape == inputs.x.shape == ref.shape
    assert ref.std() > 0.3
    assert rel_err(ours, ref) <= 1e-5, rel_err(ours, ref)


def test_every_input_stream_matters(saved: dict[str, tuple[Path, torch.nn.Module]]) -> None:
    """Image tokens, byT5 tokens, condition latents and (MeanFlow) the next timestep all change the output."""
    model = load_transformer(saved["small-meanflow"][0], dtype=torch.float32)
    inputs = make_inputs(model.config, grid=(2, 3, 3), text_lens=[6], glyph_lens=[4], image=True)
    base = _ours(model, inputs)
    variants = {
        "image embeds": dict(image_embeds=inputs.image_embeds.flip(-1)),  # (a shift: the LayerNorm drops it)
        "glyph states": dict(glyph_states=inputs.glyph_states.flip(1)),
        "condition latents": dict(cond_latents=inputs.cond_latents * 2.0),
        "next timestep": dict(t_next=inputs.t_next + 100.0),
    }
    for name, change in variants.items():
        changed = Inputs(**{**vars(inputs), **change})
        assert rel_err(_ours(model, changed), base) > 1e-3, name


def test_official_text_to_video_rule() -> None:
    """Zero image embeds: dropped under mask_type t2v (official and diffusers), attended under i2v
    (official only; diffusers decides on the zeros alone)."""
    model = random_transformer(SMALL, seed=3)
    inputs = make_inputs(SMALL, grid=(1, 2, 3), text_lens=[5], glyph_lens=[2], image=False)
    args = (inputs.text_states, inputs.text_mask, inputs.glyph_states, inputs.glyph_mask, inputs.image_embeds)
    t2v = HunyuanVideo15Conditioning.from_masks(*args, mask_type="t2v")
    i2v = HunyuanVideo15Conditioning.from_masks(*args, mask_type="i2v")
    assert t2v.image_embeds is None and i2v.image_embeds is not None
    with torch.no_grad():
        dropped = model(inputs.x, inputs.t, t2v)
        attended = model(inputs.x, inputs.t, i2v)
        none = model(inputs.x, inputs.t, HunyuanVideo15Conditioning.from_masks(*args[:4]))
    assert torch.equal(dropped, none)
    assert rel_err(attended, dropped) > 1e-3


def test_padding_never_changes_the_output() -> None:
    """Garbage in padded positions, and longer padding, give bit-identical outputs; a sample in a
    padded batch equals the sample alone."""
    model = random_transformer(SMALL, seed=4)
    inputs = make_inputs(SMALL, grid=(2, 3, 5), text_lens=[3, 8], glyph_lens=[5, 1], image=True)
    base = _ours(model, inputs)
    garbage = Inputs(**vars(inputs))
    garbage.text_states = inputs.text_states.clone()
    garbage.text_states[0, 3:] = 1e3
    garbage.glyph_states = inputs.glyph_states.clone()
    garbage.glyph_states[1, 1:] = -1e3
    assert torch.equal(_ours(model, garbage), base)
    longer = Inputs(**vars(inputs))
    longer.text_states = torch.cat([inputs.text_states, torch.randn(2, 4, SMALL.text_dim)], dim=1)
    longer.text_mask = torch.cat([inputs.text_mask, torch.zeros(2, 4, dtype=torch.long)], dim=1)
    assert torch.equal(_ours(model, longer), base)
    for b in range(2):
        alone = Inputs(**{k: v[b : b + 1] for k, v in vars(inputs).items()})
        assert rel_err(_ours(model, alone), base[b : b + 1]) <= 1e-6


def test_attention_sees_packed_valid_tokens_only() -> None:
    """Batch 2: one call per sample over image + its own valid condition tokens, no mask argument."""
    model = random_transformer(SMALL, seed=5)
    inputs = make_inputs(SMALL, grid=(1, 2, 3), text_lens=[4, 9], glyph_lens=[2, 0], image=True)
    seen: list[tuple[tuple[int, ...], int]] = []

    def recording_attention(q, k, v, *, num_text_tokens=0):  # type: ignore[no-untyped-def]
        seen.append((tuple(q.shape), num_text_tokens))
        return torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        ).transpose(1, 2)

    model.attention_fn = recording_attention
    _ours(model, inputs)
    # 5 image-encoder tokens + glyph + LLM tokens per sample, after the 6 image tokens.
    assert seen == [((1, 6 + 5 + 2 + 4, 4, 16), 11), ((1, 6 + 5 + 0 + 9, 4, 16), 14)] * 2


@pytest.mark.parametrize("mode", ["fbcache", "teacache"])
def test_step_cache_with_threshold_zero_is_bit_identical(mode: str) -> None:
    model = random_transformer(SMALL.with_changes(use_meanflow=True), seed=6)
    inputs = make_inputs(model.config, grid=(2, 3, 3), text_lens=[5, 9], glyph_lens=[0, 3], image=False)
    cache = StepCache(CachePolicy(mode, 0.0, 1), num_steps=3)
    for step in range(3):
        t = inputs.t - 200.0 * step
        with torch.no_grad():
            plain = model(inputs.x, t, inputs.cond(), t_next_B=t - 200.0)
            cached = model(inputs.x, t, inputs.cond(), t_next_B=t - 200.0, step_cache=cache)
        assert torch.equal(cached, plain), step
    assert cache.history == [True, True, True]


def test_step_cache_skip_reuses_the_residual() -> None:
    """fbcache with a huge threshold skips step 1: the blocks after the first give way to the residual."""
    model = random_transformer(SMALL, seed=7)
    inputs = make_inputs(SMALL, grid=(1, 3, 3), text_lens=[5], glyph_lens=[1], image=False)
    cache = StepCache(CachePolicy("fbcache", 1e9, 1), num_steps=3)
    with torch.no_grad():
        first = model(inputs.x, inputs.t, inputs.cond(), step_cache=cache)
        second = model(inputs.x, inputs.t, inputs.cond(), step_cache=cache)
    assert cache.history == [True, False]
    assert rel_err(second, first) <= 1e-6  # same input: the cached residual reproduces the output


def test_official_layout_loads_by_its_own_names(
    tmp_path: Path, saved: dict[str, tuple[Path, torch.nn.Module]]
) -> None:
    """Weights written under official names (refiner qkv fused, final adaLN halves swapped back) in an
    official `transformer/<version>/` folder give diffusers' output."""
    root, reference = saved["small-meanflow"]
    from_diffusers = load_transformer(root, dtype=torch.float32)
    version = tmp_path / "ckpts" / "transformer" / "480p_i2v_step_distilled"
    version.mkdir(parents=True)
    config = SMALL.with_changes(use_meanflow=True)
    meta = {"ideal_resolution": "480p", "ideal_task": "i2v", "attn_mode": "flash"}
    (version / "config.json").write_text(json.dumps(config.to_official_config(**meta)))
    save_file(
        {k: v.contiguous() for k, v in from_diffusers.state_dict().items()}, version / "model.safetensors"
    )
    model = load_transformer(tmp_path / "ckpts", dtype=torch.float32)
    assert model.checkpoint_format == "HunyuanVideo-1.5 official folder"
    facts = model.checkpoint_facts
    assert (facts.version, facts.resolution, facts.task, facts.use_meanflow) == (
        "480p_i2v_step_distilled", "480p", "i2v", True,
    )  # fmt: skip
    assert model.config == config
    inputs = make_inputs(config, grid=(3, 2, 5), text_lens=[4, 9], glyph_lens=[6, 2], image=True)
    ours = _ours(model, inputs)
    assert torch.equal(ours, _ours(from_diffusers, inputs))
    assert rel_err(ours, _reference(reference, inputs)) <= 1e-5


def test_name_table_against_diffusers(tmp_path: Path) -> None:
    """Our random official weights, renamed by the table, load strictly into diffusers and agree."""
    model = random_transformer(SMALL.with_changes(use_meanflow=True), seed=8)
    renamed = official_to_diffusers(model.state_dict())
    reference = _diffusers_model(model.config, seed=99)
    reference.load_state_dict(renamed, strict=True)
    assert torch.equal(
        renamed["norm_out.linear.bias"][: SMALL.hidden_size],
        model.final_layer.adaLN_modulation[1].bias[SMALL.hidden_size :],
    )
    inputs = make_inputs(model.config, grid=(2, 3, 3), text_lens=[7, 2], glyph_lens=[1, 5], image=True)
    assert rel_err(_ours(model, inputs), _reference(reference, inputs)) <= 1e-5


def test_sharded_diffusers_checkpoint(tmp_path: Path, saved: dict[str, tuple[Path, torch.nn.Module]]) -> None:
    _, reference = saved["odd"]
    reference.save_pretrained(tmp_path / "transformer", max_shard_size="200KB")
    assert (tmp_path / "transformer" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    model = load_transformer(tmp_path / "transformer", dtype=torch.float32)
    inputs = make_inputs(ODD, grid=(1, 2, 2), text_lens=[3], glyph_lens=[2], image=False)
    assert rel_err(_ours(model, inputs), _reference(reference, inputs)) <= 1e-5


def test_full_model_on_the_meta_device() -> None:
    """The released 8.3B architecture: names, shapes and parameter count (published: 8.3B)."""
    with torch.device("meta"):
        model = HunyuanVideo15Transformer(HunyuanVideo15TransformerConfig.full())
        meanflow = HunyuanVideo15Transformer(HunyuanVideo15TransformerConfig.full(use_meanflow=True))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    count = sum(p.numel() for p in model.parameters())
    assert abs(count - 8.3e9) / 8.3e9 < 0.01, count  # 8.327e9
    assert sum(p.numel() for p in meanflow.parameters()) - count == 256 * 2048 + 2048 * 2048 + 2 * 2048
    assert len(model.double_blocks) == 54 and len(model.single_blocks) == 0
    assert shapes["img_in.proj.weight"] == (2048, 65, 1, 1, 1)
    assert shapes["double_blocks.53.img_attn_q.weight"] == (2048, 2048)
    assert shapes["double_blocks.0.txt_mlp.fc1.weight"] == (8192, 2048)
    assert shapes["double_blocks.0.img_attn_q_norm.weight"] == (128,)
    assert shapes["txt_in.input_embedder.weight"] == (2048, 3584)
    assert shapes["txt_in.individual_token_refiner.blocks.1.self_attn_qkv.weight"] == (6144, 2048)
    assert shapes["byt5_in.fc1.weight"] == (2048, 1472) and shapes["byt5_in.fc3.weight"] == (2048, 2048)
    assert shapes["vision_in.proj.1.weight"] == (1152, 1152) and shapes["vision_in.proj.3.weight"] == (
        2048,
        1152,
    )
    assert shapes["cond_type_embedding.weight"] == (3, 2048)
    assert shapes["final_layer.linear.weight"] == (32, 2048)
    assert not any(k.startswith(("time_r_in", "guidance_in", "vector_in")) for k in shapes)
    assert "time_r_in.mlp.0.weight" in meanflow.state_dict()
    # A 480p-sized forward on meta tensors: 31 x 30 x 53 latent grid, 729 image tokens.
    cond = HunyuanVideo15Conditioning(
        torch.empty(2, 1000, 3584, device="meta"), (120, 80),
        torch.empty(2, 256, 1472, device="meta"), (0, 12),
        torch.empty(2, 729, 1152, device="meta"), torch.empty(2, 33, 31, 30, 53, device="meta"),
    )  # fmt: skip
    out = model(torch.empty(2, 32, 31, 30, 53, device="meta"), torch.empty(2, device="meta"), cond)
    assert out.shape == (2, 32, 31, 30, 53)


def _official_folder(tmp_path: Path, state: dict[str, torch.Tensor], name: str = "480p_t2v") -> Path:
    folder = tmp_path / "transformer" / name
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(SMALL.to_official_config()))
    save_file({k: v.contiguous() for k, v in state.items()}, folder / "diffusion_pytorch_model.safetensors")
    return folder


def test_loader_names_bad_keys_and_shapes(
    tmp_path: Path, saved: dict[str, tuple[Path, torch.nn.Module]]
) -> None:
    state = dict(random_transformer(SMALL, seed=9).state_dict())
    del state["double_blocks.1.img_attn_k.weight"]
    state["double_blocks.0.extra.weight"] = torch.zeros(2)
    state["byt5_in.fc3.bias"] = torch.zeros(7)
    folder = _official_folder(tmp_path / "official", state)
    with pytest.raises(ValueError) as info:
        inspect_transformer(folder)
    message = str(info.value)
    assert "HunyuanVideo-1.5 official folder" in message
    assert "1 missing keys: double_blocks.1.img_attn_k.weight" in message
    assert "1 unexpected keys: double_blocks.0.extra.weight" in message
    assert f"byt5_in.fc3.bias (checkpoint (7,), model ({SMALL.hidden_size},))" in message
    # diffusers layout: a missing and a renamed tensor are named by their diffusers names
    diffusers_state = load_file(saved["small"][0] / "transformer" / "diffusion_pytorch_model.safetensors")
    diffusers_state["transformer_blocks.0.attn.to_qq.weight"] = diffusers_state.pop(
        "transformer_blocks.0.attn.to_q.weight"
    )
    folder = tmp_path / "diffusers" / "transformer"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text((saved["small"][0] / "transformer" / "config.json").read_text())
    save_file(diffusers_state, folder / "diffusion_pytorch_model.safetensors")
    with pytest.raises(ValueError) as info:
        load_transformer(folder)
    assert "missing keys: transformer_blocks.0.attn.to_q.weight" in str(info.value)
    assert "unexpected keys: transformer_blocks.0.attn.to_qq.weight" in str(info.value)


def test_loader_refuses_what_is_not_a_15_transformer(tmp_path: Path) -> None:
    one_zero = tmp_path / "v10" / "transformer"
    one_zero.mkdir(parents=True)
    (one_zero / "config.json").write_text(json.dumps({"_class_name": "HunyuanVideoTransformer3DModel"}))
    with pytest.raises(ValueError, match=r"describes a HunyuanVideo 1\.0 transformer"):
        inspect_transformer(tmp_path / "v10")
    state = random_transformer(SMALL, seed=1).state_dict()
    _official_folder(tmp_path / "two", state, "480p_t2v")
    _official_folder(tmp_path / "two", state, "720p_t2v")
    with pytest.raises(ValueError, match=r"holds transformer versions \['480p_t2v', '720p_t2v'\]: name one"):
        inspect_transformer(tmp_path / "two")
    model, checkpoint = inspect_transformer(tmp_path / "two", version="720p_t2v")
    assert model.img_in.proj.weight.is_meta and checkpoint.facts.resolution == "720p"
    with pytest.raises(ValueError, match="no transformer version '1080p'"):
        inspect_transformer(tmp_path / "two", version="1080p")
    bad = SMALL.to_official_config()
    bad.update(mm_single_blocks_depth=2, guidance_embed=True)
    (tmp_path / "two" / "transformer" / "720p_t2v" / "config.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"mm_single_blocks_depth=2 .*guidance_embed=True"):
        inspect_transformer(tmp_path / "two", version="720p_t2v")
    with pytest.raises(ValueError, match=r"not a HunyuanVideo-1\.5 transformer folder"):
        inspect_transformer(tmp_path)


def test_config_validation_names_every_field() -> None:
    with pytest.raises(ValueError) as info:
        HunyuanVideo15TransformerConfig(in_channels=64, head_dim=100, mlp_ratio=0).validate()
    message = str(info.value)
    assert "in_channels=64 must be 2 * out_channels + 1 = 65" in message
    assert "sum(rope_axes_dim)=128 must equal head_dim=100" in message
    assert "mlp_ratio must be > 0" in message
    HunyuanVideo15TransformerConfig.tiny().validate()
    assert (
        HunyuanVideo15TransformerConfig.from_diffusers_config(
            HunyuanVideo15TransformerConfig.full().to_diffusers_config()
        )
        == HunyuanVideo15TransformerConfig.full()
    )
    assert HunyuanVideo15TransformerConfig.from_official_config(
        HunyuanVideo15TransformerConfig.full(use_meanflow=True).to_official_config()
    ) == HunyuanVideo15TransformerConfig.full(use_meanflow=True)


def test_meanflow_needs_the_next_timestep() -> None:
    model = random_transformer(HunyuanVideo15TransformerConfig.tiny(use_meanflow=True), seed=0)
    inputs = make_inputs(model.config, grid=(1, 2, 2), text_lens=[3], glyph_lens=[0], image=False)
    with pytest.raises(ValueError, match=r"uses MeanFlow .* pass t_next_B"):
        model(inputs.x, inputs.t, inputs.cond())
    with pytest.raises(
        ValueError, match="latent has 65 channels, the model expects 32 noisy latent channels"
    ):
        model(torch.zeros(1, 65, 1, 2, 2), inputs.t, inputs.cond(), t_next_B=inputs.t_next)


def test_forward_has_no_host_sync(sync_calls: list[str]) -> None:  # noqa: F811 (the imported fixture)
    """With the conditioning built (lengths read once), a forward never waits for the device,
    batch 2 with ragged lengths, image tokens and MeanFlow included."""
    model = random_transformer(HunyuanVideo15TransformerConfig.tiny(use_meanflow=True), seed=0)
    inputs = make_inputs(model.config, grid=(2, 3, 3), text_lens=[5, 9], glyph_lens=[0, 3], image=True)
    cond = HunyuanVideo15Conditioning.from_masks(
        inputs.text_states, inputs.text_mask, inputs.glyph_states, inputs.glyph_mask,
        inputs.image_embeds, inputs.cond_latents,
    )  # fmt: skip
    cache = StepCache(CachePolicy("fbcache", 0.1, 1), num_steps=4)
    sync_calls.clear()
    with torch.no_grad():
        model(inputs.x, inputs.t, cond, t_next_B=inputs.t_next)
        model(inputs.x, inputs.t, cond, t_next_B=inputs.t_next, step_cache=cache)
    assert sync_calls == []
