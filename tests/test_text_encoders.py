"""Text conditioning: our encoder against a direct transformers computation, both layouts, errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hvbatch.models.hunyuan_video.config import TextEncoderConfig
from hvbatch.models.hunyuan_video.text_encoders import (
    IMAGE_TEMPLATE,
    VIDEO_TEMPLATE,
    dtype_keyword,
    load_text_encoder,
    tiny_text_encoder,
)

PROMPTS = ["a red fox jumps over a frozen creek at dawn", "rain"]


@pytest.fixture(scope="module")
def official_folders(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ckpts/text_encoder and ckpts/text_encoder_2, each holding its model and tokenizer."""
    root = tmp_path_factory.mktemp("ckpts")
    encoder = tiny_text_encoder(48, 24, seed=5)
    encoder.llm.save_pretrained(root / "text_encoder")
    encoder.llm_tokenizer.save_pretrained(root / "text_encoder")
    encoder.clip.save_pretrained(root / "text_encoder_2")
    encoder.clip_tokenizer.save_pretrained(root / "text_encoder_2")
    return root


def _reference(root: Path, prompts: list[str], template: str, crop: int) -> tuple[torch.Tensor, ...]:
    """The reference computation, written out with transformers directly."""
    from transformers import AutoModel, AutoTokenizer, CLIPTextModel

    tokenizer = AutoTokenizer.from_pretrained(root / "text_encoder")
    tokenizer.padding_side = "right"
    llm = AutoModel.from_pretrained(root / "text_encoder").eval()
    tokens = tokenizer(
        [template.format(p) for p in prompts],
        max_length=crop + 256,
        padding="max_length",
        truncation=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        # Only ids and mask: older transformers' tokenizers also return token_type_ids, which Llama refuses.
        ids, mask = tokens["input_ids"], tokens["attention_mask"]
        hidden = llm(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-3]
        clip_tokenizer = AutoTokenizer.from_pretrained(root / "text_encoder_2")
        clip = CLIPTextModel.from_pretrained(root / "text_encoder_2").eval()
        clip_tokens = clip_tokenizer(
            prompts, max_length=77, padding="max_length", truncation=True, return_tensors="pt"
        )
        pooled = clip(input_ids=clip_tokens["input_ids"]).pooler_output
    return hidden[:, crop:], tokens["attention_mask"][:, crop:], pooled


@pytest.mark.parametrize(("num_frames", "template"), [(129, VIDEO_TEMPLATE), (1, IMAGE_TEMPLATE)])
def test_official_layout_matches_direct_computation(
    official_folders: Path, num_frames: int, template: str
) -> None:
    settings = TextEncoderConfig(crop_start_video=None, crop_start_image=None)
    encoder = load_text_encoder(
        official_folders / "text_encoder",
        official_folders / "text_encoder_2",
        settings=settings,
        dtype=torch.float32,
    )
    _, crop = encoder.template_and_crop(num_frames)
    prefix_ids = encoder.llm_tokenizer(template.split("{}")[0])["input_ids"]
    assert crop == len(prefix_ids) > 10
    encoded = encoder.encode(PROMPTS, num_frames)
    states, mask, pooled = _reference(official_folders, PROMPTS, template, crop)
    cond = encoded.conditioning
    assert cond.text_states.shape == (2, 256, 48) and cond.text_states_2.shape == (2, 24)
    assert torch.equal(cond.text_states, states)
    assert torch.equal(cond.text_mask, mask)
    assert torch.equal(cond.text_states_2, pooled)
    # Right padding; the prompt's bytes plus <|eot_id|> are the valid tokens after the crop.
    assert mask[1].tolist() == [1] * (len("rain") + 1) + [0] * (256 - len("rain") - 1)
    assert encoded.truncated == [False, False]


def test_diffusers_layout_with_separate_tokenizer_folders(official_folders: Path, tmp_path: Path) -> None:
    encoder = tiny_text_encoder(48, 24, seed=5)
    for sub, part in (
        ("text_encoder", encoder.llm),
        ("tokenizer", encoder.llm_tokenizer),
        ("text_encoder_2", encoder.clip),
        ("tokenizer_2", encoder.clip_tokenizer),
    ):
        part.save_pretrained(tmp_path / sub)
    settings = TextEncoderConfig(crop_start_video=None, crop_start_image=None)
    loaded = load_text_encoder(
        tmp_path / "text_encoder",
        tmp_path / "text_encoder_2",
        llm_tokenizer_dir=tmp_path / "tokenizer",
        clip_tokenizer_dir=tmp_path / "tokenizer_2",
        settings=settings,
        dtype=torch.float32,
    )
    reference = load_text_encoder(
        official_folders / "text_encoder",
        official_folders / "text_encoder_2",
        settings=settings,
        dtype=torch.float32,
    )
    a, b = loaded.encode(PROMPTS, 5).conditioning, reference.encode(PROMPTS, 5).conditioning
    assert torch.equal(a.text_states, b.text_states) and torch.equal(a.text_states_2, b.text_states_2)


def test_long_prompts_are_truncated_and_flagged(caplog: pytest.LogCaptureFixture) -> None:
    encoder = tiny_text_encoder(32, 16)
    encoded = encoder.encode(["short", "word " * 300], num_frames=5)
    assert encoded.truncated == [False, True]
    assert encoded.conditioning.text_mask[1].sum() == 256
    assert "prompt truncated" in caplog.text


def test_errors(tmp_path: Path) -> None:
    encoder = tiny_text_encoder(32, 16)
    with pytest.raises(ValueError, match=r"empty prompt at position\(s\) \[1\]"):
        encoder.encode(["ok", "   "], num_frames=5)
    with pytest.raises(ValueError, match=r"LLM text encoder not found.*ckpts/text_encoder"):
        load_text_encoder(tmp_path / "nope", tmp_path / "nope2")


@pytest.mark.parametrize(
    ("version", "keyword"),
    [
        ("4.45.0", "torch_dtype"),  # the extras' lower bound
        ("4.55.4", "torch_dtype"),
        ("4.56.0.dev0", "dtype"),
        ("4.56.0", "dtype"),
        ("4.57.6", "dtype"),
        ("5.0.0rc1", "dtype"),
        ("5.24.0", "dtype"),
    ],
)
def test_dtype_keyword_by_transformers_version(version: str, keyword: str) -> None:
    assert dtype_keyword(version) == keyword


@pytest.mark.parametrize("pretend_version", [None, "4.45.2"])
def test_encoders_load_in_the_requested_dtype(
    official_folders: Path, monkeypatch: pytest.MonkeyPatch, pretend_version: str | None
) -> None:
    """float16 weights with the installed version's keyword, and with the one older versions take."""
    import transformers

    if pretend_version is not None:
        monkeypatch.setattr(transformers, "__version__", pretend_version)
    encoder = load_text_encoder(
        official_folders / "text_encoder", official_folders / "text_encoder_2", dtype=torch.float16
    )
    for module in (encoder.llm, encoder.clip):
        assert {p.dtype for p in module.parameters()} == {torch.float16}
