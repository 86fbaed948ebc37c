"""HunyuanVideo-1.5's text conditioning: Qwen2.5-VL hidden states and the byT5 glyph stream.

Computed as the official code does (`hyvideo/models/text_encoders/__init__.py`, the pipeline's
`encode_prompt` with `data_type="video"`):
- the prompt is the user turn of a chat whose system turn is the official video instruction
  (an empty prompt becomes `" "`), rendered by the tokenizer's own chat template with the
  assistant generation prompt;
- the template crop is computed, not written down: the tokens of a probe prompt are searched for
  the tokens of `<|im_start|>user\\n`, and the prompt starts right after them (108 for the
  Qwen2.5-VL tokenizer; diffusers hard-codes that 108, and it is wrong for any other tokenizer);
- at most `crop + 1000` tokens (right-truncated), the text model's `hidden_states[-3]` (two layers
  before the last, no final norm), the first `crop` tokens cut off. What is left (the prompt and the
  `<|im_end|>\\n<|im_start|>assistant\\n` tail) are the valid tokens.
The official code pads every prompt to `crop + 1000` tokens; we pad to the longest prompt of the
call. A causal model's valid tokens never see the padding, so their states are the same
(tests/test_hv15_text.py checks it against the padded computation).

Output: `EncodedText15` with text states `[B, L, 3584]` and glyph states `[B, G, 1472]`, valid tokens
first and zeros after, their lengths as Python ints, and a truncation flag per prompt.

Weights, official layout (`ckpts/`): `text_encoder/llm/` (the whole Qwen2.5-VL-7B-Instruct folder;
its text model is kept), `text_encoder/byt5-small/` and `text_encoder/Glyph-SDXL-v2/` (see glyph.py).
Diffusers layout (`HunyuanVideo-1.5-Diffusers-*`): `text_encoder/` (a `Qwen2_5_VLTextModel`),
`tokenizer/`, `text_encoder_2/` (the glyph `T5EncoderModel`), `tokenizer_2/`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from hvbatch.models.hf_text import byte_level_tokenizer, dtype_keyword, transformers_module
from hvbatch.models.hunyuan_video_15.glyph import (
    GLYPH_MAX_TOKENS,
    GlyphEncoder,
    load_glyph_diffusers,
    load_glyph_official,
    tiny_glyph_encoder,
)
from hvbatch.models.state_dict_check import report_mismatch

logger = logging.getLogger(__name__)

_ITEM_GAP = " " * 9
"""The official prompt is one string literal continued over lines with a backslash, so each numbered
item follows the previous one after 9 spaces (the space before the backslash and 8 of indent)."""
SYSTEM_PROMPT_VIDEO = _ITEM_GAP.join(
    [
        "You are a helpful assistant. Describe the video by detailing the following aspects:",
        "1. The main content and theme of the video.",
        "2. The color, shape, size, texture, quantity, text, and spatial relationships of the objects.",
        "3. Actions, events, behaviors temporal relationships, physical movement changes of the objects.",
        "4. background environment, light, style and atmosphere.",
        "5. camera angles, movements, and transitions used in the video.",
    ]
)
CROP_MARKER = "<|im_start|>user\n"
CROP_PROBE_PROMPT = "a photo of a cat"
MAX_TEXT_TOKENS = 1000
QWEN_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""Qwen2-VL's chat template for text-only turns, given to the tiny byte-level tokenizer."""


def chat_messages(prompt: str, system_prompt: str = SYSTEM_PROMPT_VIDEO) -> list[dict[str, str]]:
    """The official conversation for one prompt (an empty prompt becomes a space)."""
    return [{"role": "system", "content": system_prompt}, {"role": "user", "content": prompt or " "}]


def render_prompts(tokenizer: Any, prompts: list[str], system_prompt: str = SYSTEM_PROMPT_VIDEO) -> list[str]:
    """Each prompt through the tokenizer's chat template, with the assistant generation prompt."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "the Qwen2.5-VL tokenizer has no chat template: its folder needs the chat_template "
            "(tokenizer_config.json or chat_template.json) that Qwen2.5-VL-7B-Instruct ships"
        )
    return [
        tokenizer.apply_chat_template(
            chat_messages(p, system_prompt), tokenize=False, add_generation_prompt=True
        )
        for p in prompts
    ]


def template_crop(tokenizer: Any, system_prompt: str = SYSTEM_PROMPT_VIDEO) -> int:
    """How many template tokens come before the prompt, found as the official code finds it.

    The probe prompt's tokens are searched for the tokens of `<|im_start|>user\\n`; the prompt
    starts right after the first match. (Where the marker is missing the official code silently
    crops nothing; that would feed the system prompt to the model, so it is an error here.)
    """
    ids = tokenizer(
        render_prompts(tokenizer, [CROP_PROBE_PROMPT], system_prompt)[0], add_special_tokens=False
    )["input_ids"]
    marker = tokenizer(CROP_MARKER, add_special_tokens=False)["input_ids"]
    for start in range(len(ids) - len(marker) + 1):
        if ids[start : start + len(marker)] == marker:
            return start + len(marker)
    raise ValueError(
        f"the tokenized chat template has no {CROP_MARKER!r}: this tokenizer does not use Qwen's chat "
        "format, so the template crop cannot be found; set crop_start explicitly"
    )


@dataclass(frozen=True)
class TextEncoder15Settings:
    """How prompts become 1.5 conditioning (the official values by default)."""

    max_text_tokens: int = MAX_TEXT_TOKENS
    """LLM tokens kept after the template crop (longer prompts are truncated)."""
    hidden_state_skip_layer: int = 2
    """Use the LLM hidden state this many layers before the last (no final norm)."""
    crop_start: int | None = None
    """Template tokens before the prompt; None computes it from the tokenizer (108 for Qwen2.5-VL)."""
    glyph_max_tokens: int = GLYPH_MAX_TOKENS
    """byT5 tokens of the quoted text (EOS included)."""


@dataclass
class EncodedText15:
    """A batch of prompts' text conditioning, valid tokens first and zeros after."""

    text_states_BLD: torch.Tensor
    text_lengths: list[int]
    glyph_states_BGD: torch.Tensor
    glyph_lengths: list[int]
    truncated: list[bool]
    """Per prompt: True when the LLM or the glyph tokens were cut at their limit."""

    @property
    def batch_size(self) -> int:
        return len(self.text_lengths)

    def to(self, device: torch.device | str) -> EncodedText15:
        return replace(
            self,
            text_states_BLD=self.text_states_BLD.to(device),
            glyph_states_BGD=self.glyph_states_BGD.to(device),
        )

    def select(self, index: int) -> EncodedText15:
        """Prompt `index` alone, cut to its own lengths."""
        text, glyph = self.text_lengths[index], self.glyph_lengths[index]
        return EncodedText15(
            self.text_states_BLD[index : index + 1, :text],
            [text],
            self.glyph_states_BGD[index : index + 1, :glyph],
            [glyph],
            [self.truncated[index]],
        )


ConditioningKey15 = tuple[str, bool]
"""What an encoding depends on: the prompt, and whether it is a negative (no glyph tokens then)."""


def conditioning_key(prompt: str, *, negative: bool) -> ConditioningKey15:
    return prompt, negative


class HunyuanVideo15TextEncoder:
    """The Qwen2.5-VL text model, the glyph encoder and their tokenizers."""

    def __init__(
        self, llm: Any, llm_tokenizer: Any, glyph: GlyphEncoder, settings: TextEncoder15Settings | None = None
    ) -> None:
        self.llm, self.llm_tokenizer = llm.eval().requires_grad_(False), llm_tokenizer
        self.llm_tokenizer.padding_side = "right"
        self.settings = settings or TextEncoder15Settings()
        self.glyph = glyph
        crop = self.settings.crop_start
        self.crop_start = template_crop(llm_tokenizer) if crop is None else crop

    @property
    def device(self) -> torch.device:
        return next(self.llm.parameters()).device

    def to(self, device: torch.device | str) -> None:
        """Move both encoders' weights (e.g. to host memory while videos denoise, and back)."""
        self.llm.to(device)
        self.glyph.to(device)

    def llm_states(self, prompts: list[str]) -> tuple[torch.Tensor, list[int], list[bool]]:
        """`([B, L, D], lengths, truncated)`: the cropped hidden states, zero after each prompt's tokens."""
        texts = render_prompts(self.llm_tokenizer, prompts)
        max_length = self.crop_start + self.settings.max_text_tokens
        full_lengths = [len(ids) for ids in self.llm_tokenizer(texts, add_special_tokens=False)["input_ids"]]
        tokens = self.llm_tokenizer(
            texts,
            add_special_tokens=False,
            max_length=max_length,
            truncation=True,
            padding="longest",
            return_tensors="pt",
        )
        mask_BS = tokens["attention_mask"].to(self.device)
        hidden = self.llm(
            input_ids=tokens["input_ids"].to(self.device), attention_mask=mask_BS, output_hidden_states=True
        ).hidden_states[-(self.settings.hidden_state_skip_layer + 1)]
        mask_BL = mask_BS[:, self.crop_start :]
        lengths = [int(n) for n in mask_BL.sum(dim=1).tolist()]
        states_BLD = hidden[:, self.crop_start :] * mask_BL[..., None].to(hidden.dtype)
        return states_BLD[:, : max(lengths, default=0)], lengths, [n > max_length for n in full_lengths]

    @torch.no_grad()
    def encode(self, prompts: list[str], *, negative: bool = False) -> EncodedText15:
        """`negative=True` for negative prompts: may be blank, and carry no glyph tokens (official)."""
        empty = [i for i, p in enumerate(prompts) if not p.strip()]
        if empty and not negative:
            raise ValueError(f"empty prompt at position(s) {empty}: every prompt needs some text")
        states, lengths, llm_cut = self.llm_states(prompts)
        glyph = self.glyph.encode(prompts, negative=negative, max_tokens=self.settings.glyph_max_tokens)
        truncated = [a or b for a, b in zip(llm_cut, glyph.truncated, strict=True)]
        for prompt, cut in zip(prompts, truncated, strict=True):
            if cut:
                logger.warning(
                    "prompt truncated to %d LLM / %d glyph tokens: %.80s...",
                    self.settings.max_text_tokens,
                    self.settings.glyph_max_tokens,
                    prompt,
                )
        return EncodedText15(states, lengths, glyph.states_BGD, glyph.lengths, truncated)


def _mrope_section(head_dim: int) -> list[int]:
    """Qwen2.5-VL's (temporal, height, width) split of the rotary half-dimension (16, 24, 24 of 64)."""
    half = head_dim // 2
    temporal = half // 4
    height = (half - temporal) // 2
    return [temporal, height, half - temporal - height]


def tiny_llm(text_dim: int, *, seed: int = 0, num_layers: int = 4) -> tuple[Any, Any]:
    """A small seeded `Qwen2_5_VLTextModel` and a byte-level tokenizer with Qwen's chat format."""
    transformers = transformers_module()
    tokenizer = byte_level_tokenizer(
        QWEN_SPECIAL_TOKENS, pad="<|endoftext|>", eos="<|im_end|>", chat_template=QWEN_CHAT_TEMPLATE
    )
    heads = 4
    config = transformers.Qwen2_5_VLTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=text_dim,
        intermediate_size=2 * text_dim,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        rope_scaling={"type": "mrope", "mrope_section": _mrope_section(text_dim // heads)},
        bos_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.Qwen2_5_VLTextModel(config)
    return model, tokenizer


def tiny_text_encoder_15(
    text_dim: int, glyph_dim: int, *, seed: int = 0, settings: TextEncoder15Settings | None = None
) -> HunyuanVideo15TextEncoder:
    """Both encoders with the real classes' structure, small and seeded: no file, no download."""
    llm, tokenizer = tiny_llm(text_dim, seed=seed)
    return HunyuanVideo15TextEncoder(llm, tokenizer, tiny_glyph_encoder(glyph_dim, seed=seed + 1), settings)


def load_llm(
    folder: str | Path,
    tokenizer_folder: str | Path | None = None,
    *,
    dtype: torch.dtype = torch.float16,
    device: torch.device | str = "cpu",
) -> tuple[Any, Any]:
    """The Qwen2.5-VL text model and tokenizer from a local folder (official: the whole VL model).

    The official code loads `AutoModel` and keeps its `language_model`; so do we (the vision tower
    and `lm_head` are dropped). Missing weights are an error.
    """
    transformers = transformers_module()
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ValueError(
            f"Qwen2.5-VL text encoder: {folder} has no config.json (expected ckpts/text_encoder/llm/, "
            "the Qwen2.5-VL-7B-Instruct folder, or a diffusers text_encoder/)"
        )
    model, info = transformers.AutoModel.from_pretrained(
        folder,
        local_files_only=True,
        output_loading_info=True,
        **{dtype_keyword(transformers.__version__): dtype},
    )
    report_mismatch(
        missing=sorted(info["missing_keys"]),
        unexpected=sorted(k for k in info["unexpected_keys"] if not k.startswith("lm_head.")),
        mismatched=sorted(str(k) for k in info.get("mismatched_keys", ())),
        format_name=f"transformers {type(model).__name__}",
        path=folder,
    )
    text_model = getattr(model, "language_model", model)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_folder or folder, local_files_only=True)
    return text_model.to(device), tokenizer


@dataclass(frozen=True)
class TextEncoderPaths15:
    """Where a 1.5 checkpoint folder keeps each encoder file, by layout."""

    layout: str
    """`official` (the `ckpts/` folder) or `diffusers` (a `HunyuanVideo-1.5-Diffusers-*` folder)."""
    llm: Path
    llm_tokenizer: Path
    glyph_model: Path
    """Official: `byt5-small/` (config and tokenizer); diffusers: `text_encoder_2/`."""
    glyph_tokenizer: Path
    glyph_assets: Path | None
    """Official only: `Glyph-SDXL-v2/` (the colour/font assets and `checkpoints/byt5_model.pt`)."""

    @classmethod
    def find(cls, root: str | Path) -> TextEncoderPaths15:
        root = Path(root)
        if (root / "text_encoder" / "llm").is_dir():
            text = root / "text_encoder"
            byt5 = text / "byt5-small"
            return cls("official", text / "llm", text / "llm", byt5, byt5, text / "Glyph-SDXL-v2")
        if (root / "text_encoder" / "config.json").is_file() and (root / "text_encoder_2").is_dir():
            return cls(
                "diffusers",
                root / "text_encoder",
                root / "tokenizer",
                root / "text_encoder_2",
                root / "tokenizer_2",
                None,
            )
        raise ValueError(
            f"no HunyuanVideo-1.5 text encoders under {root}: expected text_encoder/llm/, "
            "text_encoder/byt5-small/ and text_encoder/Glyph-SDXL-v2/ (official ckpts/) or text_encoder/, "
            "tokenizer/, text_encoder_2/, tokenizer_2/ (diffusers)"
        )

    def required_files(self) -> list[Path]:
        """The files the loaders open (the weight files are found by transformers from the configs)."""
        files = [self.llm / "config.json", self.glyph_model / "config.json"]
        if self.glyph_assets is not None:
            files += [
                self.glyph_assets / "assets/color_idx.json",
                self.glyph_assets / "assets/multilingual_10-lang_idx.json",
            ]
            files.append(self.glyph_assets / "checkpoints/byt5_model.pt")
        return files

    def missing(self) -> list[Path]:
        return [f for f in self.required_files() if not f.is_file()]


def load_text_encoder_15(
    root: str | Path,
    *,
    settings: TextEncoder15Settings | None = None,
    llm_dtype: torch.dtype = torch.float16,
    glyph_dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> HunyuanVideo15TextEncoder:
    """Both encoders from a 1.5 folder in either layout (local files only).

    Default dtypes as the official code runs them: the LLM in float16, byT5 in float32.
    """
    paths = TextEncoderPaths15.find(root)
    llm, tokenizer = load_llm(paths.llm, paths.llm_tokenizer, dtype=llm_dtype, device=device)
    if paths.glyph_assets is not None:
        glyph = load_glyph_official(paths.glyph_model, paths.glyph_assets, dtype=glyph_dtype, device=device)
    else:
        glyph = load_glyph_diffusers(
            paths.glyph_model, paths.glyph_tokenizer, dtype=glyph_dtype, device=device
        )
    return HunyuanVideo15TextEncoder(llm, tokenizer, glyph, settings)
