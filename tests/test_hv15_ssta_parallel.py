"""HunyuanVideo-1.5 with SSTA on contiguous image-token shards (Ulysses x ring, gloo CPU processes)
equals one rank: the tiles and their selection come from the whole grid, not a rank's shard."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from tests.helpers import rel_err
from tests.hv15_ssta_worker import one_rank_outputs, ssta_sp_worker
from tests.test_parallel import free_port


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    return one_rank_outputs()


@pytest.mark.parametrize(
    ("world", "layouts"), [(2, [(2, 1), (1, 2)]), (4, [(4, 1), (2, 2), (1, 4)])], ids=["2", "4"]
)
def test_ssta_n_ranks_equal_one_rank(
    tmp_path: Path, reference: dict[str, torch.Tensor], world: int, layouts: list[tuple[int, int]]
) -> None:
    """Ulysses only (the full-grid kernel per head group), ring only (rotated blocks, masked partial
    tiles, the padding added at the end) and both."""
    mp.spawn(ssta_sp_worker, args=(world, free_port(), str(tmp_path), layouts), nprocs=world, join=True)
    for ulysses, ring in layouts:
        per_rank = [torch.load(tmp_path / f"u{ulysses}r{ring}-rank{r}.pt") for r in range(world)]
        for name, expected in reference.items():
            got = per_rank[0][name]
            assert rel_err(got, expected) <= 1e-5, (ulysses, ring, name, rel_err(got, expected))
            assert all(torch.equal(p[name], got) for p in per_rank), "ranks disagree"
