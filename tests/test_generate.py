"""`hvbatch generate` end to end on the tiny preset, real weight layouts, and bad input."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import imageio.v2 as imageio
import pytest
import torch
from safetensors.torch import load_file, save_file

from hvbatch.cli import main
from hvbatch.config import load_config
from hvbatch.models.hunyuan_video.components import TINY_VAE
from hvbatch.models.hunyuan_video.convert import config_to_diffusers, official_to_diffusers
from hvbatch.pipeline import Pipeline
from tests.helpers import rel_err

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "configs" / "examples" / "tiny-cpu.yaml"


def _generate(out_dir: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    command = [
        sys.executable,
        "-m",
        "hvbatch",
        "generate",
        "--prompt",
        "a red fox in the snow",
        "--config",
        str(EXAMPLE),
        "--out",
        str(out_dir / "fox.mp4"),
        "--save-latents",
        str(out_dir / "fox.safetensors"),
        *extra,
    ]
    return subprocess.run(command, capture_output=True, text=True, check=True, cwd=out_dir)


def test_generate_is_reproducible_and_writes_a_playable_mp4(tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir(), second.mkdir()
    result = _generate(first)
    _generate(second)
    latents_a = load_file(str(first / "fox.safetensors"))["latents"]
    latents_b = load_file(str(second / "fox.safetensors"))["latents"]
    assert latents_a.shape == (1, 16, 3, 8, 12) and torch.equal(latents_a, latents_b)
    reader = imageio.get_reader(first / "fox.mp4", format="FFMPEG")
    assert reader.count_frames() == 9
    assert tuple(reader.get_meta_data()["size"]) == (96, 64) and reader.get_meta_data()["fps"] == 24.0
    reader.close()
    assert load_config(first / "fox.yaml").sampling.num_frames == 9  # the resolved config, beside it
    for stage in ("load", "encode", "denoise", "decode", "write"):
        assert f"{stage} " in result.stdout
    assert "denoise [" in result.stderr and "4/4" in result.stderr
    seed_changed = tmp_path / "c"
    seed_changed.mkdir()
    _generate(seed_changed, "sampling.seed=1")
    assert not torch.equal(load_file(str(seed_changed / "fox.safetensors"))["latents"], latents_a)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--prompt", "x", "sampling.height=100"],
            "height=100 is not a positive multiple of 16 (nearest valid: 96 or 112)",
        ),
        (
            ["--prompt", "x", "sampling.num_frames=10"],
            "num_frames=10 is not of the form 4k+1 (nearest valid: 9 or 13)",
        ),
        (["--prompt", "  "], "--prompt is empty"),
        (["--prompt", "x", "model=hunyuan-video-t2v-720p"], "model weights not found: transformer, vae"),
        (
            ["--prompt", "x", "model=hunyuan-video-t2v-720p", "model.path=/nonexistent"],
            "not a recognised weights folder",
        ),
        (["--prompt", "x", "--out", "v.avi"], "must end in .mp4"),
    ],
)
def test_bad_input_is_refused_before_any_output(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    out = tmp_path / "out"
    argv = ["generate", "--config", str(EXAMPLE), *args]
    if "--out" not in args:
        argv += ["--out", str(out / "v.mp4")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    if "weights not found" in message:
        assert "ckpts/" in err and "tokenizer_2/" in err  # the expected layout is spelled out
    assert not out.exists()


def _write_tiny_weights(pipeline: Pipeline, root: Path, layout: str) -> None:
    """Save the tiny pipeline's random components as files in the official or diffusers layout."""
    vae_config = dict(dataclasses.asdict(TINY_VAE), _class_name="AutoencoderKLCausal3D")
    encoder = pipeline.text_encoder
    if layout == "official":
        model_dir = root / "hunyuan-video-t2v-720p"
        (model_dir / "transformers").mkdir(parents=True)
        torch.save(
            {"module": pipeline.transformer.state_dict()},
            model_dir / "transformers" / "mp_rank_00_model_states.pt",
        )
        parts = {
            "text_encoder": (encoder.llm, encoder.llm_tokenizer),
            "text_encoder_2": (encoder.clip, encoder.clip_tokenizer),
        }
        vae_dir = model_dir / "vae"
        vae_dir.mkdir()
        torch.save(pipeline.vae.state_dict(), vae_dir / "pytorch_model.pt")
    else:
        (root / "transformer").mkdir(parents=True)
        transformer = pipeline.transformer
        (root / "transformer" / "config.json").write_text(json.dumps(config_to_diffusers(transformer.config)))
        diffusers_state = official_to_diffusers(transformer.state_dict(), transformer.config.hidden_size)
        save_file(diffusers_state, str(root / "transformer" / "diffusion_pytorch_model.safetensors"))
        parts = {
            "text_encoder": (encoder.llm,),
            "tokenizer": (encoder.llm_tokenizer,),
            "text_encoder_2": (encoder.clip,),
            "tokenizer_2": (encoder.clip_tokenizer,),
        }
        vae_dir = root / "vae"
        vae_dir.mkdir()
        save_file(pipeline.vae.state_dict(), str(vae_dir / "diffusion_pytorch_model.safetensors"))
    (vae_dir / "config.json").write_text(json.dumps(vae_config))
    for folder, objects in parts.items():
        for obj in objects:
            obj.save_pretrained(root / folder)


@pytest.mark.parametrize(
    ("layout", "detected"), [("official", "official .pt"), ("diffusers", "diffusers folder")]
)
def test_weights_loaded_from_files_give_the_same_video(tmp_path: Path, layout: str, detected: str) -> None:
    reference = Pipeline.load(load_config(EXAMPLE))
    expected = reference.generate("a lighthouse in a storm").latents
    root = tmp_path / "weights"
    _write_tiny_weights(reference, root, layout)
    loaded = Pipeline.load(load_config(EXAMPLE, [f"model.path={root}", "model.random_weights=false"]))
    assert loaded.transformer.checkpoint_format == detected
    # Same weights bit for bit; the last ulp of a matmul may depend on where the tensors live in memory.
    for name in ("transformer", "vae"):
        ours, theirs = getattr(loaded, name).state_dict(), getattr(reference, name).state_dict()
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert rel_err(loaded.generate("a lighthouse in a storm").latents, expected) < 1e-6
