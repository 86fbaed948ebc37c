"""Every checkpoint layout round-trips through load_transformer; every bad checkpoint says what is wrong."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from diffusers import HunyuanVideoTransformer3DModel
from safetensors.torch import save_file

from hvbatch.models.fp8 import FP8_DTYPE, FP8Linear, enable_fp8_gemm, quantize_fp8
from hvbatch.models.hunyuan_video import HunyuanVideoTransformer, load_transformer
from tests.helpers import DIFFUSERS_SMALL, cond_of, make_inputs, randomize_, rel_err, small_config

CONFIG = small_config()


@pytest.fixture(scope="module")
def reference() -> HunyuanVideoTransformer:
    return randomize_(HunyuanVideoTransformer(CONFIG), seed=7).eval()


@pytest.fixture(scope="module")
def inputs() -> dict[str, torch.Tensor]:
    return make_inputs(CONFIG, batch=2, frames=2, height=4, width=6, text_lens=[6, 16])


def _forward(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(inputs["x"], inputs["t"], cond_of(inputs))


def _assert_same_model(model: HunyuanVideoTransformer, reference: HunyuanVideoTransformer) -> None:
    ours, theirs = model.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key


def _official_state(reference: HunyuanVideoTransformer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in reference.state_dict().items()}


@pytest.mark.parametrize("wrapper", ["module", "ema", "bare"])
def test_official_pt_round_trip(tmp_path: Path, reference: HunyuanVideoTransformer, wrapper: str) -> None:
    state = _official_state(reference)
    payload = state if wrapper == "bare" else {wrapper: state, "other": {"step": torch.tensor(3)}}
    path = tmp_path / "mp_rank_00_model_states.pt"
    torch.save(payload, path)
    load_key = "ema" if wrapper == "ema" else "module"
    model = load_transformer(path, dtype=torch.float32, config=CONFIG, load_key=load_key)
    assert model.checkpoint_format == "official .pt"
    _assert_same_model(model, reference)


def test_official_release_folder_layout(tmp_path: Path, reference: HunyuanVideoTransformer) -> None:
    folder = tmp_path / "hunyuan-video-t2v-720p"
    (folder / "transformers").mkdir(parents=True)
    torch.save({"module": _official_state(reference)}, folder / "transformers" / "mp_rank_00_model_states.pt")
    _assert_same_model(load_transformer(folder, dtype=torch.float32, config=CONFIG), reference)


def test_official_safetensors_round_trip(tmp_path: Path, reference: HunyuanVideoTransformer) -> None:
    path = tmp_path / "hunyuan.safetensors"
    save_file(_official_state(reference), str(path))
    model = load_transformer(path, dtype=torch.float32, config=CONFIG)
    assert model.checkpoint_format == "safetensors file with official names"
    _assert_same_model(model, reference)


def test_bf16_load_casts_every_tensor(tmp_path: Path, reference: HunyuanVideoTransformer) -> None:
    path = tmp_path / "m.safetensors"
    save_file(_official_state(reference), str(path))
    model = load_transformer(path, dtype=torch.bfloat16, config=CONFIG)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("sharded", [False, True])
def test_diffusers_folder_round_trip(tmp_path: Path, sharded: bool, inputs: dict[str, torch.Tensor]) -> None:
    diffusers_model = randomize_(HunyuanVideoTransformer3DModel(**DIFFUSERS_SMALL), seed=1)
    folder = tmp_path / "model" / "transformer"
    diffusers_model.save_pretrained(folder, max_shard_size="300KB" if sharded else "10GB")
    assert (folder / "diffusion_pytorch_model.safetensors.index.json").exists() == sharded
    from_folder = load_transformer(folder, dtype=torch.float32)
    from_root = load_transformer(folder.parent, dtype=torch.float32)
    _assert_same_model(from_root, from_folder)
    # The same weights as one safetensors file with diffusers names, architecture given by us.
    single = tmp_path / "diffusers_names.safetensors"
    save_file({k: v.contiguous() for k, v in diffusers_model.state_dict().items()}, str(single))
    from_single = load_transformer(single, dtype=torch.float32, config=from_folder.config)
    assert from_single.checkpoint_format == "safetensors file with diffusers names"
    _assert_same_model(from_single, from_folder)


def test_export_to_diffusers_matches_diffusers_model(
    reference: HunyuanVideoTransformer, inputs: dict[str, torch.Tensor]
) -> None:
    """The mapping checked from the other side: our weights, exported, run in diffusers' model."""
    from hvbatch.models.hunyuan_video.convert import config_to_diffusers, official_to_diffusers

    raw = {k: v for k, v in config_to_diffusers(CONFIG).items() if not k.startswith("_")}
    theirs = HunyuanVideoTransformer3DModel(**raw).eval()
    theirs.load_state_dict(official_to_diffusers(reference.state_dict(), CONFIG.hidden_size), strict=True)
    with torch.no_grad():
        expected = theirs(
            hidden_states=inputs["x"],
            timestep=inputs["t"],
            encoder_hidden_states=inputs["text_states"],
            encoder_attention_mask=inputs["text_mask"],
            pooled_projections=inputs["text_states_2"],
            guidance=inputs["guidance"],
            return_dict=False,
        )[0]
    assert rel_err(_forward(reference, inputs), expected) < 1e-5


def _write_fp8_checkpoint(
    reference: HunyuanVideoTransformer, folder: Path
) -> tuple[Path, HunyuanVideoTransformer]:
    """Quantize every block linear like the official fp8 release; return the file and a dequantized twin."""
    state = _official_state(reference)
    dequantized = {k: v.clone() for k, v in state.items()}
    scales = {}
    for name, module in reference.named_modules():
        if isinstance(module, torch.nn.Linear) and name.startswith(("double_blocks.", "single_blocks.")):
            weight_q, scale = quantize_fp8(state[f"{name}.weight"])
            state[f"{name}.weight"] = weight_q
            scales[name] = scale
            dequantized[f"{name}.weight"] = weight_q.float() * scale
    path = folder / "mp_rank_00_model_states_fp8.pt"
    torch.save({"module": state}, path)
    torch.save(scales, folder / "mp_rank_00_model_states_fp8_map.pt")
    twin = HunyuanVideoTransformer(CONFIG)
    twin.load_state_dict(dequantized)
    return path, twin.eval()


def test_fp8_checkpoint_stays_fp8(
    tmp_path: Path, reference: HunyuanVideoTransformer, inputs: dict[str, torch.Tensor]
) -> None:
    path, twin = _write_fp8_checkpoint(reference, tmp_path)
    model = load_transformer(path, dtype=torch.float32, config=CONFIG)
    assert model.checkpoint_format == "official fp8 .pt"
    fp8_layers = [m for m in model.modules() if isinstance(m, FP8Linear)]
    num_block_linears = sum(
        isinstance(m, torch.nn.Linear) for n, m in reference.named_modules() if "_blocks." in n
    )
    assert len(fp8_layers) == num_block_linears > 0
    assert all(m.weight.dtype == FP8_DTYPE for m in fp8_layers)
    assert model.img_in.proj.weight.dtype == torch.float32
    assert all(m.use_fp8_gemm for m in fp8_layers)
    # FP8 GEMMs also quantize the activations (per token): tests/test_fp8.py states the tolerance.
    assert rel_err(_forward(model, inputs), _forward(twin, inputs)) < 0.02
    # fp8 quantization error is visible against the unquantized weights, but small.
    assert 1e-4 < rel_err(_forward(model, inputs), _forward(reference, inputs)) < 0.1
    enable_fp8_gemm(model, enabled=False)  # the dequantize path equals the dequantized twin
    assert rel_err(_forward(model, inputs), _forward(twin, inputs)) < 1e-6


def test_fp8_without_scale_map_is_refused(tmp_path: Path, reference: HunyuanVideoTransformer) -> None:
    path, _ = _write_fp8_checkpoint(reference, tmp_path)
    (tmp_path / "mp_rank_00_model_states_fp8_map.pt").unlink()
    with pytest.raises(ValueError, match=r"scale map mp_rank_00_model_states_fp8_map\.pt"):
        load_transformer(path, config=CONFIG)


def test_missing_and_misshaped_keys_are_named(tmp_path: Path, reference: HunyuanVideoTransformer) -> None:
    state = _official_state(reference)
    del state["double_blocks.1.img_attn_qkv.weight"]
    state["final_layer.linear.bias"] = torch.zeros(5)
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "bad.pt"
    torch.save({"module": state}, path)
    with pytest.raises(ValueError) as info:
        load_transformer(path, config=CONFIG)
    message = str(info.value)
    assert "detected format: official .pt" in message
    assert "1 missing keys: double_blocks.1.img_attn_qkv.weight" in message
    assert "1 unexpected keys: extra.weight" in message
    assert "final_layer.linear.bias (checkpoint (5,), model (64,))" in message


def test_wrong_preset_explains_itself(tmp_path: Path, reference: HunyuanVideoTransformer) -> None:
    path = tmp_path / "small.pt"
    torch.save({"module": _official_state(reference)}, path)
    with pytest.raises(ValueError) as info:
        load_transformer(path)  # default preset: the 13B model, built on the meta device only
    message = str(info.value)
    assert "preset 'hunyuan-video-t2v-720p'" in message
    assert re.search(r"\d+ missing keys: .*\(\+\d+ more\)", message)
    assert re.search(r"\d+ shape mismatches: .*model \(3072,", message)


def test_diffusers_missing_key_uses_diffusers_names(tmp_path: Path) -> None:
    folder = tmp_path / "transformer"
    HunyuanVideoTransformer3DModel(**DIFFUSERS_SMALL).save_pretrained(folder)
    from safetensors.torch import load_file

    weights = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    del weights["transformer_blocks.0.attn.add_k_proj.weight"]
    save_file(weights, str(folder / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(ValueError, match=r"missing keys: transformer_blocks\.0\.attn\.add_k_proj\.weight"):
        load_transformer(folder)


def test_pickled_objects_are_refused(tmp_path: Path, reference: HunyuanVideoTransformer) -> None:
    path = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": _official_state(reference), "args": argparse.Namespace(lr=1)}, path)
    with pytest.raises(ValueError, match=r"refusing to load .*pickled Python objects"):
        load_transformer(path, config=CONFIG)


def test_unknown_layouts_are_refused(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match=r"cannot tell the checkpoint layout of folder .*notes\.txt"):
        load_transformer(tmp_path)
    with pytest.raises(ValueError, match="cannot tell the checkpoint layout of file"):
        load_transformer(tmp_path / "notes.txt")
    with pytest.raises(ValueError, match="does not exist"):
        load_transformer(tmp_path / "absent.pt")
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "HunyuanVideoTransformer3DModel"}))
    with pytest.raises(ValueError, match=r"no diffusion_pytorch_model\.safetensors"):
        load_transformer(tmp_path)
    (tmp_path / "config.json").write_text(
        json.dumps({"image_condition_type": "latent_concat", "in_channels": 33})
    )
    with pytest.raises(ValueError, match="image-to-video is built for token_replace only"):
        load_transformer(tmp_path)
    with pytest.raises(ValueError, match="no state dict under 'module'"):
        torch.save({"weights": {"a": 1}}, tmp_path / "odd.pt")
        load_transformer(tmp_path / "odd.pt", config=CONFIG)


_PEAK_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from hvbatch.models.hunyuan_video import load_transformer

    def high_water_mark_bytes():  # VmHWM restarts at exec; ru_maxrss would inherit the parent's
        line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM"))
        return int(line.split()[1]) * 1024

    from tests.helpers import small_config
    config = small_config(num_heads=8, head_dim=64, num_double_blocks=3, num_single_blocks=3,
                          rope_axes_dim=[16, 24, 24])
    before = high_water_mark_bytes()
    model = load_transformer(sys.argv[1], dtype=torch.float32, config=config)
    for p in model.parameters():
        p.sum()  # touch every page, as a first forward would
    print(high_water_mark_bytes() - before)
    """
)


@pytest.mark.parametrize("layout", ["official", "diffusers"])
def test_loading_peak_memory_is_about_one_copy(tmp_path: Path, layout: str) -> None:
    config = small_config(
        num_heads=8, head_dim=64, num_double_blocks=3, num_single_blocks=3, rope_axes_dim=[16, 24, 24]
    )
    model = HunyuanVideoTransformer(config)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    if layout == "official":
        path = tmp_path / "mp_rank_00_model_states.pt"
        torch.save({"module": model.state_dict()}, path)
    else:
        from hvbatch.models.hunyuan_video.convert import official_to_diffusers

        diffusers_state = official_to_diffusers(model.state_dict(), config.hidden_size)
        path = tmp_path / "weights.safetensors"
        save_file(diffusers_state, str(path))
    del model
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    result = subprocess.run(
        [sys.executable, "-c", _PEAK_SCRIPT, str(path)], capture_output=True, text=True, env=env, check=True
    )
    peak_growth = int(result.stdout.strip().splitlines()[-1])
    assert weight_bytes > 50e6
    # One copy of the weights must become resident (every page is touched); two copies must not.
    assert 0.8 * weight_bytes < peak_growth < 1.4 * weight_bytes, (peak_growth, weight_bytes)
