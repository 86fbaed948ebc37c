"""HunyuanVideo-1.5 behind the family spec: the denoising loop against diffusers' pipeline, the
step-distilled (MeanFlow) loop, checkpoint folders of both layouts (loading, detection, doctor),
the figures, step caching, `plan`, and the mistakes refused before anything is written.

What differs between the official code and diffusers' `HunyuanVideo15Pipeline`, and how the loop
test avoids it (hvbatch follows the official code):
- noise: official bfloat16 `randn` on a seeded CPU generator; diffusers draws in the transformer's
  dtype on the generator's device. The test hands diffusers our starting latents (`latents=`).
- template crop: official computed from the tokenizer; diffusers hard-codes 108 (right only for the
  Qwen2.5-VL tokenizer). The negative glyph stream: official `""` (no tokens); diffusers encodes the
  negative prompt's quoted text. The test hands diffusers our encodings (`prompt_embeds*`), and its
  negative prompt quotes nothing.
- schedule: official float32; diffusers' scheduler shifts float64 numpy sigmas, then float32 (1 ulp).
- CFG: official one batch `[negative, positive]`, combined in the output's dtype; diffusers two
  passes, combined by its guider. Equal in float32, which the test runs.
- MeanFlow: diffusers' text-to-video pipeline never passes `timestep_r` (its image-to-video one
  does); the step-distilled loop is checked against the official loop written out here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hvbatch.cli import main
from hvbatch.config import load_config
from hvbatch.models.family import detect_family, family_of, get_family
from hvbatch.models.hunyuan_video_15 import sampling as official
from hvbatch.models.hunyuan_video_15.config import HunyuanVideo15TransformerConfig
from hvbatch.models.hunyuan_video_15.figures import transformer_param_counts
from hvbatch.models.hunyuan_video_15.transformer import HunyuanVideo15Transformer
from hvbatch.models.hunyuan_video_15.transformer_loading import load_transformer
from hvbatch.models.hunyuan_video_15.variants import VARIANTS
from hvbatch.pipeline import Pipeline
from tests.helpers import rel_err
from tests.hv15_family_helpers import diffusers_transformer, write_diffusers_root, write_official_root

PROMPT = 'A neon sign saying "OPEN" flickers above a rainy street.'
NEGATIVE = "blurry, low quality"
FAST = ["device=cpu", "model.dtype=float32", "model.text_encoder_dtype=float32", "model.vae_dtype=float32"]
SIZE = ["sampling.height=48", "sampling.width=80", "sampling.num_frames=5"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hv15")
    write_diffusers_root(root / "HunyuanVideo-1.5-Diffusers-480p_t2v")
    write_official_root(root / "ckpts")
    return {"diffusers": root / "HunyuanVideo-1.5-Diffusers-480p_t2v", "official": root / "ckpts"}


def _config(*overrides: str):  # type: ignore[no-untyped-def]
    return load_config(overrides=[*FAST, *SIZE, *overrides])


def test_denoising_loop_matches_diffusers_pipeline(folders: dict[str, Path]) -> None:
    """A diffusers folder loaded by hvbatch, true CFG (scale 6), 3 steps, float32: the final latents
    equal `HunyuanVideo15Pipeline(output_type="latent")`'s on the same encodings and noise."""
    from diffusers import (
        AutoencoderKLHunyuanVideo15,
        ClassifierFreeGuidance,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideo15Pipeline,
        HunyuanVideo15Transformer3DModel,
    )

    root = folders["diffusers"]
    steps = ["sampling.num_inference_steps=3", f"sampling.negative_prompt={NEGATIVE}", "sampling.seed=5"]
    config = _config("model=hunyuan-video-1.5-480p-t2v", f"model.path={root}", *steps)
    assert (config.sampling.cfg_scale, config.sampling.flow_shift) == (6.0, 5.0)  # the variant's
    pipeline = Pipeline.load(config)
    video = pipeline.conditioning(PROMPT, config.sampling)
    assert video.positive.glyph_lens[0] > 0 and video.negative.glyph_lens == (0,)  # official negative
    ours = pipeline.generate(PROMPT, decode=False).latents

    shape = (1, *family_of(config.model).geometry.latent_shape(48, 80, 5))
    noise = official.initial_noise(shape, 5)
    assert noise.dtype == torch.bfloat16  # the official noise convention

    def embeds(cond):  # type: ignore[no-untyped-def]
        glyph = cond.glyph_states if cond.glyph_lens[0] else torch.zeros(1, 1, cond.glyph_states.shape[2])
        ones = torch.ones(1, cond.text_states.shape[1])
        return cond.text_states, ones, glyph, torch.ones(1, glyph.shape[1]) * bool(cond.glyph_lens[0])

    pos, neg = embeds(video.positive), embeds(video.negative)
    reference = HunyuanVideo15Pipeline(
        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
        transformer=HunyuanVideo15Transformer3DModel.from_pretrained(root / "transformer"),
        vae=AutoencoderKLHunyuanVideo15.from_pretrained(root / "vae"),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0),
        guider=ClassifierFreeGuidance(guidance_scale=6.0),
    )  # fmt: skip
    with torch.no_grad():
        theirs = reference(
            prompt_embeds=pos[0], prompt_embeds_mask=pos[1], prompt_embeds_2=pos[2],
            prompt_embeds_mask_2=pos[3], negative_prompt_embeds=neg[0], negative_prompt_embeds_mask=neg[1],
            negative_prompt_embeds_2=neg[2], negative_prompt_embeds_mask_2=neg[3],
            height=48, width=80, num_frames=5, num_inference_steps=3,
            latents=noise.float(), output_type="latent",
        ).frames  # fmt: skip
    assert theirs.std() > 0.1 and rel_err(ours, theirs) <= 1e-4
    assert rel_err(ours, noise.float()) > 0.05  # the loop moved the latents


def test_step_distilled_loop_passes_the_next_timestep(tmp_path: Path) -> None:
    """A MeanFlow checkpoint (use_meanflow): the sampler's loop equals the official one, in which
    every step's `timestep_r` is the next timestep (0 at the last); the wrong `timestep_r` differs."""
    from hvbatch.models.hunyuan_video_15.conditioning import HunyuanVideo15Conditioning
    from hvbatch.sampling import sample

    arch = HunyuanVideo15TransformerConfig(
        num_heads=4, head_dim=16, num_double_blocks=2, num_refiner_blocks=1, rope_axes_dim=[4, 6, 6],
        text_dim=32, glyph_dim=16, image_embed_dim=16, use_meanflow=True,
    )  # fmt: skip
    reference = diffusers_transformer(arch, seed=3, target_size=640, task_type="i2v")
    reference.save_pretrained(tmp_path / "transformer")
    model = load_transformer(tmp_path, dtype=torch.float32)
    assert model.checkpoint_facts.use_meanflow and model.time_r_in is not None
    config = load_config(
        overrides=["model=tiny-1.5", *SIZE, "sampling.num_inference_steps=4", "sampling.flow_shift=7"]
    )
    text = torch.randn(1, 7, 32, generator=torch.Generator().manual_seed(1))
    cond = HunyuanVideo15Conditioning(text, (7,), torch.zeros(1, 0, 16), (0,))
    geometry = get_family("hunyuan-video-1.5").geometry
    with torch.no_grad():
        ours = sample(model, cond, config.sampling, geometry=geometry, convention=official)

        def official_loop(next_of) -> torch.Tensor:  # type: ignore[no-untyped-def]
            sigmas, timesteps = official.flow_schedule(4, 7.0)
            latents = official.initial_noise((1, *geometry.latent_shape(48, 80, 5)), 0).float()
            zeros = torch.zeros(1, 33, *latents.shape[2:])
            for i, t in enumerate(timesteps):
                v = reference(
                    hidden_states=torch.cat([latents, zeros], 1), timestep=t[None],
                    timestep_r=next_of(timesteps, i),
                    encoder_hidden_states=text, encoder_attention_mask=torch.ones(1, 7),
                    encoder_hidden_states_2=torch.zeros(1, 1, 16), encoder_attention_mask_2=torch.zeros(1, 1),
                    image_embeds=torch.zeros(1, 729, 16), return_dict=False,
                )[0]  # fmt: skip
                latents = latents + v.float() * (sigmas[i + 1] - sigmas[i])
            return latents

        expected = official_loop(lambda ts, i: (ts[i + 1] if i + 1 < len(ts) else torch.tensor(0.0))[None])
        wrong = official_loop(lambda ts, i: ts[i][None])
    assert rel_err(ours, expected) <= 1e-4
    assert rel_err(ours, wrong) > 1e-3


@pytest.mark.parametrize("layout", ["diffusers", "official"])
def test_checkpoint_folders_are_detected_loaded_and_checked(folders: dict[str, Path], layout: str) -> None:
    """Either layout: detected as 1.5 from its config files, every doctor check of it passes, and
    the loaded transformer is the checkpoint's architecture (from its config.json)."""
    from hvbatch.doctor.weights import check_weights
    from hvbatch.models.hunyuan_video_15.components import load_components

    root = folders[layout]
    family, words = detect_family(root)  # type: ignore[misc]
    assert family.name == "hunyuan-video-1.5" and ("480p_t2v" in words) and layout in words
    config = _config("model=hunyuan-video-1.5-480p-t2v", f"model.path={root}")
    checks = {c.check: c for c in check_weights(config.model)}
    assert set(checks) == {"weights", "transformer", "vae", "text_encoder", "glyph_encoder"}
    assert all(c.status == "ok" for c in checks.values()), checks
    assert "all" in checks["transformer"].detail and "480p" in checks["transformer"].detail
    components = load_components(config.model, torch.device("cpu"))
    assert components.transformer.config.num_heads == 4  # the checkpoint's, not the preset's 16
    # A damaged file is named by doctor (headers only).
    if layout == "official":
        (root / "transformer" / "480p_t2v" / "config.json").write_text(json.dumps({"heads_num": 3}))
        failed = {c.check: c for c in check_weights(config.model)}
        assert failed["transformer"].status == "fail"
        write_official_root(root.parent / "ckpts-again")  # the shared fixture stays intact for others
        folders["official"] = root.parent / "ckpts-again"


def test_figures_are_the_models() -> None:
    """Parameter counts by arithmetic equal the meta-device models; the geometry is 16x / 4x, patch 1."""
    for arch in (
        HunyuanVideo15TransformerConfig.full(),
        HunyuanVideo15TransformerConfig.full(use_meanflow=True),
        HunyuanVideo15TransformerConfig.tiny(),
    ):
        with torch.device("meta"):
            model = HunyuanVideo15Transformer(arch)
        assert transformer_param_counts(arch)[0] == sum(p.numel() for p in model.parameters())
    family = get_family("hunyuan-video-1.5")
    assert family.geometry.checked_image_tokens(720, 1280, 121) == 31 * 45 * 80
    assert family.memory(load_config(overrides=["model=hunyuan-video-1.5-720p-t2v"]).model).num_heads == 16
    for preset, name in [
        ("hunyuan-video-1.5-480p-t2v", "480p_t2v"),
        ("hunyuan-video-1.5-720p-t2v", "720p_t2v"),
        ("hunyuan-video-1.5-480p-t2v-distilled", "480p_t2v_distilled"),
    ]:
        s, v = load_config(overrides=[f"model={preset}"]).sampling, VARIANTS[name]
        assert (s.num_inference_steps, s.cfg_scale, s.flow_shift, s.num_frames) == (
            50,
            v.cfg_scale,
            v.flow_shift,
            121,
        )
    assert load_config(overrides=["model=hunyuan-video-1.5-720p-t2v"]).sampling.height == 720


def test_fbcache_skips_steps_and_teacache_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    """First-Block-Cache through the 1.5 model's own probe: threshold 0 is bit-identical to no cache,
    a large one skips up to `cache_max_skips` in a row; TeaCache has no 1.5 coefficients: refused."""
    base = ["model=tiny-1.5", "device=cpu", "sampling.num_inference_steps=8"]
    pipeline = Pipeline.load(load_config(overrides=base))
    full = pipeline.generate("a kite", decode=False)

    def cached(threshold: str) -> object:
        extra = [
            "sampling.cache=fbcache",
            f"sampling.cache_threshold={threshold}",
            "sampling.cache_max_skips=2",
        ]
        return pipeline.generate("a kite", load_config(overrides=[*base, *extra]).sampling, decode=False)

    exact, skipping = cached("0"), cached("1e9")
    assert exact.steps_skipped == 0 and torch.equal(exact.latents, full.latents)
    assert (skipping.steps_computed, skipping.steps_skipped) == (4, 4)  # steps 1, 4, 7 and the last
    assert 0 < rel_err(skipping.latents, full.latents) < 1.0
    assert main(["plan", "model=tiny-1.5", "sampling.cache=teacache"]) == 2
    assert "no TeaCache coefficients are published for HunyuanVideo-1.5" in capsys.readouterr().err


def test_plan_on_one_node(capsys: pytest.CaptureFixture[str]) -> None:
    """480p and 720p on 8 GPUs; latency mode gives a video the node with Ulysses dividing 16 heads."""
    for preset, tokens in (
        ("hunyuan-video-1.5-480p-t2v", "49,290"),
        ("hunyuan-video-1.5-720p-t2v", "111,600"),
    ):
        assert main(["plan", f"model={preset}"]) == 0
        out = capsys.readouterr().out
        assert (
            f"{tokens} image tokens" in out
            and "8.33B params" in out
            and "text encoders           0.0 GiB" in out
        )
        assert main(["plan", f"model={preset}", "parallel.mode=latency"]) == 0
        assert "cfg 2 x ulysses 4 x ring 1" in capsys.readouterr().out
    assert main(["plan", "model=hunyuan-video-1.5-720p-t2v", "parallel.ulysses=3"]) == 2
    assert "must divide the model's 16 attention heads" in capsys.readouterr().err


def _a_10_checkpoint(root: Path) -> Path:
    (root / "hunyuan-video-t2v-720p" / "transformers").mkdir(parents=True)
    return root


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("1.5 folder, 1.0 preset", "holds a HunyuanVideo-1.5"),
        ("1.0 folder, 1.5 preset", "holds a HunyuanVideo 1.0"),
        ("neither", "is not a recognised weights folder: model.path must be a HunyuanVideo-1.5 folder"),
        ("distilled steps", "runs 50 steps, not num_inference_steps=20"),
        ("step-distilled steps", "runs 4 or 8 or 12 steps, not num_inference_steps=50"),
        ("16x size", "width=88 is not a positive multiple of 16"),
        ("unknown preset", "unknown model preset 'hunyuan-video-1.5-1080p-t2v'"),
        ("image-to-video", "is an image-to-video model"),
    ],
)
def test_mistakes_exit_2_with_one_message_and_nothing_written(
    tmp_path: Path, folders: dict[str, Path], capsys: pytest.CaptureFixture[str], case: str, message: str
) -> None:
    overrides = {
        "1.5 folder, 1.0 preset": ["model=hunyuan-video-t2v-720p", f"model.path={folders['diffusers']}"],
        "1.0 folder, 1.5 preset": [
            "model=hunyuan-video-1.5-480p-t2v",
            f"model.path={_a_10_checkpoint(tmp_path / 'c')}",
        ],
        "neither": ["model=hunyuan-video-1.5-480p-t2v", f"model.path={tmp_path}"],
        "distilled steps": ["model=hunyuan-video-1.5-480p-t2v-distilled", "sampling.num_inference_steps=20"],
        "step-distilled steps": [
            "model=hunyuan-video-1.5-480p-i2v-step-distilled",
            "sampling.num_inference_steps=50",
        ],
        "16x size": ["model=tiny-1.5", "sampling.width=88"],
        "unknown preset": ["model=hunyuan-video-1.5-1080p-t2v"],
        "image-to-video": ["model=hunyuan-video-1.5-480p-i2v-step-distilled"],
    }[case]
    prompts = Path(__file__).resolve().parents[1] / "examples" / "prompts.parquet"
    out, run = tmp_path / "out", tmp_path / "run"
    assert main(["generate", "--prompt", "x", "--out", str(out / "v.mp4"), "device=cpu", *overrides]) == 2
    generate_err = capsys.readouterr().err
    assert message in generate_err and generate_err.count("error:") == 1
    if case != "16x size":  # the prompts file's own sizes are valid
        assert main(["submit", str(prompts), "--run-dir", str(run), "--executor", "local", *overrides]) == 2
        submit_err = capsys.readouterr().err
        if case == "neither":  # refused before the job loads anything: by the folder's names alone
            message = "is not a checkpoint folder of any model family hvbatch knows"
        assert message in submit_err and submit_err.count("error:") == 1
    assert not out.exists() and not run.exists()


def test_a_prompt_row_with_a_step_count_the_variant_cannot_run_is_refused_at_submit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A distilled variant's fixed step count holds per row too: refused at submit (and in the dry
    run) with the rows named, before anything is written, not by every job at run time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    prompts = tmp_path / "p.parquet"
    steps = pa.array([50, 20, None, 20], pa.int64())
    pq.write_table(pa.table({"prompt": ["a", "b", "c", "d"], "num_inference_steps": steps}), prompts)
    run = tmp_path / "run"
    preset = "model=hunyuan-video-1.5-480p-t2v-distilled"
    for extra in (["--dry-run"], ["--run-dir", str(run), "--executor", "local"]):
        assert main(["submit", str(prompts), *extra, preset]) == 2
        err = capsys.readouterr().err
        assert "column num_inference_steps, rows 1, 3: " in err, err
        assert "runs 50 steps, not num_inference_steps=20" in err and "row 0" not in err
    assert not run.exists()


def test_compiled_blocks_equal_eager() -> None:
    """`model.compile` on 1.5: each double block compiled (regional, dynamo with the eager backend
    here) gives the eager output."""
    from hvbatch.models.hunyuan_video_15.conditioning import HunyuanVideo15Conditioning
    from hvbatch.models.hunyuan_video_15.transformer_loading import random_transformer
    from hvbatch.models.runtime import compile_blocks

    model = random_transformer(HunyuanVideo15TransformerConfig.tiny(), seed=0)
    x = torch.randn(1, 32, 2, 3, 4, generator=torch.Generator().manual_seed(0))
    cond = HunyuanVideo15Conditioning.example(model.config, 1, 5, "cpu")
    with torch.no_grad():
        eager = model(x, torch.tensor([700.0]), cond)
        compile_blocks(model, backend="eager")
        compiled = model(x, torch.tensor([700.0]), cond)
    assert len(model.transformer_blocks()) == 2 and model.compiled_blocks
    assert rel_err(compiled, eager) <= 1e-6
