"""N-rank sequence-parallel sampling equals 1-rank sampling (gloo, CPU, several processes)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from hvbatch.config import transformer_preset
from hvbatch.models.hunyuan_video import random_transformer
from hvbatch.parallel.dims import ParallelDims
from tests.helpers import rel_err
from tests.parallel_worker import (
    count_forward_flops,
    equivalence_worker,
    run_cached_cases,
    run_cases,
    work_split_worker,
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def layouts_for(world: int, num_heads: int = 12) -> list[tuple[int, int]]:
    """Every (ulysses, ring) with ulysses * ring == world that the head count allows."""
    return [(u, world // u) for u in range(1, world + 1) if world % u == 0 and num_heads % u == 0]


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    return run_cases(random_transformer(transformer_preset("tiny"), seed=0))


@pytest.fixture(scope="module")
def cached_reference() -> dict[str, tuple[torch.Tensor, list[bool]]]:
    return run_cached_cases(random_transformer(transformer_preset("tiny"), seed=0))


@pytest.mark.parametrize("world", [2, 3, 4, 6, 8])
def test_n_ranks_equal_one_rank(
    tmp_path: Path,
    reference: dict[str, torch.Tensor],
    cached_reference: dict[str, tuple[torch.Tensor, list[bool]]],
    world: int,
) -> None:
    """Also with step caching (P <= 4; 35 tokens: padded shards): the same steps skipped as on 1 rank."""
    layouts = layouts_for(world)
    assert len(layouts) >= 2
    mp.spawn(equivalence_worker, args=(world, free_port(), str(tmp_path), layouts), nprocs=world, join=True)
    for ulysses, ring in layouts:
        per_rank = [torch.load(tmp_path / f"u{ulysses}r{ring}-rank{r}.pt") for r in range(world)]
        for name, expected in reference.items():
            got = per_rank[0][name]
            assert rel_err(got, expected) <= 1e-5, (ulysses, ring, name, rel_err(got, expected))
            assert all(torch.equal(p[name], got) for p in per_rank), "ranks disagree"
        assert all(bool(p["text_agrees"]) for p in per_rank)
        for name, (latents, history) in cached_reference.items() if world <= 4 else ():
            assert not all(history) and history[0] and history[-1], (name, history)
            for got_latents, got_history in (p["cached"][name] for p in per_rank):
                assert got_history == history, (ulysses, ring, name, got_history, history)
                err = rel_err(got_latents, latents)
                assert err <= 1e-5, (ulysses, ring, name, err)


def test_layout_validation_names_every_factor() -> None:
    with pytest.raises(ValueError, match=r"ulysses\(5\) must divide the model's 24 attention heads"):
        ParallelDims(dp=1, ulysses=5, ring=1, world_size=5).validate(24)
    with pytest.raises(ValueError) as info:
        ParallelDims(dp=2, ulysses=4, ring=2, world_size=8).validate(24)
    assert "dp(2) * cfg(1) * ulysses(4) * ring(2) = 16 != WORLD_SIZE(8)" in str(info.value)


def test_rank_layout() -> None:
    dims = ParallelDims(dp=2, ulysses=2, ring=3, world_size=12)
    assert dims.ulysses_ranks(7) == [6, 7]
    assert dims.ring_ranks(7) == [7, 9, 11]
    assert dims.sp_ranks(7) == [6, 7, 8, 9, 10, 11]
    assert dims.coordinates(9) == (1, 0, 1, 1)  # (dp, cfg, ring, ulysses)


@pytest.mark.parametrize(("ulysses", "ring"), [(2, 1), (1, 2), (2, 2)])
def test_work_is_really_split(tmp_path: Path, ulysses: int, ring: int) -> None:
    """Per-rank FLOPs ~ 1/P of one rank's; bytes sent per layer match the Ulysses and Ring formulas."""
    world = ulysses * ring
    model = random_transformer(transformer_preset("tiny"), seed=0)
    single_flops, single_out = count_forward_flops(model)
    mp.spawn(
        work_split_worker, args=(world, free_port(), str(tmp_path), ulysses, ring), nprocs=world, join=True
    )
    results = [torch.load(tmp_path / f"split-rank{r}.pt") for r in range(world)]
    config = model.config
    num_layers = config.num_double_blocks + config.num_single_blocks
    for result in results:
        assert rel_err(result["out"], single_out) <= 1e-5
        assert result["flops"] <= 1.05 * single_flops / world, (result["flops"], single_flops / world)
        # parallel.md: V_U = 4 S d (u-1) / (u P), V_R = 2 S d (r-1) / P per layer per rank, S = P * shard.
        tokens = world * result["shard_len"]
        bytes_per_value = 4  # float32
        d = config.hidden_size
        expected_ulysses = 4 * tokens * d * (ulysses - 1) / (ulysses * world) * bytes_per_value
        expected_ring = 2 * tokens * d * (ring - 1) / world * bytes_per_value
        assert result["bytes"]["ulysses"] == pytest.approx(expected_ulysses * num_layers, rel=1e-9, abs=1)
        assert result["bytes"]["ring"] == pytest.approx(expected_ring * num_layers, rel=1e-9, abs=1)


def test_generate_nproc_equals_one_process(tmp_path: Path) -> None:
    """`hvbatch generate --nproc 3` (ulysses 3 x ring 1 on 12 heads) gives the 1-process latents."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    example = Path(__file__).resolve().parents[1] / "configs" / "examples" / "tiny-cpu.yaml"
    latents = {}
    for nproc in (1, 3):
        out = tmp_path / f"n{nproc}"
        command = [
            sys.executable, "-m", "hvbatch", "generate", "--nproc", str(nproc), "--config", str(example),
            "--prompt", "a kite over the sea", "--out", str(out / "v.mp4"),
            "--save-latents", str(out / "v.safetensors"),
        ]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True, check=True)
        latents[nproc] = load_file(str(out / "v.safetensors"))["latents"]
        assert (out / "v.mp4").is_file()
    assert "ulysses 3 x ring 1 over 3 ranks" in result.stdout
    assert rel_err(latents[3], latents[1]) <= 1e-5


@pytest.mark.parametrize(
    ("nproc", "overrides", "message"),
    [
        (3, ["parallel.ulysses=5"], "ulysses(5) must divide the model's 12 attention heads"),
        (4, ["parallel.ulysses=2", "parallel.ring=3"], "ulysses(2) * ring(3) = 6 != WORLD_SIZE(4)"),
        (2, ["parallel.ring=zero"], "parallel.ring='zero' must be 'auto' or a positive integer"),
    ],
)
def test_bad_explicit_layout_fails_before_anything_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], nproc: int, overrides: list[str], message: str
) -> None:
    from hvbatch.cli import main

    example = Path(__file__).resolve().parents[1] / "configs" / "examples" / "tiny-cpu.yaml"
    argv = ["generate", "--nproc", str(nproc), "--config", str(example), "--prompt", "x"]
    assert main([*argv, "--out", str(tmp_path / "o" / "v.mp4"), *overrides]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("world", [5, 7])
def test_720p_token_grid_on_odd_rank_counts(tmp_path: Path, world: int) -> None:
    """720x1280's 45 x 80 token grid (one latent frame: 3600 tokens) on 5 and 7 ranks equals 1 rank."""
    from hvbatch.sampling import initial_noise
    from tests.helpers import latent_shape
    from tests.parallel_worker import conditioning, forward_worker, guided

    shape = (1, *latent_shape(720, 1280, 1))
    model = random_transformer(transformer_preset("tiny"), seed=0)
    cond = conditioning(5, 11)
    with torch.no_grad():
        expected = model(initial_noise(shape, 5), torch.tensor([500.0]), guided(cond))
    mp.spawn(forward_worker, args=(world, free_port(), str(tmp_path), shape), nprocs=world, join=True)
    assert rel_err(torch.load(tmp_path / "out.pt"), expected) <= 1e-5


def test_dp_groups_work_on_different_prompts(tmp_path: Path, reference: dict[str, torch.Tensor]) -> None:
    from tests.parallel_worker import data_parallel_worker

    mp.spawn(data_parallel_worker, args=(4, free_port(), str(tmp_path)), nprocs=4, join=True)
    results = [torch.load(tmp_path / f"dp-rank{r}.pt") for r in range(4)]
    assert [r["case"] for r in results] == ["cfg", "cfg", "plain", "plain"]  # ranks 0-1 and 2-3
    for result in results:
        assert rel_err(result["latents"], reference[result["case"]]) <= 1e-5


def _generate_latents(tmp_path: Path, name: str, nproc: int, *overrides: str) -> tuple[torch.Tensor, str]:
    import subprocess
    import sys

    from safetensors.torch import load_file

    example = Path(__file__).resolve().parents[1] / "configs" / "examples" / "tiny-cpu.yaml"
    out = tmp_path / name
    command = [
        sys.executable, "-m", "hvbatch", "generate", "--nproc", str(nproc), "--config", str(example),
        "--prompt", "a kite over the sea", "--out", str(out / "v.mp4"),
        "--save-latents", str(out / "v.safetensors"), "sampling.cfg_scale=3", *overrides,
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    assert (out / "v.mp4").is_file()
    return load_file(str(out / "v.safetensors"))["latents"], result.stdout


def test_generate_takes_the_batch_jobs_layout_path(tmp_path: Path) -> None:
    """`generate --nproc 2` with true CFG: cfg 2 (and the parallel VAE decode) equals one process;
    parallel.comm_dtype=fp8 reaches the Ulysses transfers; parallel.mode=throughput is the planner's."""
    from hvbatch.config import load_config
    from hvbatch.generate import generate_layout

    one, _ = _generate_latents(tmp_path, "one", 1)
    cfg2, stdout = _generate_latents(tmp_path, "cfg2", 2, "parallel.cfg=2")
    assert "layout: dp 1 x cfg 2 x ulysses 1 x ring 1 over 2 ranks; VAE decode split over" in stdout
    assert rel_err(cfg2, one) <= 1e-5
    fp8, stdout = _generate_latents(tmp_path, "fp8", 2, "parallel.cfg=1", "parallel.comm_dtype=fp8")
    assert "layout: dp 1 x ulysses 2 x ring 1 over 2 ranks" in stdout
    assert 0 < rel_err(fp8, one) < 0.05  # float8 transfers: close, not equal
    example = Path(__file__).resolve().parents[1] / "configs" / "examples" / "tiny-cpu.yaml"
    throughput = load_config(example, ["sampling.cfg_scale=3", "parallel.mode=throughput"])
    assert (generate_layout(throughput, 2, 2).dp, generate_layout(throughput, 2, 2).video) == (2, 1)
    assert generate_layout(load_config(example, ["sampling.cfg_scale=3"]), 2, 2).cfg == 2  # auto: latency
