"""HunyuanVideo-1.5 `forward_tokens` on contiguous image-token shards with USPAttention equals one rank
(gloo, CPU processes; token counts the rank count does not divide)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from tests.helpers import rel_err
from tests.hv15_parallel_worker import one_rank_outputs, sp_worker
from tests.test_parallel import free_port, layouts_for


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    return one_rank_outputs()


@pytest.mark.parametrize(
    ("world", "layouts"), [(2, layouts_for(2)), (3, layouts_for(3)), (4, [(2, 2)])], ids=["2", "3", "4"]
)
def test_n_ranks_equal_one_rank(
    tmp_path: Path, reference: dict[str, torch.Tensor], world: int, layouts: list[tuple[int, int]]
) -> None:
    """Every Ulysses x ring layout of 2 and 3 ranks, and ulysses 2 x ring 2."""
    mp.spawn(sp_worker, args=(world, free_port(), str(tmp_path), layouts), nprocs=world, join=True)
    for ulysses, ring in layouts:
        per_rank = [torch.load(tmp_path / f"u{ulysses}r{ring}-rank{r}.pt") for r in range(world)]
        for name, expected in reference.items():
            got = per_rank[0][name]
            assert rel_err(got, expected) <= 1e-5, (ulysses, ring, name, rel_err(got, expected))
            assert all(torch.equal(p[name], got) for p in per_rank), "ranks disagree"
