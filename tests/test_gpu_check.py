"""benchmarks/gpu_check.py: the CPU smoke run on a machine like the GPU one (omegaconf, submitit and
imageio-ffmpeg unimportable), its hard per-phase budgets, and the verdicts it derives."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
BLOCKED = ("omegaconf", "submitit", "imageio_ffmpeg")
BLOCKER = f'''import sys

BLOCKED = {BLOCKED!r}


class Blocker:
    """As on the GPU machine: these packages are not installed."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None


sys.meta_path.insert(0, Blocker())
'''


def gpu_check_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def run_check(
    tmp_path: Path, *args: str, timeout: int = 1200
) -> tuple[subprocess.CompletedProcess[str], list[dict]]:
    """gpu_check.py in a fresh interpreter whose `sitecustomize` blocks the packages (phases and the
    ranks they spawn inherit it through PYTHONPATH)."""
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(BLOCKER)
    env = dict(os.environ, PYTHONPATH=str(site), OMP_NUM_THREADS="1")
    blocked = subprocess.run(
        [sys.executable, "-c", "import omegaconf"], env=env, capture_output=True, text=True
    )
    assert blocked.returncode != 0 and "No module named 'omegaconf'" in blocked.stderr  # the blocker works
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=tmp_path,
    )
    records = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return done, records


def test_cpu_smoke_without_omegaconf_submitit_imageio(tmp_path: Path) -> None:
    done, records = run_check(tmp_path, "--cpu-smoke", "--budget-s", "1100", "--out", str(tmp_path / "out"))
    phases = {r["phase"]: r for r in records if "phase" in r}
    assert list(phases) == list(gpu_check_module().PHASES), done.stdout[-3000:] + done.stderr[-3000:]
    assert all(r["ok"] for r in phases.values()), [r for r in phases.values() if not r["ok"]]
    assert done.returncode == 0
    accuracy = phases["attention_accuracy"]
    for length in (40, 100):  # every kernel at each length, plain and with its LSE
        for name in ("default", "cudnn", "flash", "efficient", "math"):
            result = accuracy[f"{length}/{name}"]
            assert result["plain"]["out_rel"] < 1e-5 and result["lse"]["lse_max_abs"] < 1e-5, (length, name)
            assert result["canary_intact"]
    assert accuracy["40/math"]["ring_8_blocks"]["lse_max_abs"] < 1e-5
    sp = phases["sp_multirank"]
    for layout in ("u2r1", "u1r2"):  # all-to-all, then ring P2P with the LSE merge, 2 gloo ranks
        assert sp[layout]["none"]["rel_err_max"] < 1e-5 and sp[layout]["fp8"]["rel_err_max"] < 3e-2
    assert sp["u1r2"]["none"]["bytes_rank0"]["ring"] > 0 and sp["u2r1"]["none"]["bytes_rank0"]["ulysses"] > 0
    for phase, variant in (("step_eager", "best"), ("step_compiled", "compiled"), ("step_fp8", "fp8")):
        step = phases[phase][f"64p/{variant}"]
        assert step["s_per_step_20+40"] > 0 and step["ms_rest"] >= 0 and step["ms_double_block"] > 0
    _check_hv15_phases(phases)
    verdicts = [line for line in done.stdout.splitlines() if line.startswith("verdict: ")]
    assert [v.split(":")[1].strip() for v in verdicts] == VERDICTS
    assert "use SSTA for sparse checkpoints: yes" in verdicts[4] or "sparse checkpoints: no" in verdicts[4]
    step = phases["hv15_step"]["96p"]  # the largest smoke video sets the 1.5 shard-cost rate
    rate = step["cfg"]["s_per_step_54"] / (2 * step["image_tokens"])
    assert f"= {rate:.3g} (GPU-s per image token x step x CFG branch, 96p" in verdicts[5]
    written = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert set(written["phases"]) == set(phases) and len(written["verdicts"]) == len(VERDICTS)
    markdown = (tmp_path / "out" / "gpu_check.md").read_text()
    assert all(f"- {line.removeprefix('verdict: ')}" in markdown for line in verdicts)
    assert json.loads(done.stdout.splitlines()[-1])["total_s"] <= 1100


VERDICTS = ["attention", "compile", "fp8", "comm_dtype", "ssta", "hv15_cost", "hv15_speed"]


def _check_extrapolated(step: dict[str, Any]) -> None:
    """Measured parts are durations; the 54-block estimate covers the measured forward and blocks."""
    assert step["measured_blocks"] == 2 and step["ms_block_max"] >= step["ms_block"] > 0
    assert step["ms_rest"] >= 0 and step["first_call_s"] > 0 and step["measured_forward_s"] > 0
    assert step["s_per_step_54"] >= step["measured_forward_s"]
    assert step["s_per_step_54"] >= 54 * step["ms_block"] / 1e3 and step["tflops_54"] >= 0


def _check_hv15_phases(phases: dict[str, dict[str, Any]]) -> None:
    hv15 = phases["hv15_step"]
    assert hv15["full_depth"] == 54 and hv15["depth_measured"] == 2 and hv15["attention"] == "dense"
    for label, batch_cfg in (("64p", 2), ("96p", 2)):
        video = hv15[label]
        assert video["image_tokens"] == video["grid"][0] * video["grid"][1] * video["grid"][2]
        _check_extrapolated(video["no_cfg"])
        _check_extrapolated(video["cfg"])
        assert video["no_cfg"]["batch"] == 1 and video["cfg"]["batch"] == batch_cfg
        assert video["video_s"]["50_steps_cfg"] == pytest.approx(50 * video["cfg"]["s_per_step_54"], abs=0.06)
        assert video["video_s"]["8_steps_step_distilled"] < video["video_s"]["12_steps_step_distilled"]
        assert all(m >= 0 for m in video["video_min"].values())
    ssta = phases["ssta_attention"]
    assert ssta["grid"] == hv15["96p"]["grid"] and ssta["dense_ms"] > 0 and ssta["portable"]["ms"] > 0
    speedup = ssta["dense_ms"] / ssta["portable"]["ms"]
    # printed to 3 decimals
    assert ssta["portable"]["speedup_vs_dense"] == pytest.approx(speedup, rel=0.01, abs=6e-4)
    assert 0 < ssta["attended_tile_share"] <= 1
    sr = phases["sr_step"]
    assert sr["in_channels"] == 98
    for label, steps in (("96p_sr", 6), ("128p_sr", 8)):
        video = sr[label]
        _check_extrapolated(video["step"])
        assert video["steps"] == steps and video["upsampler"]["s"] > 0
        measured = video["upsampler"]["s"] + steps * video["step"]["measured_forward_s"]
        assert video["stage_s"] >= measured - 1e-3


def test_a_phase_that_overruns_is_killed_and_the_next_one_runs(tmp_path: Path) -> None:
    start = time.monotonic()
    args = (
        "--cpu-smoke",
        "--phases",
        "versions",
        "dispatch",
        "--stall-phase",
        "versions",
        "--budget-s",
        "60",
    )
    done, records = run_check(tmp_path, *args, timeout=120)
    wall = time.monotonic() - start
    versions, dispatch = records[0], records[1]
    assert versions["phase"] == "versions" and not versions["ok"]
    assert versions["error"].startswith("killed at its budget")
    assert versions["seconds"] <= versions["budget_s"] + 2  # cut at its budget (60 s x 3/7 of the shares)
    with pytest.raises(ProcessLookupError):  # the whole process group is gone
        os.kill(versions["pid"], 0)
    assert dispatch["phase"] == "dispatch" and dispatch["ok"], dispatch
    assert done.returncode == 1
    assert json.loads(done.stdout.splitlines()[-1])["total_s"] <= 60 and wall < 75


def _results(**phases: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: {"phase": name, "ok": True, **record} for name, record in phases.items()}


GOOD = {"finite": True, "out_rel": 1e-3, "lse_max_abs": 1e-3}
BAD = {"finite": True, "out_rel": 0.4, "lse_max_abs": 3.0}


def test_verdicts_follow_the_measurements() -> None:
    gpu_check = gpu_check_module()
    accuracy = {
        f"{n}/{k}": {"plain": GOOD, "lse": GOOD if k != "cudnn" or n == 4112 else BAD, "canary_intact": True}
        for n in (4112, 119056)
        for k in ("cudnn", "flash")
    }
    results = _results(
        dispatch={"auto_backend": "cudnn"},
        attention_tflops={"cudnn": {"tflops": 650.0}, "flash": {"tflops": 520.0}},
        attention_accuracy=accuracy,
        step_eager={"720p/best": {"s_per_step_20+40": 20.0}},
        step_compiled={"error": "killed at its budget of 84 s (abandoned; the next phase runs)"},
        step_fp8={"720p/fp8": {"s_per_step_20+40": 21.0, "rel_err_vs_bf16": 0.01}},
        comm_dtype={"pack_unpack_ms": 2.0, "nvlink_ms_saved": 0.4, "infiniband_ms_saved": 3.6},
    )
    attention, compiled, fp8, comm = gpu_check.verdicts(results)[:4]
    assert attention.startswith("attention: set model.attention=flash") and "INACCURATE: cudnn" in attention
    assert compiled.startswith("compile: off") and "killed at its budget" in compiled
    assert fp8.startswith("fp8: off (model.quantize=none; auto may not use it)")
    assert comm.startswith("comm_dtype: keep auto")
    results["step_compiled"] = {
        "phase": "step_compiled",
        "ok": True,
        "720p/compiled": {"s_per_step_20+40": 16.0, "first_call_s": 70},
    }
    results["step_fp8"]["720p/fp8"]["s_per_step_20+40"] = 17.0
    assert gpu_check.compile_verdict(results).startswith("compile: on (model.compile=true): 720p 1.25x")
    assert gpu_check.fp8_verdict(results).startswith("fp8: on (auto may use model.quantize=fp8")
    results["step_fp8"]["720p/fp8"]["rel_err_vs_bf16"] = 0.2  # faster but wrong: off
    assert gpu_check.fp8_verdict(results).startswith("fp8: off")


def test_budgets_are_shares_of_what_is_left() -> None:
    gpu_check = gpu_check_module()
    names = list(gpu_check.PHASES)
    assert sum(p.share for p in gpu_check.PHASES.values()) == pytest.approx(1.0)
    left = 475.0
    total = 0.0
    for i in range(len(names)):  # each phase using all of its budget still ends the check in time
        budget = gpu_check.phase_budgets(names[i:], left)
        total, left = total + budget, left - budget
    assert total == pytest.approx(475.0)


def _hv15_video(tokens: int, grid: list[int], cfg_s: float, no_cfg_s: float) -> dict[str, Any]:
    return {
        "grid": grid,
        "image_tokens": tokens,
        "no_cfg": {"s_per_step_54": no_cfg_s},
        "cfg": {"s_per_step_54": cfg_s},
        "video_min": {"50_steps_cfg": 50 * cfg_s / 60},
        "published": [],
    }


def test_hv15_verdicts_follow_the_measurements() -> None:
    gpu_check = gpu_check_module()
    grid_720p = [31, 45, 80]
    step = {"full_depth": 54, "gpu": "NVIDIA H200", "gpu_type": "h200", "backend": "cudnn"}
    step["480p"] = _hv15_video(49_290, [31, 30, 53], 5.0, 2.6)
    step["720p"] = _hv15_video(111_600, grid_720p, 1.2e-4 * 2 * 111_600, 13.0)
    ssta = {"grid": grid_720p, "dense_ms": 200.0, "dense_backend": "cudnn"}
    ssta["portable"] = {"ms": 250.0, "speedup_vs_dense": 0.8}
    ssta["official"] = {"ms": 100.0, "speedup_vs_dense": 2.0}
    results = _results(hv15_step=step, ssta_attention=ssta)
    ssta = gpu_check.ssta_verdict(results)
    assert ssta.startswith("ssta: use SSTA for sparse checkpoints: yes") and "official 100.0 ms" in ssta
    # the step saves 54 x 100 ms of its 13 s: 13 / 7.6
    assert f"{13.0 / (13.0 - 5.4):.2f}x per step" in ssta
    cost = gpu_check.hv15_cost_verdict(results)
    assert "('h200', 'cudnn') = 0.00012 (GPU-s per image token x step x CFG branch, 720p" in cost
    assert f"480p {5.0 / (2 * 49_290):.3g}" in cost and f"{1.2e-4 * 2 * 111_600 * 50 / 60:.1f} min" in cost
    del results["ssta_attention"]["official"]  # the portable kernel alone is slower than dense
    ssta = gpu_check.ssta_verdict(results)
    assert "sparse checkpoints: no (model.attention_mode=dense" in ssta and "flex-block-attn" in ssta
    results["ssta_attention"] = {"phase": "ssta_attention", "ok": False, "error": "killed at its budget"}
    assert "unmeasured (killed at its budget)" in gpu_check.ssta_verdict(results)
    results["hv15_step"]["720p"]["cfg"] = "error: OutOfMemoryError"  # the next largest measured one
    assert "= 5.07e-05 (GPU-s per image token x step x CFG branch, 480p" in gpu_check.hv15_cost_verdict(
        results
    )
    assert gpu_check.hv15_cost_verdict({}).startswith("hv15_cost: seconds_per_cost_unit for 1.5: unmeasured")


def test_hv15_extrapolation_is_never_negative_nor_below_the_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from gpu_check_hv15 import extrapolate

    skewed = extrapolate(1.0, [0.6, 0.6])  # block timers adding up past the forward (clock skew)
    assert skewed["ms_rest"] == 0 and skewed["s_per_step_54"] == pytest.approx(54 * 0.6)
    normal = extrapolate(1.0, [0.1, 0.3])
    assert normal["ms_rest"] == pytest.approx(600) and normal["ms_block"] == pytest.approx(200)
    assert normal["s_per_step_54"] == pytest.approx(0.6 + 54 * 0.2)
    for total, blocks in ((0.0, [0.0, 0.0]), (2.0, [0.5]), (0.01, [0.2, 0.1])):
        estimate = extrapolate(total, blocks)["s_per_step_54"]
        assert estimate >= 0 and estimate >= total and estimate >= sum(blocks)
