"""Encoded prompts and the job's store of them (any family: the conditioning is the family's).

`PromptStore` keeps each distinct encoding once, keyed by what it depends on
(`PromptEncoder.key(prompt, num_frames)`), in host memory for the job's lifetime.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class EncodedPrompts:
    conditioning: Any
    """The family's conditioning object (`hvbatch.models.protocols.Conditioning`), batch = prompts."""
    truncated: list[bool]
    """Per prompt: True when one of the text encoders cut it at its token limit."""


@dataclass
class PromptStore:
    """Encoded prompts kept in host memory, one entry per encoding key.

    A prompt repeated by `num_videos` (or used as every video's negative prompt) is encoded once.
    `errors` holds why a key could not be encoded; it is tried again by the next `missing` call.
    """

    entries: dict[Hashable, EncodedPrompts] = field(default_factory=dict)
    errors: dict[Hashable, Exception] = field(default_factory=dict)

    def missing(self, keys: list[Hashable]) -> list[Hashable]:
        """The distinct keys of `keys` not stored yet, in order (their old errors are forgotten)."""
        todo = [k for k in dict.fromkeys(keys) if k not in self.entries]
        for key in todo:
            self.errors.pop(key, None)
        return todo

    def put(self, key: Hashable, encoded: EncodedPrompts) -> None:
        self.entries[key] = EncodedPrompts(encoded.conditioning.to("cpu"), encoded.truncated)

    def get(self, key: Hashable) -> EncodedPrompts | None:
        """The stored encoding (on the CPU), None if never encoded; raises the error that stopped it."""
        if key in self.errors:
            raise self.errors[key]
        return self.entries.get(key)
