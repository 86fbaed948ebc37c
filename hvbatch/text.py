"""Untrusted text (video ids, prompts, paths, error messages) made safe to print on a terminal."""

from __future__ import annotations

import re

BIDI_CONTROLS = "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
"""Arabic letter mark, LRM/RLM, the embeddings and overrides, and the isolates: they reorder what
a terminal shows (a "Trojan Source" id reads differently from what it is)."""

_UNSAFE = re.compile(f"[\x00-\x1f\x7f-\x9f{BIDI_CONTROLS}]")
_UNSAFE_BUT_NEWLINE = re.compile(f"[\x00-\x09\x0b-\x1f\x7f-\x9f{BIDI_CONTROLS}]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(match: re.Match[str]) -> str:
    ch = match.group()
    return _NAMED.get(ch) or (f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}")


def printable(text: object) -> str:
    """`text` with C0 and C1 control characters, DEL and bidi controls written as escapes."""
    return _UNSAFE.sub(_escape, str(text))


def printable_lines(text: object) -> str:
    """Like `printable`, but line breaks stay line breaks (multi-line messages)."""
    text = str(text)
    if not _UNSAFE_BUT_NEWLINE.search(text):  # one scan of a long text (status --json of 100k shards)
        return text
    return "\n".join(printable(line) for line in text.split("\n"))


def count(n: int, noun: str, plural: str | None = None) -> str:
    """`1 video`, `2 videos`: a number and its noun in the right number."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"
