"""Reading a checkpoint's small JSON files (`config.json`, shard indices) with a size cap.

A `config.json` is a few KiB and a shard index a few hundred; a file of gigabytes (a sparse or
wrong file) is refused by its size before anything is read, instead of being read whole.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

MAX_JSON_BYTES = 16 << 20


def read_json(path: Path) -> Any:
    """The parsed JSON of `path`; ValueError naming the file if it is too large or not JSON."""
    size = path.stat().st_size
    if size > MAX_JSON_BYTES:
        raise ValueError(
            f"{path} is {size / 2**20:,.0f} MiB, more than the {MAX_JSON_BYTES >> 20} MiB a checkpoint's "
            "JSON file can be: it is not a config or index file; re-download it"
        )
    try:
        return json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
