"""HunyuanVideo-1.5's glyph encoder: byT5-small with the Glyph-SDXL-v2 weights, on quoted text only.

The official rules (`hunyuan_video_pipeline.py`, `_extract_glyph_texts` / `_process_single_byt5_prompt`,
and `byT5/format_prompt.py`):
- the texts are what stands between ASCII double quotes `"..."` or Chinese double quotes `“...”`,
  matched left to right, non-greedy, within one line (single quotes, `‘’` and `「」` do not count);
  an opening quote without its closing one is ignored; `""` gives an empty text;
- with more than one text, repeats are dropped (first occurrence kept, in order);
- the texts are written `Text "A". Text "B". ` (no colour or font: every style is None) and
  tokenized with byT5's EOS, at most 256 tokens; the encoder's last hidden state (final norm
  applied) is the glyph stream;
- a prompt without quoted text has no glyph tokens (the official code passes zeros with an
  all-zero mask), and the negative branch always uses `""`, i.e. no glyph tokens either,
  whatever the negative prompt says (diffusers encodes the negative prompt's quotes instead).

Weights. Official layout (`ckpts/text_encoder/`): `byt5-small/` (google/byt5-small: its
`config.json` and tokenizer files are used; its weights are all replaced) and `Glyph-SDXL-v2/`
with `assets/color_idx.json`, `assets/multilingual_10-lang_idx.json` (the extra `<color-N>` and
`<xx-font-N>` tokens, added in that order after byT5's 384) and `checkpoints/byt5_model.pt` (the
encoder stack's state dict, bare or under `state_dict` with the prefix `module.text_tower.encoder.`).
Diffusers layout: `text_encoder_2/` (a `T5EncoderModel`, vocabulary already extended) and
`tokenizer_2/` (a `ByT5Tokenizer` holding the added tokens).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hvbatch.models.hf_text import dtype_keyword, transformers_module
from hvbatch.models.state_dict_check import check_state_dict, report_mismatch

GLYPH_MAX_TOKENS = 256
GLYPH_QUOTES = re.compile(r"\"(.*?)\"|“(.*?)”")
COLOR_ASSET = "assets/color_idx.json"
FONT_ASSET = "assets/multilingual_10-lang_idx.json"
GLYPH_CHECKPOINT = "checkpoints/byt5_model.pt"
WRAPPED_PREFIX = "module.text_tower.encoder."


def extract_glyph_texts(prompt: str) -> list[str]:
    """The quoted texts of `prompt`, by the official rules (see the module docstring)."""
    texts = [plain or chinese for plain, chinese in GLYPH_QUOTES.findall(prompt)]
    return list(dict.fromkeys(texts)) if len(texts) > 1 else texts


def glyph_prompt(prompt: str) -> str | None:
    """What byT5 reads for `prompt`: `Text "A". Text "B". `, or None without quoted text."""
    texts = extract_glyph_texts(prompt)
    return "".join(f'Text "{text}". ' for text in texts) if texts else None


def glyph_special_tokens(color_idx: dict[str, int], font_idx: dict[str, int]) -> list[str]:
    """The added tokens in the official order: `<color-i>` for each colour, then `<xx-font-N>`."""
    colors = [f"<color-{i}>" for i in range(len(color_idx))]
    fonts = [f"<{code[:2]}-font-{font_idx[code]}>" for code in font_idx]
    return colors + fonts


@dataclass
class GlyphStates:
    states_BGD: torch.Tensor
    """`[B, G, D]`: each prompt's valid glyph tokens first, zeros after; G is the longest (may be 0)."""
    lengths: list[int]
    truncated: list[bool]


class GlyphEncoder:
    """byT5 and its tokenizer; `encode(prompts)` gives the glyph stream of each prompt."""

    def __init__(self, model: Any, tokenizer: Any, max_tokens: int = GLYPH_MAX_TOKENS) -> None:
        self.model, self.tokenizer = model.eval().requires_grad_(False), tokenizer
        self.max_tokens = max_tokens

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def width(self) -> int:
        return int(self.model.config.d_model)

    @torch.no_grad()
    def encode(
        self, prompts: list[str], *, negative: bool = False, max_tokens: int | None = None
    ) -> GlyphStates:
        """`negative=True`: the official negative branch (`""`: no glyph tokens for any prompt)."""
        limit = self.max_tokens if max_tokens is None else max_tokens
        texts = [None if negative else glyph_prompt(p) for p in prompts]
        pieces: list[torch.Tensor] = []
        truncated: list[bool] = []
        for text in texts:
            if text is None:
                pieces.append(torch.zeros(0, self.width, device=self.device, dtype=self.model.dtype))
                truncated.append(False)
                continue
            full = self.tokenizer(text, add_special_tokens=True)["input_ids"]
            ids = self.tokenizer(text, add_special_tokens=True, max_length=limit, truncation=True)[
                "input_ids"
            ]
            truncated.append(len(full) > limit)
            ids_1G = torch.tensor([ids], device=self.device)
            # Unpadded: with byT5's mask, padding never changes the valid tokens' states.
            pieces.append(self.model(input_ids=ids_1G, attention_mask=torch.ones_like(ids_1G))[0][0])
        lengths = [int(p.shape[0]) for p in pieces]
        states = torch.zeros(
            len(prompts), max(lengths, default=0), self.width, device=self.device, dtype=self.model.dtype
        )
        for i, piece in enumerate(pieces):
            states[i, : lengths[i]] = piece
        return GlyphStates(states, lengths, truncated)

    def to(self, device: torch.device | str) -> None:
        self.model.to(device)


def _t5_encoder_config(byt5_dir: Path, vocab_size: int) -> Any:
    config = transformers_module().T5Config.from_pretrained(byt5_dir, local_files_only=True)
    config.vocab_size = vocab_size
    return config


def read_glyph_state_dict(path: str | Path, *, mmap: bool = False) -> dict[str, torch.Tensor]:
    """The encoder stack's tensors from an official `byt5_model.pt` (bare, or wrapped as training saves it).

    Like the official loader, a wrapped checkpoint keeps only the `module.text_tower.encoder.` keys.
    `mmap=True` maps the file (where its format allows) so that listing it reads no values; the
    tensors are then backed by the file, which must not change while they live.
    """
    try:
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except RuntimeError:  # a legacy (non-zip) file cannot be memory-mapped
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"glyph encoder: cannot read {path} with weights_only=True: {err}") from err
    if "state_dict" in checkpoint:
        wrapped = checkpoint["state_dict"]
        return {k[len(WRAPPED_PREFIX) :]: v for k, v in wrapped.items() if k.startswith(WRAPPED_PREFIX)}
    return dict(checkpoint)


def glyph_tokenizer(byt5_dir: str | Path, glyph_dir: str | Path) -> Any:
    """byT5's tokenizer with the Glyph-SDXL-v2 colour and font tokens added (official layout)."""
    transformers = transformers_module()
    tokenizer = transformers.AutoTokenizer.from_pretrained(byt5_dir, local_files_only=True)
    color_idx = json.loads((Path(glyph_dir) / COLOR_ASSET).read_text())
    font_idx = json.loads((Path(glyph_dir) / FONT_ASSET).read_text())
    tokenizer.add_tokens(glyph_special_tokens(color_idx, font_idx), special_tokens=True)
    return tokenizer


def _official_parts(
    byt5_dir: Path, glyph_dir: Path, *, mmap: bool
) -> tuple[Any, Any, dict[str, torch.Tensor]]:
    """The tokenizer, the encoder on the meta device and the checkpoint's tensors, checked strictly."""
    for needed in (byt5_dir / "config.json", glyph_dir / COLOR_ASSET, glyph_dir / FONT_ASSET):
        if not needed.is_file():
            raise ValueError(
                f"glyph encoder: {needed} not found; the official layout has ckpts/text_encoder/byt5-small/ "
                f"(google/byt5-small) and ckpts/text_encoder/Glyph-SDXL-v2/ ({COLOR_ASSET}, {FONT_ASSET}, "
                f"{GLYPH_CHECKPOINT})"
            )
    checkpoint = glyph_dir / GLYPH_CHECKPOINT
    if not checkpoint.is_file():
        raise ValueError(f"glyph encoder: {checkpoint} not found (the Glyph-SDXL-v2 byT5 weights)")
    tokenizer = glyph_tokenizer(byt5_dir, glyph_dir)
    with torch.device("meta"):
        model = transformers_module().T5EncoderModel(_t5_encoder_config(byt5_dir, len(tokenizer)))
    state = read_glyph_state_dict(checkpoint, mmap=mmap)
    check_state_dict(
        {k: v.shape for k, v in model.encoder.state_dict().items()},
        {k: v.shape for k, v in state.items()},
        format_name="official Glyph-SDXL-v2 byT5 encoder",
        path=checkpoint,
        hint=f"  the model's vocabulary ({len(tokenizer)}) is byT5's plus the assets' colour/font tokens",
    )
    return tokenizer, model, state


def inspect_glyph_official(byt5_dir: str | Path, glyph_dir: str | Path) -> tuple[Any, dict[str, torch.Size]]:
    """For doctor: the encoder on the meta device and the checkpoint's shapes (no values read).

    Raises the loader's ValueError when a file is missing or the tensors do not fit.
    """
    _, model, state = _official_parts(Path(byt5_dir), Path(glyph_dir), mmap=True)
    return model, {k: v.shape for k, v in state.items()}


def load_glyph_official(
    byt5_dir: str | Path,
    glyph_dir: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> GlyphEncoder:
    """`ckpts/text_encoder/byt5-small` + `ckpts/text_encoder/Glyph-SDXL-v2`, strict, weights_only."""
    tokenizer, model, state = _official_parts(Path(byt5_dir), Path(glyph_dir), mmap=False)
    model.encoder.load_state_dict(state, strict=True, assign=True)
    model.set_input_embeddings(model.encoder.embed_tokens)  # re-tie `shared` (assign replaced it)
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    assert not left, f"glyph encoder tensors not loaded: {left}"
    return GlyphEncoder(model.to(device=device, dtype=dtype), tokenizer)


def load_glyph_diffusers(
    model_dir: str | Path,
    tokenizer_dir: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> GlyphEncoder:
    """A diffusers folder's `text_encoder_2/` (T5EncoderModel) and `tokenizer_2/` (ByT5Tokenizer)."""
    transformers = transformers_module()
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise ValueError(f"glyph encoder: {model_dir} has no config.json (expected text_encoder_2/)")
    model, info = transformers.T5EncoderModel.from_pretrained(
        model_dir,
        local_files_only=True,
        output_loading_info=True,
        **{dtype_keyword(transformers.__version__): dtype},
    )
    report_mismatch(
        missing=sorted(info["missing_keys"]),
        unexpected=sorted(info["unexpected_keys"]),
        mismatched=sorted(str(k) for k in info.get("mismatched_keys", ())),
        format_name="diffusers T5EncoderModel",
        path=model_dir,
    )
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    if len(tokenizer) != model.config.vocab_size:
        raise ValueError(
            f"glyph encoder: {tokenizer_dir} has {len(tokenizer)} tokens but {model_dir} embeds "
            f"{model.config.vocab_size}: the tokenizer must hold the Glyph colour/font tokens"
        )
    return GlyphEncoder(model.to(device), tokenizer)


TINY_COLORS = {"white": 0, "black": 1, "red": 2}
TINY_FONTS = {"en-Tiny-Regular": 0, "zh-Tiny-Song": 0, "en-Tiny-Bold": 1}


def tiny_glyph_encoder(width: int, *, seed: int = 0) -> GlyphEncoder:
    """A 2-layer T5 encoder of `width`, seeded, with byT5's tokenizer (no file) and tiny glyph tokens."""
    transformers = transformers_module()
    tokenizer = transformers.ByT5Tokenizer()
    tokenizer.add_tokens(glyph_special_tokens(TINY_COLORS, TINY_FONTS), special_tokens=True)
    heads = 4
    config = transformers.T5Config(
        vocab_size=len(tokenizer),
        d_model=width,
        d_kv=max(1, width // heads),
        d_ff=2 * width,
        num_layers=2,
        num_heads=heads,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.T5EncoderModel(config)
    return GlyphEncoder(model, tokenizer)
