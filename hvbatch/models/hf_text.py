"""What every family's text encoders share: the optional `transformers` import, its dtype keyword,
and a byte-level tokenizer built in code for the tiny presets (no vocabulary file, no download).

`transformers` is the `encoders` extra (`pip install 'hvbatch[encoders]'`); it is imported only
when an encoder is built or loaded.
"""

from __future__ import annotations

from typing import Any

ENCODERS_HINT = "the text encoders need transformers: pip install 'hvbatch[encoders]'"

# `from_pretrained(dtype=...)` exists since transformers 4.56, which deprecated `torch_dtype=`; older
# versions do not know `dtype=` and would load the weights in float32.
DTYPE_KEYWORD_SINCE = "4.56"


def transformers_module() -> Any:
    """`transformers`, or SystemExit with the install hint."""
    try:
        import transformers
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise SystemExit(ENCODERS_HINT) from err
    return transformers


def dtype_keyword(transformers_version: str) -> str:
    """The `from_pretrained` keyword that sets the weights' dtype on this transformers version."""
    from packaging.version import Version

    return (
        "dtype"
        if Version(transformers_version).release >= Version(DTYPE_KEYWORD_SINCE).release
        else "torch_dtype"
    )


def byte_level_tokenizer(
    special_tokens: list[str],
    *,
    pad: str,
    eos: str,
    bos: str | None = None,
    add_bos: bool = False,
    add_eos: bool = False,
    chat_template: str | None = None,
) -> Any:
    """A fast tokenizer with one token per UTF-8 byte plus `special_tokens` (deterministic, no files).

    `add_bos` / `add_eos` say what `tokenizer(text)` wraps around the bytes.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokenizer = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(special_tokens)
    if add_bos and bos is None:
        raise ValueError("add_bos needs a bos token")
    before, after = [bos] if add_bos else [], [eos] if add_eos else []
    if before or after:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=" ".join([*before, "$A", *after]),
            special_tokens=[(t, tokenizer.token_to_id(t)) for t in {*before, *after}],
        )
    fast = transformers_module().PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=bos, eos_token=eos, pad_token=pad
    )
    if chat_template is not None:
        fast.chat_template = chat_template
    fast.padding_side = "right"
    return fast
