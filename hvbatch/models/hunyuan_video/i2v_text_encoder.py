"""HunyuanVideo-I2V's prompt-and-image encoder: the full LLaVA-Llama-3-8B sees the image and the prompt.

As the official `TextEncoder.encode` (i2v mode) computes it: the prompt goes into the I2V video
template (`<image>` in the system turn, an empty assistant turn at the end), is tokenized with right
padding to `crop_start + 256` tokens, the `<image>` placeholder is expanded to LLaVA's 576 image
tokens, and hidden state `-(skip + 1)` is taken. Kept: the image tokens (every 4th for
token_replace: 144), then the prompt's tokens without the 4 tokens of the assistant header and from
there on the trailing `\\n\\n` and padding. So `text_states = [image tokens ; prompt ; \\n\\n ;
padding]`, right-padded. CLIP-L's pooled prompt is as for text-to-video. The unconditional
(negative) branch is the negative prompt with a black image of the same size.

Where diffusers (`HunyuanVideoImageToVideoPipeline._get_llama_prompt_embeds`) differs: it expands
the placeholder itself (as here: current transformers wants the expanded ids) and finds the
assistant header by `<|end_header_id|>` rather than the official `\\n\\n` token (id 271), which is
the same position for the Llama-3 tokenizer (and the one that works for the tiny byte-level
tokenizer): followed here. Its negative branch keeps every 2nd image token (its `encode_prompt`
default) where the official code keeps every 4th as for the prompt: the official is followed.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from hvbatch.models.encoding import EncodedPrompts
from hvbatch.models.hf_text import byte_level_tokenizer, dtype_keyword, transformers_module
from hvbatch.models.hunyuan_video.conditioning import TextConditioning
from hvbatch.models.hunyuan_video.config import TextEncoderConfig
from hvbatch.models.hunyuan_video.text_encoders import (
    LLAMA_SPECIAL_TOKENS,
    HunyuanTextEncoder,
    tiny_text_encoder,
)

VIDEO_I2V_TEMPLATE = (
    "<|start_header_id|>system<|end_header_id|>\n\n<image>\nDescribe the video by detailing the following "
    "aspects according to the reference image: "
    "1. The main content and theme of the video."
    "2. The color, shape, size, texture, quantity, text, and spatial relationships of the objects."
    "3. Actions, events, behaviors temporal relationships, physical movement changes of the objects."
    "4. background environment, light, style and atmosphere."
    "5. camera angles, movements, and transitions used in the video:<|eot_id|>\n\n"
    "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n"
)
IMAGE_TOKEN = "<image>"
END_HEADER = "<|end_header_id|>"
IMAGE_EMB_START = 5
"""Tokens before `<image>`: `<|begin_of_text|><|start_header_id|>system<|end_header_id|>\\n\\n`."""
ASSISTANT_HEADER_TOKENS = 4
"""`<|eot_id|><|start_header_id|>assistant<|end_header_id|>`: cut between the prompt and `\\n\\n`."""
MAX_INTERLEAVE = 6
"""The official code subsamples the image tokens only for `0 < image_embed_interleave < 6`."""
TINY_TEMPLATE_TOKENS = ["<image>", "system", "user", "assistant", "\n\n"]
"""Single tokens in the tiny tokenizer, so that its template has Llama 3's structure around the
image and the assistant header (5 tokens before `<image>`, a 4-token header)."""


def image_token_count(llava_config: Any) -> int:
    """Image tokens LLaVA puts in place of `<image>`: (image_size / patch)^2, +1 for the `full` strategy."""
    vision = llava_config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2
    return patches + (1 if llava_config.vision_feature_select_strategy == "full" else 0)


def rgb_image(image: Any) -> Image.Image:
    """A PIL RGB image from a PIL image or a uint8 `[H, W, 3]` array."""
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"an image must be PIL or uint8 [H, W, 3], got {array.dtype} {array.shape}")
    return Image.fromarray(array, "RGB")


class HunyuanI2VTextEncoder(HunyuanTextEncoder):
    """LLaVA (language model and vision tower), its image processor, and CLIP-L: prompt + image in."""

    def __init__(
        self,
        llava: Any,
        tokenizer: Any,
        image_processor: Any,
        clip: Any,
        clip_tokenizer: Any,
        settings: TextEncoderConfig,
    ) -> None:
        super().__init__(llava, tokenizer, clip, clip_tokenizer, settings)
        self.image_processor = image_processor
        self.num_image_tokens = image_token_count(llava.config)

    def crop_start(self) -> int:
        """Template tokens before the prompt (the `<image>` placeholder counted once)."""
        crop = self.settings.crop_start_i2v
        if crop is None:
            crop = len(self.llm_tokenizer(VIDEO_I2V_TEMPLATE.split("{}")[0])["input_ids"])
        return crop

    def encode(self, prompts: list[str], num_frames: int, *, allow_blank: bool = False) -> EncodedPrompts:
        raise ValueError(
            "an image-to-video model (HunyuanVideo-I2V) encodes each prompt with its image: every video "
            "needs an image (encode_with_images)"
        )

    @torch.no_grad()
    def encode_with_images(
        self, prompts: list[str], images: list[Any], num_frames: int, *, allow_blank: bool = False
    ) -> EncodedPrompts:
        """One prompt per image (PIL or uint8 HWC, the image as given: the processor resizes it)."""
        if num_frames < 2:
            raise ValueError(
                "HunyuanVideo-I2V makes videos only (num_frames > 1): its image template is unused"
            )
        if len(prompts) != len(images):
            raise ValueError(f"{len(prompts)} prompts for {len(images)} images")
        empty = [i for i, p in enumerate(prompts) if not p.strip()]
        if empty and not allow_blank:
            raise ValueError(f"empty prompt at position(s) {empty}: every prompt needs some text")
        parts = [self._llava_states(p, rgb_image(image)) for p, image in zip(prompts, images, strict=True)]
        states = torch.cat([states for states, _, _ in parts])
        mask = torch.cat([mask for _, mask, _ in parts])
        pooled, clip_cut = self._clip_pooled(prompts)
        truncated = [cut or c for (_, _, cut), c in zip(parts, clip_cut, strict=True)]
        return EncodedPrompts(TextConditioning.from_mask(states, mask, pooled), truncated)

    def _tokens(self, text: str) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """Token ids and mask `[L]` (right-padded to crop + max_text_tokens), and whether it was cut."""
        max_length = self.crop_start() + self.settings.max_text_tokens
        tokens = self.llm_tokenizer(
            [text], max_length=max_length, padding="max_length", truncation=True, return_tensors="pt"
        )
        cut = len(self.llm_tokenizer(text)["input_ids"]) > max_length
        return tokens["input_ids"][0], tokens["attention_mask"][0], cut

    def _expanded(self, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """LLaVA's inputs: `<image>` expanded to the image tokens (positions as diffusers gives them)."""
        image_id = self.llm_tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        where = (ids == image_id).nonzero().flatten().tolist()
        if where != [IMAGE_EMB_START]:
            raise ValueError(
                f"the I2V template must hold one {IMAGE_TOKEN} token at {IMAGE_EMB_START}, found {where}"
            )
        n, at = self.num_image_tokens, IMAGE_EMB_START
        expanded_ids = torch.cat([ids[:at], ids.new_full((n,), image_id), ids[at + 1 :]])
        expanded_mask = torch.cat([mask[:at], mask.new_ones(n), mask[at + 1 :]])
        position_ids = (expanded_mask.cumsum(-1) - 1).masked_fill(expanded_mask == 0, 1)
        inputs = {"input_ids": expanded_ids, "attention_mask": expanded_mask, "position_ids": position_ids}
        return {name: value[None].to(self.device) for name, value in inputs.items()}

    def _llava_states(self, prompt: str, image: Image.Image) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """`([1, Li + Lt, C] states, [1, Li + Lt] mask on the host, truncated)`."""
        ids, mask, cut = self._tokens(VIDEO_I2V_TEMPLATE.format(prompt))
        inputs = self._expanded(ids, mask)
        pixels = self.image_processor(image, return_tensors="pt")["pixel_values"]
        llava = self.llm
        pixels = pixels.to(device=self.device, dtype=llava.dtype)
        outputs = llava.model(**inputs, pixel_values=pixels, output_hidden_states=True)
        hidden = outputs.hidden_states[-(self.settings.hidden_state_skip_layer + 1)][0]
        crop, n = self.crop_start(), self.num_image_tokens
        headers = (ids == self.llm_tokenizer.convert_tokens_to_ids(END_HEADER)).nonzero().flatten().tolist()
        # The position after the assistant header; a prompt truncated into it has none (then: the end).
        after = headers[-1] + 1 if len(headers) >= 3 else ids.shape[0]
        text = torch.cat(
            [hidden[crop - 1 + n : after - 1 + n - ASSISTANT_HEADER_TOKENS], hidden[after - 1 + n :]]
        )
        text_mask = torch.cat([mask[crop : after - ASSISTANT_HEADER_TOKENS], mask[after:]])
        image_states = hidden[IMAGE_EMB_START : IMAGE_EMB_START + n]
        interleave = self.settings.image_embed_interleave
        if 0 < interleave < MAX_INTERLEAVE:
            image_states = image_states[::interleave]
        states = torch.cat([image_states, text])[None]
        full_mask = torch.cat([mask.new_ones(image_states.shape[0]), text_mask])[None]
        return states, full_mask, cut

    def image_key(self, prompt: str, image_sha256: str) -> tuple[str, str]:
        """What one encoding depends on: the prompt and the image's content (every video is a video)."""
        return prompt, image_sha256


def black_image(like: Image.Image) -> Image.Image:
    """The unconditional branch's image: black, of the image's size (official `black_image`)."""
    return Image.new("RGB", like.size, 0)


def image_processor_class() -> Any:
    """The Pillow-based CLIP image processor of the installed transformers (the official one's kind)."""
    transformers = transformers_module()
    return getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor


def tiny_i2v_text_encoder(
    text_dim: int, pooled_dim: int, *, seed: int = 0, settings: TextEncoderConfig | None = None
) -> HunyuanI2VTextEncoder:
    """A small LLaVA (Llama + CLIP vision, 16 image tokens) and CLIP text model with seeded random
    weights; byte-level tokenizers in code (with the template's structural words as single tokens)."""
    transformers = transformers_module()
    settings = settings or TextEncoderConfig(
        crop_start_video=None, crop_start_image=None, crop_start_i2v=None
    )
    clip_side = tiny_text_encoder(text_dim, pooled_dim, seed=seed + 1, settings=settings)
    tokenizer = byte_level_tokenizer(
        [*LLAMA_SPECIAL_TOKENS, *TINY_TEMPLATE_TOKENS],
        bos="<|begin_of_text|>",
        eos="<|end_of_text|>",
        pad="<|pad|>",
        add_bos=True,
    )
    text_config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=text_dim,
        intermediate_size=2 * text_dim,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision_config = transformers.CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=56,
        patch_size=14,
    )
    config = transformers.LlavaConfig(
        text_config=text_config.to_dict(),
        vision_config=vision_config.to_dict(),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=(56 // 14) ** 2,
    )
    config.pad_token_id = tokenizer.pad_token_id  # read by diffusers' pipeline (the released config has it)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        llava = transformers.LlavaForConditionalGeneration(config)
    processor = image_processor_class()(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
    return HunyuanI2VTextEncoder(
        llava, tokenizer, processor, clip_side.clip, clip_side.clip_tokenizer, settings
    )


def load_i2v_text_encoder(
    llava_dir: str | Path,
    clip_dir: str | Path,
    *,
    tokenizer_dir: str | Path | None = None,
    image_processor_dir: str | Path | None = None,
    clip_tokenizer_dir: str | Path | None = None,
    settings: TextEncoderConfig | None = None,
    dtype: torch.dtype = torch.float16,
    device: torch.device | str = "cpu",
) -> HunyuanI2VTextEncoder:
    """Local folders only: `LlavaForConditionalGeneration`, its tokenizer and CLIP image processor, and
    CLIP-L. Official layout: `ckpts/text_encoder_i2v/` (model, tokenizer and preprocessor config in
    one folder) and `ckpts/text_encoder_2/`; diffusers: `text_encoder/`, `tokenizer/`,
    `image_processor/`, `text_encoder_2/`, `tokenizer_2/`."""
    transformers = transformers_module()
    for folder, what in ((Path(llava_dir), "LLaVA text encoder"), (Path(clip_dir), "CLIP text encoder")):
        if not (folder / "config.json").is_file():
            raise ValueError(
                f"{what} not found: {folder} has no config.json. Expected ckpts/text_encoder_i2v and "
                "ckpts/text_encoder_2 (official) or text_encoder/, tokenizer/, image_processor/, "
                "text_encoder_2/, tokenizer_2/ (diffusers)"
            )
    load: dict[str, Any] = dict(local_files_only=True)
    weights = {**load, dtype_keyword(transformers.__version__): dtype}
    llava = transformers.LlavaForConditionalGeneration.from_pretrained(llava_dir, **weights).to(device)
    clip = transformers.CLIPTextModel.from_pretrained(clip_dir, **weights).to(device)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir or llava_dir, **load)
    processor = image_processor_class().from_pretrained(
        image_processor_dir or tokenizer_dir or llava_dir, **load
    )
    clip_tokenizer = transformers.AutoTokenizer.from_pretrained(clip_tokenizer_dir or clip_dir, **load)
    return HunyuanI2VTextEncoder(
        llava, tokenizer, processor, clip, clip_tokenizer, settings or TextEncoderConfig()
    )


def with_image_latent(cond: TextConditioning, latent: torch.Tensor, stability: bool) -> TextConditioning:
    """The encoded prompt with the first-frame latent it pins (one per batch element)."""
    if latent.shape[0] != cond.batch_size:
        latent = latent.expand(cond.batch_size, *latent.shape[1:]).contiguous()
    return dataclasses.replace(cond, first_frame_latent=latent, stability=stability)
