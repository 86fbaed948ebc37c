"""The record every doctor check returns, and its one-line and JSON forms."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

Status = Literal["ok", "warn", "fail"]


@dataclass(frozen=True)
class Check:
    """The outcome of one check."""

    check: str
    """What was checked, e.g. `transformer` or `slurm accounting`."""
    status: Status
    detail: str
    """What was found, on one line."""
    fix: str = ""
    """What to do about a `warn` or `fail` (empty when there is nothing to do)."""

    def line(self) -> str:
        """`ok|warn|FAIL  <check>: <detail>; fix: <fix>`."""
        label = "FAIL" if self.status == "fail" else self.status
        fix = f"; fix: {self.fix}" if self.fix else ""
        return f"{label:<4}  {self.check}: {self.detail}{fix}"

    def to_dict(self) -> dict[str, str]:
        return dataclasses.asdict(self)


def one_line(text: str) -> str:
    """A possibly multi-line message as one line, its lines joined by `; `."""
    parts = [part.strip() for part in str(text).splitlines() if part.strip()]
    return "".join(p + (" " if p.endswith(":") else "; ") for p in parts[:-1]) + (parts[-1] if parts else "")


def guarded(name: str, check: Callable[[], list[Check]]) -> list[Check]:
    """Run `check`; a bug or an unexpected error in it becomes a `fail` line instead of a traceback."""
    try:
        return check()
    except Exception as err:  # one broken check must not hide the others
        return [
            Check(
                name,
                "fail",
                f"could not be checked: {type(err).__name__}: {one_line(str(err))}",
                "fix what the message names, then run hvbatch doctor again",
            )
        ]
