"""The parallel planner: memory model, layout rules, errors, and the `hvbatch plan` command (pure CPU)."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from hvbatch import cli
from hvbatch.config import load_config, transformer_preset
from hvbatch.models.hunyuan_video import HunyuanVideoTransformer
from hvbatch.models.hunyuan_video.figures import transformer_param_counts
from hvbatch.parallel import memory, planner
from hvbatch.parallel.dims import ParallelDims
from hvbatch.parallel.memory import NO_COMPONENTS, ModelSize, activation_bytes_per_token
from hvbatch.parallel.plan import parse_degree, plan_for_config
from hvbatch.parallel.planner import ParallelPlan, auto_ulysses, format_plan
from hvbatch.plan_cli import add_plan_parser
from tests.helpers import image_tokens, model_size, released_components

# The released model's text encoders and VAE unless a test says otherwise.
estimate_memory = functools.partial(memory.estimate_memory, components=released_components())
plan_parallel = functools.partial(planner.plan_parallel, components=released_components())
FULL = transformer_preset("hunyuan-video-t2v-720p")
BF16 = model_size(FULL, "bfloat16")
FP8 = model_size(FULL, "bfloat16", fp8=True)
TOKENS_720P = image_tokens(720, 1280, 129)
TOKENS_544P = image_tokens(544, 960, 129)
Main = Callable[[list[str]], int]


def _assert_smallest_fit(plan: ParallelPlan, model: ModelSize, tokens: int, batch: int = 1) -> None:
    """dp * sp is the world, the plan fits, and every smaller SP size that divides the world does not."""
    world = plan.world_size
    assert plan.dp * plan.ulysses * plan.ring == world
    assert plan.memory.fits(plan.gpu_memory_gib)
    plan.dims().validate(model.num_heads)
    for sp in (d for d in range(1, plan.sp) if world % d == 0):
        u = auto_ulysses(sp, model.num_heads, plan.gpus_per_node)
        smaller = estimate_memory(model, image_tokens=tokens, ulysses=u, ring=sp // u, batch=batch)
        assert not smaller.fits(plan.gpu_memory_gib), f"sp={sp} would fit: {smaller.total_gib:.1f} GiB"


def test_param_counts_match_the_model() -> None:
    for config in (FULL, transformer_preset("tiny")):
        with torch.device("meta"):
            model = HunyuanVideoTransformer(config)
        total = sum(p.numel() for p in model.parameters())
        block_weights = sum(
            m.weight.numel()
            for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and name.startswith(("double_blocks.", "single_blocks."))
        )
        assert transformer_param_counts(config) == (total, block_weights)
    assert transformer_param_counts(FULL) == (12_821_012_544, 12_457_082_880)


def test_image_tokens() -> None:
    assert TOKENS_720P == 33 * 45 * 80 == 118_800
    assert TOKENS_544P == 33 * 34 * 60 == 67_320
    with pytest.raises(ValueError, match="height=700"):
        image_tokens(700, 1280, 129)


def test_memory_model_numbers() -> None:
    # bf16: 20 activation elements * 2 bytes + 2 float32 RoPE copies * 4 = 48 bytes per token and channel.
    assert activation_bytes_per_token(BF16, 1, 1) == 48
    assert activation_bytes_per_token(BF16, 8, 1) == 48 + 3 * 2
    assert activation_bytes_per_token(BF16, 4, 2) == 48 + 3 * 2 + 2 * 2 + 4
    m = estimate_memory(BF16, image_tokens=TOKENS_720P)
    assert m.tokens_per_rank == 118_800 + 256
    assert m.transformer_weights_gib == pytest.approx(12_821_012_544 * 2 / 2**30)  # 23.88
    assert m.text_encoders_gib == pytest.approx(14.21, abs=0.01)
    assert m.vae_weights_gib == pytest.approx(0.46, abs=0.01)
    assert m.activations_gib == pytest.approx(119_056 * 3072 * 48 / 2**30)  # 16.35
    assert m.vae_decode_gib == 11.0
    assert m.margin_gib == pytest.approx(0.1 * (m.total_gib - m.margin_gib))
    assert m.total_gib == pytest.approx(72.5, abs=0.05)
    fp8 = estimate_memory(FP8, image_tokens=TOKENS_720P)
    assert m.transformer_weights_gib - fp8.transformer_weights_gib == pytest.approx(12_457_082_880 / 2**30)
    sp8 = estimate_memory(BF16, image_tokens=TOKENS_720P, ulysses=8)
    assert sp8.tokens_per_rank == 14_850 + 256
    assert sp8.total_gib == pytest.approx(57.1, abs=0.05)
    assert released_components("float32", "float32").vae_decode_gib == 22.0


def test_720p_on_8x80_fits_on_one_gpu_per_video() -> None:
    plan = plan_parallel(BF16, image_tokens=TOKENS_720P, gpus_per_node=8, gpu_memory_gib=80)
    assert (plan.dp, plan.ulysses, plan.ring) == (8, 1, 1)
    assert plan.memory.total_gib == pytest.approx(72.5, abs=0.05)
    _assert_smallest_fit(plan, BF16, TOKENS_720P)
    assert plan.reasons[0] == "sp=1: one GPU per video fits (estimate 72.5 GiB of 80 GiB per GPU)"


def test_720p_with_true_cfg_on_8x80_takes_the_smallest_group_that_fits() -> None:
    plan = plan_parallel(BF16, image_tokens=TOKENS_720P, gpu_memory_gib=80, batch=2, cfg=1)
    assert (plan.dp, plan.cfg, plan.ulysses, plan.ring) == (4, 1, 2, 1)
    _assert_smallest_fit(plan, BF16, TOKENS_720P, batch=2)
    assert plan.reasons[0] == (
        "sp=2: the smallest sequence-parallel group whose estimate (74.8 GiB) fits in 80 GiB per GPU; "
        "sp=1 needs 90.5 GiB"
    )


def test_true_cfg_prefers_cfg_parallel_to_sequence_parallel_of_the_same_size() -> None:
    """cfg 2 halves the activations per GPU like sp 2 (batch 1 per rank) with one exchange per step."""
    plan = plan_parallel(BF16, image_tokens=TOKENS_720P, gpu_memory_gib=80, batch=2)
    assert (plan.dp, plan.cfg, plan.ulysses, plan.ring, plan.group) == (4, 2, 1, 1, 2)
    assert plan.memory.total_gib == pytest.approx(72.5, abs=0.05)  # the batch-1 estimate
    assert plan.dims() == ParallelDims(dp=4, ulysses=1, ring=1, world_size=8, cfg=2)
    assert plan.reasons[0].startswith("cfg=2 x sp=1: the smallest sequence-parallel group")
    assert any(r.startswith("cfg=2 (auto): the unconditional and conditional branches") for r in plan.reasons)
    assert "layout: dp 4 x cfg 2 x ulysses 1 x ring 1" in format_plan(plan)
    latency = plan_parallel(BF16, image_tokens=TOKENS_720P, batch=2, mode="latency")
    assert (latency.dp, latency.cfg, latency.ulysses, latency.ring) == (1, 2, 4, 1)
    tight = plan_parallel(FP8, image_tokens=TOKENS_720P, gpu_memory_gib=48, batch=2)
    assert (tight.dp, tight.cfg, tight.ulysses, tight.ring) == (1, 2, 4, 1)
    assert plan_parallel(BF16, image_tokens=TOKENS_720P, gpus_per_node=3, batch=2).cfg == 1  # odd world
    no_cfg = plan_parallel(FP8, image_tokens=TOKENS_720P, gpu_memory_gib=48)
    assert (no_cfg.cfg, no_cfg.sp) == (1, 4)  # without true CFG there is no second branch


def test_explicit_cfg_is_validated_with_every_factor() -> None:
    with pytest.raises(
        ValueError, match=r"dp\(1\) \* cfg\(2\) \* ulysses\(8\) \* ring\(1\) = 16 != WORLD_SIZE\(8\)"
    ):
        plan_parallel(BF16, image_tokens=TOKENS_720P, batch=2, cfg=2, ulysses=8)
    with pytest.raises(ValueError, match=r"cfg\(3\) must be 1 or 2"):
        plan_parallel(BF16, image_tokens=TOKENS_720P, batch=2, cfg=3)
    with pytest.raises(ValueError, match=r"sampling.cfg_scale\(1\) <= 1"):
        ParallelDims(dp=1, ulysses=1, ring=1, world_size=2, cfg=2).validate(24, cfg_scale=1.0)
    alone = plan_parallel(BF16, image_tokens=TOKENS_720P, cfg=2)  # a shard's largest video without CFG
    assert alone.cfg == 2 and alone.reasons[0].startswith("warning: cfg=2 without true CFG")


def test_720p_fp8_on_8x48() -> None:
    plan = plan_parallel(FP8, image_tokens=TOKENS_720P, gpu_memory_gib=48)
    assert (plan.dp, plan.ulysses, plan.ring) == (2, 4, 1)
    assert plan.memory.total_gib == pytest.approx(47.3, abs=0.05)  # 46.8 before the FP8 temporaries
    _assert_smallest_fit(plan, FP8, TOKENS_720P)


def test_fp8_temporaries_are_counted() -> None:
    """FP8 GEMMs: the widest block input (linear2's [attention, GELU], 5 D) quantized to 1 byte per
    element, or where `_scaled_mm` cannot serve the dequantized copies of the largest weight."""
    d = FULL.hidden_size
    assert FP8.fp8_input_bytes_per_token == 5 * d and BF16.fp8_input_bytes_per_token == 0
    assert FP8.fp8_dequant_bytes == 2 * d * 7 * d * 2  # linear1: D x (3 D + 4 D), two bf16 copies
    one_gpu = estimate_memory(FP8, image_tokens=TOKENS_720P)
    assert one_gpu.fp8_temporaries_gib == pytest.approx(119_056 * 5 * d / 2**30)  # 1.70 GiB
    plain = estimate_memory(BF16, image_tokens=TOKENS_720P)
    assert plain.fp8_temporaries_gib == 0
    weights_saved = plain.transformer_weights_gib - one_gpu.transformer_weights_gib
    assert one_gpu.total_gib == pytest.approx(
        plain.total_gib + 1.1 * (one_gpu.fp8_temporaries_gib - weights_saved)
    )
    sp8 = estimate_memory(FP8, image_tokens=TOKENS_720P, ulysses=8)  # few tokens: the dequant copies win
    assert sp8.fp8_temporaries_gib == pytest.approx(max(15_106 * 5 * d, 2 * 7 * d * d * 2) / 2**30)
    assert "FP8 temporaries" in format_plan(plan_parallel(FP8, image_tokens=TOKENS_720P))
    assert "FP8 temporaries" not in format_plan(plan_parallel(BF16, image_tokens=TOKENS_720P))


@pytest.mark.parametrize(
    "override", ["model.quantize=fp8", "model.transformer_path=/ckpts/mp_rank_00_model_states_fp8.pt"]
)
def test_plan_counts_fp8_for_quantize_and_fp8_checkpoints(override: str) -> None:
    plan = plan_for_config(load_config(overrides=[override]))
    assert plan.memory.transformer_weights_gib == pytest.approx(FP8.weight_bytes_total / 2**30)
    assert plan.memory.fp8_temporaries_gib > 0
    assert plan_for_config(load_config()).memory.fp8_temporaries_gib == 0


def test_544p_on_8x80() -> None:
    plan = plan_parallel(BF16, image_tokens=TOKENS_544P, gpu_memory_gib=80)
    assert (plan.dp, plan.ulysses, plan.ring) == (8, 1, 1)
    assert plan.memory.tokens_per_rank == 67_320 + 256
    assert plan.memory.total_gib == pytest.approx(64.7, abs=0.05)
    _assert_smallest_fit(plan, BF16, TOKENS_544P)
    fp8_small = plan_parallel(FP8, image_tokens=TOKENS_544P, gpu_memory_gib=48)
    # ulysses 2 needs 48.04 GiB with the FP8 GEMM inputs counted (47.4 without): ulysses 4
    assert (fp8_small.dp, fp8_small.ulysses, fp8_small.ring) == (2, 4, 1)
    _assert_smallest_fit(fp8_small, FP8, TOKENS_544P)


def test_ring_crosses_nodes_when_a_node_is_not_enough() -> None:
    plan = plan_parallel(FP8, image_tokens=TOKENS_720P, gpus_per_node=8, num_nodes=2, gpu_memory_gib=44)
    assert (plan.dp, plan.ulysses, plan.ring) == (1, 8, 2)
    _assert_smallest_fit(plan, FP8, TOKENS_720P)
    assert any("spans 2 nodes" in r for r in plan.reasons)


def test_latency_uses_the_whole_node() -> None:
    plan = plan_parallel(BF16, image_tokens=TOKENS_720P, mode="latency")
    assert (plan.dp, plan.ulysses, plan.ring, plan.sp) == (1, 8, 1, 8)
    assert plan.dims() == ParallelDims(dp=1, ulysses=8, ring=1, world_size=8)
    assert plan.dims(16) == ParallelDims(dp=2, ulysses=8, ring=1, world_size=16)


@pytest.mark.parametrize(("gpus", "ulysses", "ring"), [(5, 1, 5), (6, 6, 1), (7, 1, 7), (4, 4, 1), (3, 3, 1)])
def test_latency_ulysses_is_the_largest_head_divisor_of_the_node(gpus: int, ulysses: int, ring: int) -> None:
    plan = plan_parallel(BF16, image_tokens=TOKENS_720P, gpus_per_node=gpus, mode="latency")
    assert (plan.dp, plan.ulysses, plan.ring) == (1, ulysses, ring)
    plan.dims().validate(24)


def test_latency_on_two_nodes_is_one_video_per_node() -> None:
    plan = plan_parallel(BF16, image_tokens=TOKENS_720P, gpus_per_node=8, num_nodes=2, mode="latency")
    assert (plan.dp, plan.ulysses, plan.ring) == (2, 8, 1)
    assert plan.world_size == 16


def test_explicit_ulysses_must_divide_the_heads() -> None:
    with pytest.raises(ValueError, match=r"ulysses\(5\) must divide the model's 24 attention heads"):
        plan_parallel(BF16, image_tokens=TOKENS_720P, ulysses=5)
    with pytest.raises(ValueError, match=r"ulysses\(16\) must divide the model's 24 attention heads"):
        plan_parallel(BF16, image_tokens=TOKENS_720P, num_nodes=2, ulysses=16)
    with pytest.raises(ValueError, match=r"ulysses must be >= 1, got 0"):
        plan_parallel(BF16, image_tokens=TOKENS_720P, ulysses=0)


def test_explicit_degrees_that_do_not_divide_the_world_name_every_factor() -> None:
    with pytest.raises(ValueError) as err:
        plan_parallel(BF16, image_tokens=TOKENS_720P, ulysses=3, ring=3)
    message = str(err.value)
    assert "dp(1) * cfg(1) * ulysses(3) * ring(3) = 9 != WORLD_SIZE(8)" in message
    assert "slurm.gpus_per_node(8) * slurm.nodes(1)" in message
    with pytest.raises(ValueError, match=r"ring\(3\) = 6 != WORLD_SIZE\(8\)"):
        plan_parallel(BF16, image_tokens=TOKENS_720P, ring=3)


def test_explicit_settings_fill_the_other_degree_and_only_warn_about_memory() -> None:
    plan = plan_parallel(BF16, image_tokens=TOKENS_720P, ring=2, mode="latency")
    assert (plan.dp, plan.ulysses, plan.ring) == (1, 4, 2)
    plan = plan_parallel(BF16, image_tokens=TOKENS_720P, ulysses=2)
    assert (plan.dp, plan.ulysses, plan.ring) == (4, 2, 1)
    tight = plan_parallel(BF16, image_tokens=TOKENS_720P, ulysses=1, ring=1, gpu_memory_gib=60)
    assert (tight.dp, tight.ulysses, tight.ring) == (8, 1, 1)
    assert not tight.memory.fits(60)
    assert tight.reasons[0].startswith("warning: the estimate (72.5 GiB per GPU) exceeds 60 GiB")
    assert "DOES NOT FIT" in format_plan(tight)


def test_a_model_too_big_for_the_gpus_says_what_to_do() -> None:
    with pytest.raises(ValueError) as err:
        plan_parallel(BF16, image_tokens=TOKENS_720P, gpu_memory_gib=40)
    message = str(err.value)
    assert "even with all 8 GPUs on one video (sp=8) the estimate is 57.1 GiB per GPU" in message
    assert "parallel.gpu_memory_gib=40" in message
    assert "alone need 54.5 GiB" in message
    for advice in ("more GPUs per job", "fp8", "smaller video"):
        assert advice in message
    with pytest.raises(ValueError, match="even with all 8 GPUs"):
        plan_parallel(BF16, image_tokens=TOKENS_720P, gpu_memory_gib=40, mode="latency")


@pytest.mark.parametrize("gpus", [1, 2, 5, 8])
def test_tiny_model_always_fits_on_one_gpu(gpus: int) -> None:
    tiny = model_size(transformer_preset("tiny"), "float32")
    for components in (None, NO_COMPONENTS):
        plan = plan_parallel(tiny, image_tokens=TOKENS_720P, gpus_per_node=gpus, components=components)
        assert (plan.dp, plan.ulysses, plan.ring) == (gpus, 1, 1)
        assert plan.memory.fits(80)


def test_plan_is_frozen_and_formatted() -> None:
    plan = plan_parallel(BF16, image_tokens=TOKENS_720P, mode="latency")
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.dp = 2  # type: ignore[misc]
    text = format_plan(plan)
    assert text.splitlines()[0].startswith("layout: dp 1 x ulysses 8 x ring 1")
    for part in ("transformer weights", "text encoders", "activations", "VAE decode peak", "total", "why:"):
        assert part in text


def test_plan_for_config_reads_the_tree() -> None:
    config = load_config(
        overrides=[
            "parallel.ulysses=auto",
            "parallel.ring=2",
            "parallel.mode=latency",
            "model.transformer_path=/ckpts/mp_rank_00_model_states_fp8.pt",
            "sampling.height=544",
            "sampling.width=960",
        ]
    )
    plan = plan_for_config(config)
    assert (plan.dp, plan.ulysses, plan.ring) == (1, 4, 2)
    assert plan.memory.transformer_weights_gib == pytest.approx(FP8.weight_bytes_total / 2**30)
    tight = ["sampling.cfg_scale=2", "parallel.gpu_memory_gib=70"]  # one GPU per video does not fit
    true_cfg = plan_for_config(load_config(overrides=tight))
    assert (true_cfg.cfg, true_cfg.sp) == (2, 1)
    assert plan_for_config(load_config(overrides=[*tight, "parallel.cfg=1"])).sp == 2
    assert parse_degree("auto", "parallel.ring") is None
    assert parse_degree(" 4", "parallel.ring") == 4
    with pytest.raises(ValueError, match=r"parallel\.ulysses='two' must be 'auto' or a positive integer"):
        parse_degree("two", "parallel.ulysses")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hvbatch")
    add_plan_parser(parser.add_subparsers(dest="command", required=True))
    return parser


@pytest.fixture
def plan_main(monkeypatch: pytest.MonkeyPatch) -> Main:
    """`hvbatch.cli.main` with `plan` wired in (cli.py itself is wired by another change)."""
    monkeypatch.setattr(cli, "build_parser", _parser)
    return cli.main


def test_cli_prints_the_layout(plan_main: Main, capsys: pytest.CaptureFixture[str]) -> None:
    assert plan_main(["plan", "parallel.mode=latency", "parallel.num_nodes=2"]) == 0
    out = capsys.readouterr().out
    assert "video: 720x1280x129 -> 118,800 image tokens + 256 text tokens" in out
    assert "layout: dp 2 x ulysses 8 x ring 1  (latency; 16 GPUs = 2 nodes x 8, 8 per video)" in out


def test_cli_reads_a_config_file(plan_main: Main, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    config = tmp_path / "job.yaml"
    config.write_text("parallel:\n  gpus_per_node: 6\n  mode: latency\n")
    assert plan_main(["plan", "--config", str(config)]) == 0
    assert "layout: dp 1 x ulysses 6 x ring 1" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("parallel.ulysses=5", "ulysses(5) must divide the model's 24 attention heads"),
        ("parallel.ring=abc", "parallel.ring='abc' must be 'auto' or a positive integer"),
        ("parallel.mode=fast", "parallel.mode='fast' is not one of throughput, latency"),
        ("parallel.gpu_memory_gib=30", "the video does not fit"),
        ("sampling.num_frames=128", "num_frames=128 is not of the form 4k+1"),
    ],
)
def test_cli_exits_2_on_bad_settings(
    plan_main: Main, capsys: pytest.CaptureFixture[str], override: str, message: str
) -> None:
    assert plan_main(["plan", override]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("hvbatch plan: error: ")
    assert message in captured.err


def test_cli_json_parses(plan_main: Main, capsys: pytest.CaptureFixture[str]) -> None:
    assert plan_main(["plan", "--json", "sampling.height=544", "sampling.width=960"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["dp"] * data["ulysses"] * data["ring"] == data["world_size"] == 8
    assert data["sp"] == data["ulysses"] * data["ring"] == 1
    assert data["memory"]["fits"] is True
    assert data["memory"]["total_gib"] == pytest.approx(49.1, abs=0.05)  # encoders off the GPU (64.7 on it)
    assert data["memory"]["text_encoders_gib"] == 0.0
    assert data["memory"]["tokens_per_rank"] == 67_320 + 256
    assert data["video"] == {
        "height": 544, "width": 960, "num_frames": 129, "image_tokens": 67_320, "text_tokens": 256,
    }  # fmt: skip
    assert isinstance(data["reasons"], list) and data["reasons"][0].startswith("sp=1:")
