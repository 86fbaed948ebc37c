"""HunyuanVideo-I2V sampling on 2 and 3 gloo ranks equals 1 rank: the first-frame tokens' own
modulation follows the contiguous shards (Ulysses and Ring), also with CFG and step caching."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from hvbatch.config import transformer_preset
from hvbatch.models.hunyuan_video import random_transformer
from tests.helpers import rel_err
from tests.hv10_i2v_parallel_worker import i2v_equivalence_worker, run_cases
from tests.test_parallel import free_port, layouts_for


@pytest.fixture(scope="module")
def reference() -> dict[str, tuple[torch.Tensor, list[bool]]]:
    return run_cases(random_transformer(transformer_preset("tiny-i2v"), seed=0))


def test_every_case_pins_frame_zero_and_some_steps_are_skipped(
    reference: dict[str, tuple[torch.Tensor, list[bool]]],
) -> None:
    from tests.hv10_i2v_parallel_worker import cases

    for name, (_, _, cond, _) in cases().items():
        latents, history = reference[name]
        assert torch.equal(latents[:, :, :1], cond.first_frame_latent), name
        if "cache" in name:
            assert history[0] and history[-1] and not all(history), (name, history)


@pytest.mark.parametrize("world", [2, 3])
def test_n_ranks_equal_one_rank(
    tmp_path: Path, reference: dict[str, tuple[torch.Tensor, list[bool]]], world: int
) -> None:
    layouts = layouts_for(world)
    assert layouts == [(1, world), (world, 1)]
    mp.spawn(
        i2v_equivalence_worker, args=(world, free_port(), str(tmp_path), layouts), nprocs=world, join=True
    )
    for ulysses, ring in layouts:
        per_rank = [torch.load(tmp_path / f"u{ulysses}r{ring}-rank{r}.pt") for r in range(world)]
        for name, (expected, history) in reference.items():
            got, got_history = per_rank[0][name]
            assert rel_err(got, expected) <= 1e-5, (ulysses, ring, name, rel_err(got, expected))
            assert got_history == history, (ulysses, ring, name, got_history, history)
            assert all(torch.equal(p[name][0], got) for p in per_rank), "ranks disagree"
