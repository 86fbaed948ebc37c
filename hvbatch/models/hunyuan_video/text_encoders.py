"""HunyuanVideo's text conditioning: LLaVA-Llama-3 hidden states and CLIP-L's pooled output.

Computed exactly as the reference does: the prompt goes into the video template (the image
template when frames == 1), is tokenized with right padding to `crop_start + 256` tokens,
the LLM's hidden state three from the end (skip 2, no final norm) is taken, and the template's
`crop_start` tokens are cut off, giving text states `[B, 256, 4096]` and the mask `[B, 256]`.
CLIP-L (77 tokens) gives the pooled `[B, 768]`.

`transformers` is an optional extra (`pip install 'hvbatch[encoders]'`); it is imported only
when encoders are built. The tiny preset builds small Llama and CLIP models of the same classes
with seeded random weights and a byte-level tokenizer made in code, so it runs the same code path
as the real weights without any download.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from hvbatch.models.encoding import EncodedPrompts
from hvbatch.models.hf_text import byte_level_tokenizer, dtype_keyword, transformers_module
from hvbatch.models.hunyuan_video.conditioning import TextConditioning
from hvbatch.models.hunyuan_video.config import TextEncoderConfig

logger = logging.getLogger(__name__)

VIDEO_TEMPLATE = (
    "<|start_header_id|>system<|end_header_id|>\n\nDescribe the video by detailing the following aspects: "
    "1. The main content and theme of the video."
    "2. The color, shape, size, texture, quantity, text, and spatial relationships of the objects."
    "3. Actions, events, behaviors temporal relationships, physical movement changes of the objects."
    "4. background environment, light, style and atmosphere."
    "5. camera angles, movements, and transitions used in the video:<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>"
)
IMAGE_TEMPLATE = (
    "<|start_header_id|>system<|end_header_id|>\n\nDescribe the image by detailing the color, shape, size, "
    "texture, quantity, text, spatial relationships of the objects and background:<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>"
)
LLAMA_SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|pad|>",
]
CLIP_SPECIAL_TOKENS = ["<|startoftext|>", "<|endoftext|>"]
_transformers = transformers_module


class HunyuanTextEncoder:
    """Both encoders and their tokenizers; `encode(prompts, num_frames)` gives the model's conditioning."""

    def __init__(
        self, llm: Any, llm_tokenizer: Any, clip: Any, clip_tokenizer: Any, settings: TextEncoderConfig
    ) -> None:
        self.llm, self.llm_tokenizer = llm.eval().requires_grad_(False), llm_tokenizer
        self.clip, self.clip_tokenizer = clip.eval().requires_grad_(False), clip_tokenizer
        self.settings = settings
        self.llm_tokenizer.padding_side = "right"

    @property
    def device(self) -> torch.device:
        return next(self.llm.parameters()).device

    def to(self, device: torch.device) -> None:
        """Move both encoders' weights (e.g. to host memory while videos denoise, and back)."""
        if device != self.device:
            self.llm.to(device)
            self.clip.to(device)

    def template_and_crop(self, num_frames: int) -> tuple[str, int]:
        """The template for a video (image when `num_frames == 1`) and its token count before the prompt."""
        video = num_frames > 1
        template = VIDEO_TEMPLATE if video else IMAGE_TEMPLATE
        crop = self.settings.crop_start_video if video else self.settings.crop_start_image
        if crop is None:
            prefix = template.split("{}")[0]
            crop = len(self.llm_tokenizer(prefix)["input_ids"])
        return template, crop

    def _llm_states(
        self, prompts: list[str], num_frames: int
    ) -> tuple[torch.Tensor, torch.Tensor, list[bool]]:
        template, crop = self.template_and_crop(num_frames)
        texts = [template.format(p) for p in prompts]
        max_length = crop + self.settings.max_text_tokens
        tokens = self.llm_tokenizer(
            texts, max_length=max_length, padding="max_length", truncation=True, return_tensors="pt"
        )
        full_lengths = [len(ids) for ids in self.llm_tokenizer(texts)["input_ids"]]
        outputs = self.llm(
            input_ids=tokens["input_ids"].to(self.device),
            attention_mask=tokens["attention_mask"].to(self.device),
            output_hidden_states=True,
        )
        states = outputs.hidden_states[-(self.settings.hidden_state_skip_layer + 1)]
        return (
            states[:, crop:],
            tokens["attention_mask"][:, crop:],  # on the host: the lengths are read from it once
            [n > max_length for n in full_lengths],
        )

    def _clip_pooled(self, prompts: list[str]) -> tuple[torch.Tensor, list[bool]]:
        limit = self.settings.clip_max_tokens
        tokens = self.clip_tokenizer(
            prompts, max_length=limit, padding="max_length", truncation=True, return_tensors="pt"
        )
        full_lengths = [len(ids) for ids in self.clip_tokenizer(prompts)["input_ids"]]
        pooled = self.clip(
            input_ids=tokens["input_ids"].to(self.device), output_hidden_states=False
        ).pooler_output
        return pooled, [n > limit for n in full_lengths]

    @torch.no_grad()
    def encode(self, prompts: list[str], num_frames: int, *, allow_blank: bool = False) -> EncodedPrompts:
        """`allow_blank` for the negative prompt, which is `" "` when none is given."""
        empty = [i for i, p in enumerate(prompts) if not p.strip()]
        if empty and not allow_blank:
            raise ValueError(f"empty prompt at position(s) {empty}: every prompt needs some text")
        states, mask, llm_cut = self._llm_states(prompts, num_frames)
        pooled, clip_cut = self._clip_pooled(prompts)
        truncated = [a or b for a, b in zip(llm_cut, clip_cut, strict=True)]
        for prompt, cut in zip(prompts, truncated, strict=True):
            if cut:
                logger.warning(
                    "prompt truncated to %d LLM / %d CLIP tokens: %.80s...",
                    self.settings.max_text_tokens,
                    self.settings.clip_max_tokens,
                    prompt,
                )
        return EncodedPrompts(TextConditioning.from_mask(states, mask, pooled), truncated)

    def key(self, prompt: str, num_frames: int) -> ConditioningKey:
        return conditioning_key(prompt, num_frames)

    def encoding_frames(self, num_frames: int) -> int:
        """2 for any video (the video template), 1 for an image (the image template)."""
        return 2 if num_frames > 1 else 1


ConditioningKey = tuple[str, bool]
"""What an encoding depends on: the prompt and its template (video, or image when num_frames == 1)."""


def conditioning_key(prompt: str, num_frames: int) -> ConditioningKey:
    return prompt, num_frames > 1


def tiny_text_encoder(
    text_dim: int, pooled_dim: int, *, seed: int = 0, settings: TextEncoderConfig | None = None
) -> HunyuanTextEncoder:
    """Small Llama and CLIP text models with seeded random weights, and byte-level tokenizers."""
    transformers = _transformers()
    # Like Llama 3 (BOS only) and CLIP (BOS ... EOS, padded with EOS).
    llm_tokenizer = byte_level_tokenizer(
        LLAMA_SPECIAL_TOKENS, bos="<|begin_of_text|>", eos="<|end_of_text|>", pad="<|pad|>", add_bos=True
    )
    clip_tokenizer = byte_level_tokenizer(
        CLIP_SPECIAL_TOKENS,
        bos="<|startoftext|>",
        eos="<|endoftext|>",
        pad="<|endoftext|>",
        add_bos=True,
        add_eos=True,
    )
    llm_config = transformers.LlamaConfig(
        vocab_size=len(llm_tokenizer),
        hidden_size=text_dim,
        intermediate_size=2 * text_dim,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        pad_token_id=llm_tokenizer.pad_token_id,
    )
    clip_config = transformers.CLIPTextConfig(
        vocab_size=len(clip_tokenizer),
        hidden_size=pooled_dim,
        intermediate_size=2 * pooled_dim,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        bos_token_id=clip_tokenizer.bos_token_id,
        eos_token_id=clip_tokenizer.eos_token_id,
        pad_token_id=clip_tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        llm = transformers.LlamaModel(llm_config)
        clip = transformers.CLIPTextModel(clip_config)
    # The byte-level template is longer than Llama 3's: measure the crop instead of using 95 / 36.
    settings = settings or TextEncoderConfig(crop_start_video=None, crop_start_image=None)
    return HunyuanTextEncoder(llm, llm_tokenizer, clip, clip_tokenizer, settings)


def _require_folder(folder: Path, what: str, layout_hint: str) -> Path:
    if not (folder / "config.json").is_file():
        raise ValueError(f"{what} not found: {folder} has no config.json. Expected {layout_hint}")
    return folder


def load_text_encoder(
    llm_dir: str | Path,
    clip_dir: str | Path,
    *,
    llm_tokenizer_dir: str | Path | None = None,
    clip_tokenizer_dir: str | Path | None = None,
    settings: TextEncoderConfig | None = None,
    dtype: torch.dtype = torch.float16,
    device: torch.device | str = "cpu",
) -> HunyuanTextEncoder:
    """Local folders only: `AutoModel` (the Llama language model) and `CLIPTextModel`, with tokenizers.

    Official layout: `ckpts/text_encoder/` and `ckpts/text_encoder_2/`, tokenizers inside them.
    Diffusers layout: `text_encoder/` + `tokenizer/` and `text_encoder_2/` + `tokenizer_2/`.
    """
    transformers = _transformers()
    hint = (
        "ckpts/text_encoder and ckpts/text_encoder_2 (official) or text_encoder/, tokenizer/, "
        "text_encoder_2/, tokenizer_2/ (diffusers)"
    )
    llm_dir = _require_folder(Path(llm_dir), "LLM text encoder", hint)
    clip_dir = _require_folder(Path(clip_dir), "CLIP text encoder", hint)
    load: dict[str, Any] = dict(local_files_only=True)
    weights = {**load, dtype_keyword(transformers.__version__): dtype}
    llm = transformers.AutoModel.from_pretrained(llm_dir, **weights).to(device)
    clip = transformers.CLIPTextModel.from_pretrained(clip_dir, **weights).to(device)
    llm_tokenizer = transformers.AutoTokenizer.from_pretrained(llm_tokenizer_dir or llm_dir, **load)
    clip_tokenizer = transformers.AutoTokenizer.from_pretrained(clip_tokenizer_dir or clip_dir, **load)
    return HunyuanTextEncoder(llm, llm_tokenizer, clip, clip_tokenizer, settings or TextEncoderConfig())
