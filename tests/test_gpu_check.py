"""benchmarks/gpu_check.py imports and runs every phase on the CPU (`--cpu-smoke`)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def test_cpu_smoke_runs_every_phase(capsys: pytest.CaptureFixture[str]) -> None:
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    assert spec is not None and spec.loader is not None
    gpu_check = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = gpu_check  # dataclasses look their module up there
    spec.loader.exec_module(gpu_check)
    assert gpu_check.main(["--cpu-smoke", "--budget-s", "600"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [r["phase"] for r in lines] == list(gpu_check.PHASES)
    assert all(r["ok"] for r in lines), [r for r in lines if not r["ok"]]
    by_phase = {r["phase"]: r for r in lines}
    assert by_phase["attention_lse"]["math"]["ring_8_blocks"]["lse_max_abs"] < 1e-5
    assert by_phase["sp_transformer"]["rel_err"] < 1e-5
    steps = by_phase["transformer_step"]
    assert set(steps) >= {f"{v}/{n}" for v in ("64p", "48p") for n in ("default", "best", "compiled", "fp8")}
    assert all(isinstance(r, dict) for k, r in steps.items() if "/" in k), steps
