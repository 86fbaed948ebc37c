"""Seeds of videos whose prompt row gives none: derived from the video's identity.

A row without a `seed` (no column, or null) gets a base seed from its prompt id and the batch's
`sampling.seed` (0 unless set), and its videos `base, base+1, ..., base+n-1` as a row with a seed
does: BLAKE2b-64 (personalised `hvbatch-seed`) of `"<sampling.seed>:<prompt id>"` in UTF-8, its
first 4 bytes big-endian, so `0 <= base < 2**32` (a seed numpy, torch and JSON readers all take).
The prompt id is the row's identity (explicit or its content hash), so a row keeps its seeds when
rows are reordered, added or removed; changing `sampling.seed` picks another deterministic set.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa

PERSON = b"hvbatch-seed"


def derived_base_seeds(prompt_ids: pa.Array, salts: np.ndarray) -> np.ndarray:
    """int64 base seed per row from its prompt id and `salts` (`sampling.seed` per row)."""
    new = hashlib.blake2b(digest_size=8, person=PERSON).copy
    out = np.empty(len(prompt_ids), np.int64)
    for i, (prompt_id, salt) in enumerate(zip(prompt_ids.to_pylist(), salts.tolist(), strict=True)):
        h = new()
        h.update(f"{salt}:{prompt_id}".encode())
        out[i] = int.from_bytes(h.digest()[:4], "big")
    return out
