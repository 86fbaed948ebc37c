"""Step caching (`sampling.cache`): what it skips, what it keeps exact, and where its counts go.

The N-rank = 1-rank checks (same skipped steps, same latents) are in test_parallel.py.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from hvbatch.batch.control.prompts import read_prompts
from hvbatch.batch.rundir import MANIFEST_SCHEMA, RunDir
from hvbatch.batch.videos import sampling_for
from hvbatch.config import SamplingConfig, load_config, transformer_preset
from hvbatch.models.hunyuan_video import random_transformer
from hvbatch.sampling import denoise, initial_noise, new_step_cache
from hvbatch.sampling.cache import CachePolicy, StepCache
from hvbatch.sampling.estimates import expected_speedup, smallest_skipping_threshold
from tests.helpers import HUNYUAN_VIDEO, TEACACHE, rel_err
from tests.parallel_worker import LATENT_SHAPE, conditioning

EXAMPLE = Path(__file__).resolve().parents[1] / "configs" / "examples" / "tiny-cpu.yaml"


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return random_transformer(transformer_preset("tiny"), seed=0)


def _run(model: torch.nn.Module, steps: int, **cache: object) -> tuple[torch.Tensor, StepCache | None]:
    sampling = SamplingConfig(num_inference_steps=steps, seed=1, **cache)  # type: ignore[arg-type]
    step_cache = new_step_cache(sampling, TEACACHE)
    noise = initial_noise(LATENT_SHAPE, sampling.seed)
    return denoise(model, noise, conditioning(1, 9), sampling, step_cache=step_cache), step_cache


@pytest.mark.parametrize("mode", ["teacache", "fbcache"])
def test_threshold_zero_is_bit_identical_to_none(model: torch.nn.Module, mode: str) -> None:
    plain, none_cache = _run(model, 4)
    cached, step_cache = _run(model, 4, cache=mode, cache_threshold=0.0, cache_max_skips=10)
    assert none_cache is None and step_cache is not None
    assert torch.equal(cached, plain)
    assert (step_cache.computed, step_cache.skipped) == (4, 0)


@pytest.mark.parametrize(("mode", "threshold"), [("teacache", 0.1), ("fbcache", 0.4)])
def test_positive_threshold_skips_inner_steps(model: torch.nn.Module, mode: str, threshold: float) -> None:
    plain, _ = _run(model, 6)
    cached, step_cache = _run(model, 6, cache=mode, cache_threshold=threshold)
    assert step_cache is not None
    history = step_cache.history
    assert len(history) == 6 and history[0] and history[-1], history
    assert step_cache.skipped == history.count(False) > 0
    assert step_cache.computed + step_cache.skipped == 6
    assert 0 < rel_err(cached, plain) < 0.05


@pytest.mark.parametrize("mode", ["teacache", "fbcache"])
def test_consecutive_skips_are_capped(model: torch.nn.Module, mode: str) -> None:
    t, f = True, False
    _, two = _run(model, 6, cache=mode, cache_threshold=1e9, cache_max_skips=2)
    _, one = _run(model, 6, cache=mode, cache_threshold=1e9, cache_max_skips=1)
    assert two is not None and one is not None
    assert two.history == [t, f, f, t, f, t]  # the last step is always computed
    assert one.history == [t, f, t, f, t, t]


def test_padding_tokens_do_not_count() -> None:
    """Only `valid_tokens` enter the statistic: padding (zeros in, anything out) cannot move it."""
    policy = CachePolicy("fbcache", threshold=0.5, max_skips=5)
    plain, padded = StepCache(policy, 4), StepCache(policy, 4)
    padded.valid_tokens = 3
    gen = torch.Generator().manual_seed(0)
    probes = [torch.randn(1, 3, 8, generator=gen) for _ in range(3)]
    probes[1] = probes[0] * 1.2  # a change of 0.2: skipped
    probes[2] = probes[0] * 1.3  # 0.3 from the last computed step: skipped
    for step, probe in enumerate(probes):
        garbage = torch.full((1, 2, 8), 100.0 * (step + 1))  # changes by far more than the threshold
        plain.should_compute(probe)
        padded.should_compute(torch.cat([probe, garbage], dim=1))
        plain.store(probe)
        padded.store(probe)
    assert plain.history == padded.history == [True, False, False]


def test_reduced_sums_decide() -> None:
    """The decision is taken on the sums `reduce_sums` returns (every rank's), not this rank's own."""
    policy = CachePolicy("fbcache", threshold=0.5, max_skips=5)
    cache = StepCache(policy, 4)
    cache.reduce_sums = lambda sums: sums * torch.tensor([10.0, 1.0], dtype=torch.float64)
    base = torch.ones(1, 4, 8)
    for probe in (base, base * 1.2):  # own change 0.2, reduced change 2.0
        cache.should_compute(probe)
        cache.store(probe)
    assert cache.history == [True, True]


def test_bad_cache_settings_are_refused() -> None:
    with pytest.raises(ValueError, match=r"sampling\.cache='tea'.*teacache"):
        load_config(EXAMPLE, ["sampling.cache=tea"])
    with pytest.raises(ValueError, match=r"sampling\.cache_threshold"):
        load_config(EXAMPLE, ["sampling.cache_threshold=-0.1"])
    with pytest.raises(ValueError, match=r"sampling\.cache_max_skips"):
        load_config(EXAMPLE, ["sampling.cache_max_skips=0"])


def test_cache_threshold_column(tmp_path: Path) -> None:
    """Rows without the column keep their ids; the same prompt at two thresholds is two videos."""
    rows = {"prompt": ["a cat", "a cat", "a dog"], "seed": [1, 2, 3]}
    pq.write_table(pa.table(rows), tmp_path / "plain.parquet")
    pq.write_table(pa.table(rows | {"cache_threshold": [None, 0.1, 0.15]}), tmp_path / "cached.parquet")
    pq.write_table(
        pa.table({"prompt": ["a cat"] * 2, "cache_threshold": [0.05, 0.1]}), tmp_path / "two.parquet"
    )
    defaults = SamplingConfig(cache="teacache", cache_threshold=0.05)
    plain = read_prompts(tmp_path / "plain.parquet", defaults)
    cached = read_prompts(tmp_path / "cached.parquet", defaults)
    # Ids from before the column existed (hvbatch at de63bed).
    assert plain["video_id"].to_pylist() == ["8740879abc48e02c", "fe1d0e533065f749", "a44b591a2a31dd4e"]
    ids = cached["video_id"].to_pylist()
    assert ids[0] == "8740879abc48e02c" and len(set(ids + plain["video_id"].to_pylist())) == 5
    assert cached["cache_threshold"].to_pylist() == [0.05, 0.1, 0.15]
    assert len(set(read_prompts(tmp_path / "two.parquet", defaults)["video_id"].to_pylist())) == 2
    assert sampling_for(cached.to_pylist()[2], defaults).cache_threshold == 0.15
    assert sampling_for({"prompt": "an old shard row"}, defaults).cache_threshold == 0.05


def test_generated_video_counts_steps() -> None:
    from hvbatch.pipeline import Pipeline

    pipeline = Pipeline.load(load_config(EXAMPLE, ["sampling.num_frames=1", "sampling.height=32"]))
    sampling = pipeline.config.sampling
    plain = pipeline.generate("a kite", sampling, decode=False)
    cached = dataclasses.replace(sampling, cache="teacache", cache_threshold=1e9, cache_max_skips=1)
    skipped = pipeline.generate("a kite", cached, decode=False)
    assert (plain.steps_computed, plain.steps_skipped) == (4, 0)
    assert (skipped.steps_computed, skipped.steps_skipped) == (3, 1)  # T F T T


def test_manifest_parts_without_step_counts_still_read(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    row = {name: None for name in MANIFEST_SCHEMA.names} | {"video_id": "v", "status": "done"}
    old_schema = pa.schema([f for f in MANIFEST_SCHEMA if not f.name.startswith("steps_")])
    old = pa.Table.from_pylist([row], schema=old_schema)
    new = pa.Table.from_pylist(
        [row | {"video_id": "w", "steps_computed": 30, "steps_skipped": 20}], MANIFEST_SCHEMA
    )
    (tmp_path / "manifest").mkdir()
    old_part = run.manifest_part(0, "1-0", 0)
    pq.write_table(old, old_part)
    key = f"{old_part.name}|{old_part.stat().st_size}:{old_part.stat().st_mtime_ns}"
    old_cache = old.append_column("_key", pa.array([key]))  # as a writer before the columns made it
    pq.write_table(old_cache, tmp_path / "manifest-cache.parquet")
    pq.write_table(new, run.manifest_part(1, "2-0", 0))
    rows = {r["video_id"]: r for r in run.manifest_rows().to_pylist()}
    assert (rows["v"]["steps_computed"], rows["v"]["steps_skipped"]) == (None, None)
    assert (rows["w"]["steps_computed"], rows["w"]["steps_skipped"]) == (30, 20)


def test_expected_speedup_table() -> None:
    figures = HUNYUAN_VIDEO.step_cache
    # TeaCache: one step adds at least the polynomial's minimum to the sum it compares, so no
    # threshold up to that minimum skips anything; found from the coefficients by a dense scan.
    xs = [i * 1e-5 for i in range(100_000)]
    poly = lambda x: sum(c * x ** (4 - k) for k, c in enumerate(figures.teacache_coefficients))
    scanned = min(max(poly(x), 0) for x in xs)
    floor = smallest_skipping_threshold("teacache", figures)
    assert floor == pytest.approx(scanned, abs=1e-7) and 0.05 < floor < 0.053
    assert smallest_skipping_threshold("fbcache", figures) == 0.0
    assert expected_speedup("none", 0.1, figures) == 1.0 and expected_speedup("teacache", 0.0, figures) == 1.0
    assert expected_speedup("teacache", 0.05, figures) == 1.0
    assert expected_speedup("teacache", floor, figures) == 1.0
    assert 1.0 < expected_speedup("teacache", floor + 0.005, figures) < 1.1
    assert expected_speedup("teacache", 0.1, figures) == pytest.approx(1.6)  # TeaCache's README (A800)
    assert expected_speedup("teacache", 0.125, figures) == pytest.approx(1.85)
    assert expected_speedup("teacache", 0.3, figures) == pytest.approx(2.1)  # no figure past 0.15
    assert expected_speedup("fbcache", 0.05, figures) == pytest.approx(1.95)  # diffusers PR 11180
    assert expected_speedup("fbcache", 0.1, figures) == pytest.approx(2.91)
    assert expected_speedup("fbcache", 0.025, figures) == pytest.approx(1.475)


def test_plan_says_a_teacache_threshold_below_the_floor_skips_nothing(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from hvbatch.cli import main

    argv = ["plan", "--config", str(EXAMPLE), "sampling.cache=teacache", "sampling.cache_threshold=0.05"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "no step can be skipped at or below 0.0521" in out and "1.00x" in out


def test_dry_run_prints_the_saving(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from hvbatch.cli import main

    rows = {"prompt": ["a cat", "a dog"], "cache_threshold": [0.1, None]}
    pq.write_table(pa.table(rows), tmp_path / "p.parquet")
    argv = ["submit", str(tmp_path / "p.parquet"), "--config", str(EXAMPLE), "--dry-run"]
    assert main([*argv, "sampling.cache=teacache", "sampling.cache_threshold=0.15"]) == 0
    out = capsys.readouterr().out
    hours = float(out.split("estimated GPU-hours: ")[1].split()[0])
    # Equal costs: 1 / mean(1/1.6, 1/2.1) = 1.82x.
    assert "with step caching (teacache): " in out and "1.82x fewer" in out and "estimate" in out
    cached = float(out.split("with step caching (teacache): ~")[1].split()[0])
    assert cached == pytest.approx(hours / 1.816, abs=0.051)
    assert main(argv) == 0
    assert "step caching" not in capsys.readouterr().out
    assert (
        main(["plan", "--config", str(EXAMPLE), "sampling.cache=fbcache", "sampling.cache_threshold=0.1"])
        == 0
    )
    assert "step caching: fbcache threshold 0.1: ~2.91x faster denoising" in capsys.readouterr().out


def test_teacache_needs_the_family_coefficients() -> None:
    """A family without published TeaCache coefficients refuses `sampling.cache=teacache`."""
    with pytest.raises(ValueError, match=r"TeaCache coefficients.*sampling\.cache=fbcache"):
        new_step_cache(SamplingConfig(cache="teacache"), None)
    assert new_step_cache(SamplingConfig(cache="fbcache"), None) is not None
