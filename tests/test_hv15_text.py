"""HunyuanVideo-1.5 text side: Qwen2.5-VL and glyph encoders, variants, buckets, sampling conventions.

References: transformers' models called directly the way the official code calls them, diffusers'
`HunyuanVideo15Pipeline.encode_prompt`, and formulas and values written out from the official code
(Tencent-Hunyuan/HunyuanVideo-1.5 at 60783e7).
"""

from __future__ import annotations

import functools
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from hvbatch.models.hunyuan_video_15 import sampling, variants
from hvbatch.models.hunyuan_video_15.glyph import (
    GLYPH_CHECKPOINT,
    extract_glyph_texts,
    glyph_prompt,
    inspect_glyph_official,
    read_glyph_state_dict,
)
from hvbatch.models.hunyuan_video_15.text_encoders import (
    SYSTEM_PROMPT_VIDEO,
    HunyuanVideo15TextEncoder,
    TextEncoder15Settings,
    TextEncoderPaths15,
    chat_messages,
    load_text_encoder_15,
    render_prompts,
    template_crop,
    tiny_text_encoder_15,
)
from tests.hv15_text_helpers import write_diffusers, write_glyph_checkpoint, write_official

TEXT_DIM, GLYPH_DIM = 64, 32
PROMPTS = ['a neon sign reads "OPEN 24H" above a door, “晚安” below', "rain on a tin roof"]


@pytest.fixture(scope="module")
def tiny() -> HunyuanVideo15TextEncoder:
    return tiny_text_encoder_15(TEXT_DIM, GLYPH_DIM, seed=3)


@pytest.fixture(scope="module")
def folders(tiny: HunyuanVideo15TextEncoder, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hv15_text")
    official = write_official(tiny, root / "ckpts")
    # The same folder with the Glyph checkpoint saved the way a training run wraps it.
    shutil.copytree(official, root / "ckpts_wrapped")
    wrapped = write_glyph_checkpoint(tiny, root / "ckpts_wrapped", wrapped=True)
    return {
        "official": official,
        "official-wrapped": wrapped,
        "diffusers": write_diffusers(tiny, root / "diffusers"),
    }


def _official_llm_reference(root: Path, prompts: list[str], crop: int, max_tokens: int = 1000) -> tuple:
    """The official computation with transformers directly: padded chat template, hidden_states, crop."""
    from transformers import AutoModel, AutoTokenizer

    paths = TextEncoderPaths15.find(root)
    tokenizer = AutoTokenizer.from_pretrained(paths.llm_tokenizer, padding_side="right")
    model = AutoModel.from_pretrained(paths.llm).eval()
    model = getattr(model, "language_model", model)
    tokens = tokenizer.apply_chat_template(
        [chat_messages(p) for p in prompts],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        padding="max_length",
        max_length=max_tokens + crop,
        truncation=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        hidden = model(
            input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"], output_hidden_states=True
        ).hidden_states
    return hidden, tokens["attention_mask"][:, crop:]


@pytest.mark.parametrize("layout", ["official", "diffusers"])
def test_llm_states_match_transformers_called_as_the_official_code(
    folders: dict[str, Path], layout: str
) -> None:
    encoder = load_text_encoder_15(folders[layout], llm_dtype=torch.float32)
    assert TextEncoderPaths15.find(folders[layout]).layout == layout
    encoded = encoder.encode(PROMPTS)
    hidden, mask_BL = _official_llm_reference(folders[layout], PROMPTS, encoder.crop_start)
    crop = encoder.crop_start
    assert len(hidden) == encoder.llm.config.num_hidden_layers + 1
    assert encoded.text_lengths == mask_BL.sum(1).tolist() and encoded.truncated == [False, False]
    assert encoded.text_states_BLD.shape == (2, max(encoded.text_lengths), TEXT_DIM)
    for i, n in enumerate(encoded.text_lengths):
        ours = encoded.text_states_BLD[i, :n]
        torch.testing.assert_close(ours, hidden[-3][i, crop : crop + n], rtol=1e-5, atol=1e-5)
        assert (ours - hidden[-2][i, crop : crop + n]).abs().max() > 1e-2  # not another layer
        assert not encoded.text_states_BLD[i, n:].any()  # zeros after the valid tokens


def test_both_layouts_and_the_in_memory_encoder_agree(
    tiny: HunyuanVideo15TextEncoder, folders: dict[str, Path]
) -> None:
    reference = tiny.encode(PROMPTS)
    for layout in ("official", "official-wrapped", "diffusers"):
        loaded = load_text_encoder_15(folders[layout], llm_dtype=torch.float32).encode(PROMPTS)
        assert loaded.text_lengths == reference.text_lengths
        assert loaded.glyph_lengths == reference.glyph_lengths
        assert torch.equal(loaded.text_states_BLD, reference.text_states_BLD), layout
        assert torch.equal(loaded.glyph_states_BGD, reference.glyph_states_BGD), layout


def test_template_crop_is_where_the_prompt_starts(tiny: HunyuanVideo15TextEncoder) -> None:
    tokenizer = tiny.llm_tokenizer
    for prompt in ["a cat", "rain on a tin roof", "“晚安”"]:
        rendered = render_prompts(tokenizer, [prompt])[0]
        assert rendered.startswith("<|im_start|>system\n" + SYSTEM_PROMPT_VIDEO + "<|im_end|>\n")
        ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        crop = template_crop(tokenizer)
        assert ids[crop : crop + len(prompt_ids)] == prompt_ids
        assert crop == len(tokenizer(rendered.split(prompt)[0], add_special_tokens=False)["input_ids"])
    # A different system prompt moves the crop by exactly its extra tokens.
    longer = SYSTEM_PROMPT_VIDEO + " Be brief."
    assert template_crop(tokenizer, longer) == template_crop(tokenizer) + len(b" Be brief.")


def test_template_crop_refuses_a_tokenizer_without_qwen_chat_format(tiny: HunyuanVideo15TextEncoder) -> None:
    from hvbatch.models.hf_text import byte_level_tokenizer

    other = byte_level_tokenizer(["<pad>", "</s>"], pad="<pad>", eos="</s>")
    with pytest.raises(ValueError, match="no chat template"):
        template_crop(other)
    other.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    with pytest.raises(ValueError, match="crop_start explicitly"):
        template_crop(other)


def test_truncation_is_flagged_and_cut_at_the_limits(tiny: HunyuanVideo15TextEncoder) -> None:
    settings = TextEncoder15Settings(max_text_tokens=20, glyph_max_tokens=12)
    short = HunyuanVideo15TextEncoder(tiny.llm, tiny.llm_tokenizer, tiny.glyph, settings)
    encoded = short.encode(['a long prompt with "SOME TEXT"', "ok"])
    assert encoded.truncated == [True, False]
    assert encoded.text_lengths == [20, 2 + 13]  # "ok" + <|im_end|>\n<|im_start|>assistant\n
    assert encoded.glyph_lengths == [12, 0]
    assert tiny.encode(['a long prompt with "SOME TEXT"']).truncated == [False]
    # The official tokenizer call truncates before adding EOS, so a cut glyph text still ends with it.
    ids = tiny.glyph.tokenizer('Text "SOME TEXT". ', max_length=12, truncation=True)["input_ids"]
    assert len(ids) == 12 and ids[-1] == tiny.glyph.tokenizer.eos_token_id


def test_negative_prompts_may_be_blank_and_carry_no_glyph_tokens(tiny: HunyuanVideo15TextEncoder) -> None:
    with pytest.raises(ValueError, match="empty prompt"):
        tiny.encode(["fine", "  "])
    negative = tiny.encode(["", 'blurry, "watermark"'], negative=True)
    assert negative.glyph_lengths == [0, 0] and negative.glyph_states_BGD.shape == (2, 0, GLYPH_DIM)
    blank = tiny.encode([" "], negative=True)
    # "" is encoded as " " (padding to the batch's longest prompt changes nothing but rounding).
    torch.testing.assert_close(
        negative.select(0).text_states_BLD, blank.text_states_BLD, rtol=1e-5, atol=1e-6
    )
    one = tiny.encode(PROMPTS).select(1)
    assert one.batch_size == 1 and one.text_states_BLD.shape[1] == one.text_lengths[0]


def _official_extract(prompt: str) -> list[str]:
    """`_extract_glyph_texts` of the official pipeline, written out."""
    matches = re.findall(r"\"(.*?)\"|“(.*?)”", prompt)
    result = [m[0] or m[1] for m in matches]
    return list(dict.fromkeys(result)) if len(result) > 1 else result


GLYPH_CASES = [
    ("a cat on a mat", []),
    ('a sign saying "OPEN"', ["OPEN"]),
    ('"A" then "B" then "A"', ["A", "B"]),
    ('"A" "A"', ["A"]),
    ("“你好” and “世界”", ["你好", "世界"]),
    ('mixed "ascii" and “中文”', ["ascii", "中文"]),
    ('“he said "hi"” there', ['he said "hi"']),
    ('"outer “inner” end"', ["outer “inner” end"]),
    ('unbalanced "open only', []),
    ('"closed" then "dangling', ["closed"]),
    ('three quotes " a " b "', [" a "]),
    ('empty "" quotes', [""]),
    ('"line\nbreak" "next"', [" "]),  # quotes pair within a line only
    ("single 'quotes' and ‘curly’ and 「corner」", []),
    ("reversed ”quotes“", []),
]


@pytest.mark.parametrize(("prompt", "texts"), GLYPH_CASES)
def test_glyph_texts_follow_the_official_rules(prompt: str, texts: list[str]) -> None:
    from diffusers.pipelines.hunyuan_video1_5.pipeline_hunyuan_video1_5 import extract_glyph_texts as theirs

    assert extract_glyph_texts(prompt) == _official_extract(prompt) == texts
    # The official `MultilingualPromptFormat.format_prompt` with every style None, written out.
    official = "".join(f'Text "{t}"' + ". " for t in texts) if texts else None
    assert glyph_prompt(prompt) == official == theirs(prompt)


def test_glyph_states_match_t5_called_as_the_official_code(tiny: HunyuanVideo15TextEncoder) -> None:
    glyph = tiny.glyph
    prompts = [PROMPTS[0], 'just "x"', "no quotes"]
    encoded = glyph.encode(prompts)
    assert encoded.lengths[2] == 0 and encoded.truncated == [False] * 3
    for i, prompt in enumerate(prompts[:2]):
        tokens = glyph.tokenizer(
            glyph_prompt(prompt),
            padding="max_length",
            max_length=256,
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        )
        with torch.no_grad():
            reference = glyph.model(tokens.input_ids, attention_mask=tokens.attention_mask.float())[0][0]
        n = int(tokens.attention_mask.sum())
        assert encoded.lengths[i] == n
        assert tokens.input_ids[0, n - 1] == glyph.tokenizer.eos_token_id
        torch.testing.assert_close(encoded.states_BGD[i, :n], reference[:n], rtol=1e-5, atol=1e-5)
        assert not encoded.states_BGD[i, n:].any()
    assert not encoded.states_BGD[2].any()


def test_glyph_tokens_include_the_added_colour_and_font_tokens(tiny: HunyuanVideo15TextEncoder) -> None:
    tokenizer = tiny.glyph.tokenizer
    ids = tokenizer.convert_tokens_to_ids(
        ["<color-0>", "<color-2>", "<en-font-0>", "<zh-font-0>", "<en-font-1>"]
    )
    assert ids == [384, 386, 387, 388, 389] and len(tokenizer) == tiny.glyph.model.config.vocab_size == 390


def test_official_glyph_checkpoint_is_checked_strictly(folders: dict[str, Path], tmp_path: Path) -> None:
    checkpoint = folders["official"] / "text_encoder/Glyph-SDXL-v2" / GLYPH_CHECKPOINT
    wrapped = folders["official-wrapped"] / "text_encoder/Glyph-SDXL-v2" / GLYPH_CHECKPOINT
    bare, unwrapped = read_glyph_state_dict(checkpoint), read_glyph_state_dict(wrapped)
    assert bare.keys() == unwrapped.keys() and "embed_tokens.weight" in bare
    model, shapes = inspect_glyph_official(checkpoint.parents[2] / "byt5-small", checkpoint.parents[1])
    assert model.encoder.final_layer_norm.weight.is_meta and shapes == {k: v.shape for k, v in bare.items()}
    del model, shapes  # memory-mapped: let go of the file before it is rewritten below
    bad = {k: v for k, v in bare.items() if k != "final_layer_norm.weight"}
    bad["block.0.layer.0.SelfAttention.q.weight"] = torch.zeros(3, 3)
    torch.save(bad, checkpoint)
    try:
        with pytest.raises(ValueError, match=r"final_layer_norm\.weight(.|\n)*SelfAttention\.q\.weight"):
            load_text_encoder_15(folders["official"])
    finally:
        torch.save(bare, checkpoint)
    with pytest.raises(ValueError, match=r"no HunyuanVideo-1\.5 text encoders"):
        load_text_encoder_15(tmp_path)
    assert TextEncoderPaths15.find(folders["official"]).missing() == []


def _diffusers_pipeline(tiny: HunyuanVideo15TextEncoder) -> object:
    from diffusers import (
        AutoencoderKLHunyuanVideo15,
        ClassifierFreeGuidance,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideo15Pipeline,
    )

    vae = AutoencoderKLHunyuanVideo15(block_out_channels=(8, 8, 8, 8, 8), layers_per_block=1)
    return HunyuanVideo15Pipeline(
        text_encoder=tiny.llm,
        tokenizer=tiny.llm_tokenizer,
        transformer=None,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0),
        text_encoder_2=tiny.glyph.model,
        tokenizer_2=tiny.glyph.tokenizer,
        guider=ClassifierFreeGuidance(guidance_scale=6.0),
    )


def test_diffusers_encode_prompt_agrees_where_it_matches_the_official_code(
    tiny: HunyuanVideo15TextEncoder,
) -> None:
    pipe = _diffusers_pipeline(tiny)
    ours = tiny.encode(PROMPTS)
    # diffusers hard-codes the Qwen2.5-VL crop (108): with it the states start inside the template.
    assert pipe.prompt_template_encode_start_idx == 108 != tiny.crop_start
    pipe.prompt_template_encode_start_idx = tiny.crop_start
    states, mask, glyph, glyph_mask = pipe.encode_prompt(PROMPTS, device="cpu", batch_size=2)
    assert states.shape == (2, 1000, TEXT_DIM) and glyph.shape == (2, 256, GLYPH_DIM)
    assert mask.sum(1).tolist() == ours.text_lengths and glyph_mask.sum(1).tolist() == ours.glyph_lengths
    for i in range(2):
        n, g = ours.text_lengths[i], ours.glyph_lengths[i]
        torch.testing.assert_close(ours.text_states_BLD[i, :n], states[i, :n], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours.glyph_states_BGD[i, :g], glyph[i, :g], rtol=1e-5, atol=1e-5)
    # Where they differ: diffusers puts a negative prompt's quoted text through byT5; the official
    # negative branch always encodes "" (no glyph tokens), as ours does.
    _, _, _, negative_glyph_mask = pipe.encode_prompt(['no "TEXT"'], device="cpu", batch_size=1)
    assert negative_glyph_mask.sum() > 0
    assert tiny.encode(['no "TEXT"'], negative=True).glyph_lengths == [0]


# hyvideo/commons/__init__.py PIPELINE_CONFIGS (guidance_scale, flow_shift; embedded_guidance_scale
# is None everywhere), with the steps of the README's model table.
OFFICIAL_DEFAULTS = {
    "480p_t2v": (6.0, 5.0, 50),
    "480p_i2v": (6.0, 5.0, 50),
    "720p_t2v": (6.0, 9.0, 50),
    "720p_i2v": (6.0, 7.0, 50),
    "480p_t2v_distilled": (1.0, 5.0, 50),
    "480p_i2v_distilled": (1.0, 5.0, 50),
    "720p_t2v_distilled": (1.0, 9.0, 50),
    "720p_i2v_distilled": (1.0, 7.0, 50),
    "720p_t2v_distilled_sparse": (1.0, 9.0, 50),
    "720p_i2v_distilled_sparse": (1.0, 7.0, 50),
    "480p_i2v_step_distilled": (1.0, 7.0, 12),
}


def test_variant_table_holds_the_official_defaults() -> None:
    assert set(variants.VARIANTS) == set(OFFICIAL_DEFAULTS)
    for name, (cfg, shift, steps) in OFFICIAL_DEFAULTS.items():
        v = variants.variant(name)
        assert (v.cfg_scale, v.flow_shift, v.default_steps) == (cfg, shift, steps), name
        assert v.embedded_guidance_scale is None and v.bucket_base_size == (640 if "480p" in name else 960)
        assert v.cfg_distilled == ("distilled" in name and "step" not in name)
        assert variants.variant(v.preset) is v
        v.check_steps(v.default_steps)
    assert variants.DEFAULT_NUM_FRAMES == 121 and variants.FPS == 24
    runnable = [v.name for v in variants.VARIANTS.values() if v.unsupported_reason is None]
    assert runnable == ["480p_t2v", "720p_t2v", "480p_t2v_distilled"]
    step = variants.variant("480p_i2v_step_distilled")
    assert step.meanflow and step.allowed_steps == (4, 8, 12)
    for steps in (8, 12, 4):
        step.check_steps(steps)
    with pytest.raises(ValueError, match=r"runs 4 or 8 or 12 steps, not num_inference_steps=50"):
        step.check_steps(50)
    with pytest.raises(ValueError, match="must use 50 steps"):
        variants.variant("480p_t2v_distilled").check_steps(30)
    variants.variant("480p_t2v").check_steps(30)
    with pytest.raises(ValueError, match=r"unknown HunyuanVideo-1\.5 variant 'hunyuan-video-1\.5-1080p'"):
        variants.variant("hunyuan-video-1.5-1080p")


def test_variant_detection_from_checkpoint_configs() -> None:
    t2v_480 = {"target_size": 640, "task_type": "t2v", "use_meanflow": False}
    assert variants.variant_from_diffusers_config(t2v_480, {"guidance_scale": 6.0}).name == "480p_t2v"
    assert (
        variants.variant_from_diffusers_config(t2v_480, {"guidance_scale": 1.0}).name == "480p_t2v_distilled"
    )
    step = {"target_size": 640, "task_type": "i2v", "use_meanflow": True}
    assert variants.variant_from_diffusers_config(step).name == "480p_i2v_step_distilled"
    assert variants.variant_from_diffusers_config({"target_size": 960, "task_type": "t2v"}).name == "720p_t2v"
    with pytest.raises(ValueError, match="target_size=512"):
        variants.variant_from_diffusers_config({"target_size": 512, "task_type": "t2v"})
    assert variants.variant_from_official_folder("720p_i2v_distilled").cfg_distilled


@functools.cache
def _official_buckets(base: int) -> tuple[list[tuple[int, int]], np.ndarray]:
    """`generate_crop_size_list(base, 16)` of hyvideo/utils/data_utils.py and its ratios, written out."""
    num_patches = round((base / 16) ** 2)
    crop_size_list, wp, hp = [], num_patches, 1
    while wp > 0:
        if max(wp, hp) / min(wp, hp) <= 4.0:
            crop_size_list.append((wp * 16, hp * 16))
        if (hp + 1) * wp <= num_patches:
            hp += 1
        else:
            wp -= 1
    return crop_size_list, np.array([round(float(h) / float(w), 5) for h, w in crop_size_list])


def _official_bucket(width: int, height: int, base: int) -> tuple[int, int]:
    """The official `get_closest_ratio`: the argmin of |ratio - h/w| (the first on a tie)."""
    crop_size_list, ratios = _official_buckets(base)
    return crop_size_list[int(np.abs(ratios - float(height) / float(width)).argmin())]


def test_buckets_are_the_official_closest_crop_sizes() -> None:
    assert variants.bucket_for("16:9", "480p") == (480, 848)
    assert variants.bucket_for("16:9", "720p") == (720, 1280)
    assert variants.bucket_for("9:16", "480p") == (848, 480) and variants.bucket_for("1:1", "720p") == (
        960,
        960,
    )
    assert (
        len(variants.generate_crop_size_list(640)) == 121
        and len(variants.generate_crop_size_list(960)) == 181
    )
    for resolution, base in variants.BUCKET_BASE_SIZE.items():
        for width in range(1, 25):
            for height in range(1, 25):
                ours = variants.bucket_for(f"{width}:{height}", resolution)
                assert ours == _official_bucket(width, height, base), (width, height, resolution)
                assert ours[0] % 16 == 0 and ours[1] % 16 == 0
        assert variants.bucket_for((1920, 1080), resolution) == variants.bucket_for("16:9", resolution)
    for bad in ("16x9", "16:0", "1.5:1", "-1:2", "16:9:1"):
        with pytest.raises(ValueError, match="width:height in positive integers"):
            variants.bucket_for(bad, "480p")
    with pytest.raises(ValueError, match="480p and 720p"):
        variants.bucket_for("16:9", "1080p")


def test_sizes_the_16x_vae_cannot_take_are_refused_with_what_to_use() -> None:
    variants.check_size(480, 848, 121)
    with pytest.raises(ValueError, match=r"height=504 .* nearest: 496 or 512(.|\n)*bucket .* 480x848"):
        variants.check_size(504, 896, 121, resolution="480p")
    with pytest.raises(ValueError, match=r"width=840 .*nearest: 832 or 848"):
        variants.check_size(480, 840, 121)
    with pytest.raises(ValueError, match=r"num_frames=120 is not of the form 4k\+1 \(nearest: 117 or 121"):
        variants.check_size(480, 848, 120)


def _official_sigmas(num_steps: int, shift: float) -> torch.Tensor:
    """`FlowMatchDiscreteScheduler(shift, reverse=True).set_timesteps(N)`'s sigmas, written out."""
    sigmas = torch.linspace(1, 0, num_steps + 1)
    if shift != 1.0:
        sigmas = (shift * sigmas) / (1 + (shift - 1) * sigmas)
    return sigmas


def test_schedule_is_the_official_float32_one_and_within_an_ulp_of_1_0s() -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler

    from hvbatch.sampling.scheduler import flow_match_schedule

    differ_from_1_0 = 0
    for shift in (1.0, 2.0, 5.0, 7.0, 9.0):
        for steps in (1, 2, 8, 12, 30, 50):
            sigmas, timesteps = sampling.flow_schedule(steps, shift)
            official = _official_sigmas(steps, shift)
            assert torch.equal(sigmas, official) and torch.equal(timesteps, (official[:-1] * 1000).float())
            old = flow_match_schedule(steps, shift)
            assert (old.sigmas - sigmas).abs().max() <= 1.2e-7
            differ_from_1_0 += not torch.equal(old.sigmas, sigmas)
            scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
            scheduler.set_timesteps(steps, sigmas=np.linspace(1.0, 0.0, steps + 1)[:-1])
            assert (scheduler.sigmas - sigmas).abs().max() <= 1.2e-7
    assert differ_from_1_0 > 0
    with pytest.raises(ValueError, match="must be >= 1"):
        sampling.flow_schedule(0, 5.0)


def test_meanflow_timestep_r_is_the_next_timestep_and_zero_at_the_end() -> None:
    sigmas, timesteps = sampling.flow_schedule(8, 7.0)
    r = sampling.next_timesteps(timesteps)
    # The official loop: `timesteps[i + 1]`, or `tensor([0.0])` at the last step.
    official = [
        timesteps[i + 1] if i < len(timesteps) - 1 else torch.tensor(0.0) for i in range(len(timesteps))
    ]
    assert torch.equal(r, torch.stack(official)) and r.dtype == torch.float32
    assert torch.equal(r, (sigmas[1:] * 1000).float())


def test_noise_is_bfloat16_from_a_seeded_cpu_generator() -> None:
    shape = (1, 32, 3, 4, 6)
    noise = sampling.initial_noise(shape, 123)
    generator = torch.Generator("cpu").manual_seed(123)
    official = torch.randn(shape, generator=generator, device="cpu", dtype=torch.bfloat16)
    assert noise.dtype == torch.bfloat16 and noise.shape == shape and torch.equal(noise, official)
    float32 = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(123))
    assert torch.equal(noise, float32.to(torch.bfloat16))  # the float32 draw, rounded
    assert not torch.equal(noise, sampling.initial_noise(shape, 124))


def test_cfg_batch_order_is_negative_then_positive() -> None:
    negative, positive = torch.full((1, 2), 1.0), torch.full((1, 2), 3.0)
    combined = sampling.combine_cfg(torch.cat([negative, positive]), 6.0)
    assert torch.equal(combined, negative + 6.0 * (positive - negative))
    assert sampling.uses_cfg(6.0) and not sampling.uses_cfg(1.0)


def test_settings_values_and_paths_of_both_layouts(folders: dict[str, Path]) -> None:
    settings = TextEncoder15Settings()
    assert (settings.max_text_tokens, settings.hidden_state_skip_layer, settings.glyph_max_tokens) == (
        1000,
        2,
        256,
    )
    official = TextEncoderPaths15.find(folders["official"])
    assert official.llm.parts[-2:] == ("text_encoder", "llm") and official.glyph_assets is not None
    assert json.loads((official.glyph_model / "config.json").read_text())["vocab_size"] == 384
    diffusers = TextEncoderPaths15.find(folders["diffusers"])
    assert (diffusers.glyph_model.name, diffusers.glyph_tokenizer.name) == ("text_encoder_2", "tokenizer_2")


def test_variants_module_imports_no_torch() -> None:
    """variants.py itself is plain Python (the control plane checks steps and sizes with it)."""
    import subprocess
    import sys

    code = (
        "import importlib.util, sys; "
        f"spec = importlib.util.spec_from_file_location('v', {variants.__file__!r}); "
        "module = sys.modules['v'] = importlib.util.module_from_spec(spec); spec.loader.exec_module(module); "
        "print(module.bucket_for('16:9', '720p'), 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "(720, 1280) False"
