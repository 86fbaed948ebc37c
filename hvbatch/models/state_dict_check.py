"""Compare a checkpoint's tensors with what a model expects, and explain any mismatch.

Every loader (transformer, VAE) funnels through `check_state_dict` so that a bad checkpoint
always produces the same kind of message: which format was detected, which keys are missing,
which are unexpected and which have the wrong shape, the first few of each with counts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

_SHOWN_PER_KIND = 5


def _first_few(items: Sequence[str], label: str) -> str:
    shown = ", ".join(items[:_SHOWN_PER_KIND])
    more = f" (+{len(items) - _SHOWN_PER_KIND} more)" if len(items) > _SHOWN_PER_KIND else ""
    return f"  {len(items)} {label}: {shown}{more}"


def check_state_dict(
    expected: Mapping[str, torch.Size],
    found: Mapping[str, torch.Size],
    *,
    format_name: str,
    path: str | Path,
    hint: str = "",
) -> None:
    """Raise ValueError naming every kind of mismatch between `expected` and `found` shapes."""
    report_mismatch(
        missing=sorted(k for k in expected if k not in found),
        unexpected=sorted(k for k in found if k not in expected),
        mismatched=sorted(
            f"{k} (checkpoint {tuple(found[k])}, model {tuple(expected[k])})"
            for k in expected
            if k in found and tuple(found[k]) != tuple(expected[k])
        ),
        format_name=format_name,
        path=path,
        hint=hint,
    )


def report_mismatch(
    *,
    missing: Sequence[str],
    unexpected: Sequence[str],
    mismatched: Sequence[str],
    format_name: str,
    path: str | Path,
    hint: str = "",
) -> None:
    """Raise the standard checkpoint-mismatch ValueError, or return if all three lists are empty."""
    if not (missing or unexpected or mismatched):
        return
    lines = [f"checkpoint {path} (detected format: {format_name}) does not match the model:"]
    if missing:
        lines.append(_first_few(missing, "missing keys"))
    if unexpected:
        lines.append(_first_few(unexpected, "unexpected keys"))
    if mismatched:
        lines.append(_first_few(mismatched, "shape mismatches"))
    if hint:
        lines.append(hint)
    raise ValueError("\n".join(lines))
