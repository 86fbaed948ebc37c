"""One-GPU check of the CUDA path, in at most 8 minutes by construction: one JSON line per phase,
then one verdict line per production choice (attention kernel, compile, FP8, comm dtype, SSTA for
sparse 1.5 checkpoints, the 1.5 shard-cost rate) and one line of 1.5 speed against published figures.

    python benchmarks/gpu_check.py --out $OUT       # on a CUDA GPU (H100/H200/B200/A100/L40...)
    python benchmarks/gpu_check.py --cpu-smoke      # tiny sizes on the CPU: every phase's code path
    python benchmarks/gpu_check.py --phases versions attention_accuracy

Each phase runs in a process of its own with a hard budget: at its budget the process group is
killed (an inductor compile that hangs goes with it, compile workers included), the phase is
reported `"ok": false` with what it had recorded so far, and the next phase runs. Budgets are
shares of the time left, so the whole check ends within `--budget-s` (default 480 s) whatever a
phase does. This process imports no torch: it cannot be stuck in CUDA itself.

Phases:
- `versions`: torch, CUDA, cuDNN, NCCL, GPU, external kernels, whether PyTorch trusts cuDNN here;
- `dispatch`: SDPA's priority order read after a first SDPA call (PyTorch sets it lazily) and
  compared with hvbatch's mirror of PyTorch's cuDNN rule; the aten kernel each call site runs;
- `attention_tflops`: TFLOP/s per kernel at 119,056 tokens, 24 heads x 128, bf16;
- `attention_accuracy`: every kernel, plain and with its LSE, at 4,112 and 119,056 queries (not
  multiples of 128) against a float32 reference on 256 rows (the tail included), a canary tensor
  for out-of-bounds writes, and 2/4/8 key blocks plus a text block merged against one call;
- `sp_multirank`: the real multi-rank sequence-parallel code on this one GPU (gloo between
  processes, CUDA compute; see gpu_check_sp.py for what it proves and does not) and NCCL's eager
  start-up on a world of 1;
- `step_eager`, `step_compiled`, `step_fp8`: a 720p and a 544p step (129 frames) per variant, every
  block timed, extrapolated to 20 + 40 blocks (never negative: measured durations only), peak memory;
- `comm_dtype`: packing cost of fp8 transfers against the link time they save;
- `vae_tile`: one VAE decode tile at the official tile size;
- `hv15_step`, `ssta_attention`, `sr_step` (gpu_check_hv15.py): a HunyuanVideo-1.5 step at full
  width and reduced depth (480p and 720p x 121 frames, with and without CFG, extrapolated to 54
  blocks, minutes per video next to the published figures); SSTA against dense attention at the
  720p token count; an SR transformer step (720p and 1080p SR) and the SR upsampler.

`--out DIR` writes gpu_check.json and gpu_check.md there after every phase. `--cpu-smoke` runs
the same code on the tiny model (float32, `aot_eager` for compiled blocks); tests/test_gpu_check.py
runs it in CI with omegaconf, submitit and imageio-ffmpeg unimportable. Its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
START_RESERVE_S = 5.0
"""Kept back from the total for killing the last phase and writing the results."""
MIN_PHASE_S = 8.0
"""A phase left less than this is skipped (a process start with torch takes seconds)."""


@dataclass(frozen=True)
class Phase:
    module: str
    function: str
    share: float
    """This phase's share of the time left when it starts (shares of later phases count too)."""


PHASES: dict[str, Phase] = {
    "versions": Phase("gpu_check_phases", "phase_versions", 0.03),
    "dispatch": Phase("gpu_check_phases", "phase_dispatch", 0.04),
    "attention_tflops": Phase("gpu_check_phases", "phase_attention_tflops", 0.09),
    "attention_accuracy": Phase("gpu_check_phases", "phase_attention_accuracy", 0.10),
    "sp_multirank": Phase("gpu_check_phases", "phase_sp_multirank", 0.11),
    "step_eager": Phase("gpu_check_step", "phase_step_eager", 0.11),
    "step_compiled": Phase("gpu_check_step", "phase_step_compiled", 0.15),
    "step_fp8": Phase("gpu_check_step", "phase_step_fp8", 0.09),
    "comm_dtype": Phase("gpu_check_step", "phase_comm_dtype", 0.03),
    "vae_tile": Phase("gpu_check_step", "phase_vae_tile", 0.05),
    "hv15_step": Phase("gpu_check_hv15", "phase_hv15_step", 0.08),
    "ssta_attention": Phase("gpu_check_hv15", "phase_ssta_attention", 0.05),
    "sr_step": Phase("gpu_check_hv15", "phase_sr_step", 0.07),
}


def phase_budgets(chosen: list[str], left_s: float) -> float:
    """The first phase's budget: its share of what is left (time a phase does not use passes on)."""
    return left_s * PHASES[chosen[0]].share / sum(PHASES[p].share for p in chosen)


def _kill(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL the phase's whole process group (compile workers, spawned ranks) and reap it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def _tail(path: Path, lines: int = 12) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def run_phase(
    name: str, budget_s: float, workdir: Path, results: dict[str, dict[str, Any]], smoke: bool, stall: bool
) -> dict[str, Any]:
    """Run one phase in its own process group; kill it at `budget_s`. Its record, partial or whole."""
    record_path, results_path, log_path = (
        workdir / f"{name}.{ext}" for ext in ("record.json", "in.json", "log")
    )
    results_path.write_text(json.dumps(results, default=str))
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        name,
        "--phase-budget-s",
        f"{budget_s:.1f}",
    ]
    command += ["--record", str(record_path), "--results", str(results_path)]
    command += ["--cpu-smoke"] * smoke + ["--stall"] * stall
    start = time.monotonic()
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT
        )
        try:
            returncode: int | None = process.wait(timeout=budget_s)
        except subprocess.TimeoutExpired:
            returncode = None
            _kill(process)
    seconds = time.monotonic() - start
    try:
        record = json.loads(record_path.read_text())
    except (OSError, ValueError):
        record = {}
    out: dict[str, Any] = {"phase": name, "ok": returncode == 0 and "error" not in record}
    out |= {k: v for k, v in record.items() if k != "phase"}
    if returncode is None:
        out["error"] = f"killed at its budget of {budget_s:.0f} s (abandoned; the next phase runs)"
    elif returncode != 0 and "error" not in out:
        out["error"] = f"exit status {returncode}"
    if not out["ok"]:
        out["log_tail"] = _tail(log_path)
    out["seconds"], out["budget_s"] = round(seconds, 1), round(budget_s, 1)
    return out


def child_main(args: argparse.Namespace) -> int:
    """Inside a phase's process: run it, recording into `args.record` as it goes."""
    sys.path[:0] = [str(HERE), str(ROOT)]
    import importlib
    import traceback

    from gpu_check_phases import Context, Recorder, Sizes

    rec = Recorder(Path(args.record))
    rec["pid"] = os.getpid()
    if args.stall:  # test hook: a phase that overruns (as a stuck compile would)
        time.sleep(3600)
    sizes = Sizes.smoke() if args.cpu_smoke else Sizes.full()
    results = json.loads(Path(args.results).read_text())
    ctx = Context(sizes, time.monotonic() + args.phase_budget_s - 1.0, results)
    phase = PHASES[args.child]
    try:
        getattr(importlib.import_module(phase.module), phase.function)(ctx, rec)
    except Exception as err:
        rec["trace"] = traceback.format_exc(limit=4)[-800:]
        rec["error"] = f"{type(err).__name__}: {err}"[:400]
        return 1
    return 0


def _ok(value: Any) -> bool:
    return isinstance(value, dict)


def attention_verdict(results: dict[str, dict[str, Any]]) -> str:
    """The fastest kernel among those accurate at every length (plain and LSE), against `auto`."""
    speed, accuracy = results.get("attention_tflops", {}), results.get("attention_accuracy", {})
    auto = results.get("dispatch", {}).get("auto_backend") or results.get("versions", {}).get("auto_backend")
    accurate: dict[str, bool] = {}
    for key, value in accuracy.items():
        if "/" not in key or not _ok(value):
            continue
        name = key.split("/", 1)[1]
        parts = [value["plain"], value["lse"], *(v for k, v in value.items() if k.startswith("ring_"))]
        good = all(p["finite"] and p["out_rel"] < 2e-2 and p.get("lse_max_abs", 0) < 5e-2 for p in parts)
        accurate[name] = accurate.get(name, True) and good and value["canary_intact"]
    candidates = {n: v["tflops"] for n, v in speed.items() if _ok(v) and accurate.get(n) and n != "sage"}
    if not candidates:
        return "attention: undecided (no kernel both timed and checked accurate); keep model.attention=auto"
    best = max(candidates, key=candidates.__getitem__)
    bad = sorted(n for n, ok in accurate.items() if not ok)
    warn = f"; INACCURATE: {', '.join(bad)} (never use them)" if bad else ""
    if auto == best:
        return f"attention: auto -> {best}, {candidates[best]:.0f} TFLOP/s, accurate: keep auto{warn}"
    if auto not in candidates:
        why = "inaccurate" if accurate.get(auto) is False else "not measured accurate"
        return f"attention: set model.attention={best} (auto's {auto} was {why}){warn}"
    ratio = candidates[best] / candidates[auto]
    if ratio < 1.03:
        return f"attention: auto -> {auto} is within 3% of the fastest ({best}): keep auto{warn}"
    return f"attention: set model.attention={best} ({ratio:.2f}x auto's {auto}, accurate){warn}"


def _step_seconds(record: dict[str, Any], variant: str) -> dict[str, float]:
    return {
        k.split("/")[0]: v["s_per_step_20+40"]
        for k, v in record.items()
        if k.endswith(f"/{variant}") and _ok(v)
    }


def compile_verdict(results: dict[str, dict[str, Any]]) -> str:
    eager = _step_seconds(results.get("step_eager", {}), "best")
    compiled_record = results.get("step_compiled", {})
    compiled = _step_seconds(compiled_record, "compiled")
    both = sorted(set(eager) & set(compiled))
    if not both:
        why = compiled_record.get("error", "no compiled step measured")
        return f"compile: off (model.compile=false): unmeasured ({why})"
    speedups = {v: eager[v] / compiled[v] for v in both}
    first = next(v for k, v in compiled_record.items() if k.endswith("/compiled") and _ok(v))["first_call_s"]
    shown = ", ".join(f"{v} {x:.2f}x" for v, x in speedups.items())
    if min(speedups.values()) >= 1.03:
        return f"compile: on (model.compile=true): {shown} per step; first call (compile) {first:.0f} s"
    return f"compile: off (model.compile=false): {shown} per step does not pay the {first:.0f} s compile"


def fp8_verdict(results: dict[str, dict[str, Any]]) -> str:
    eager = _step_seconds(results.get("step_eager", {}), "best")
    record = results.get("step_fp8", {})
    fp8 = _step_seconds(record, "fp8")
    both = sorted(set(eager) & set(fp8))
    if not both:
        why = record.get("error", "no step measured")
        return f"fp8: off (model.quantize=none; auto may not use it): unmeasured ({why})"
    speedups = {v: eager[v] / fp8[v] for v in both}
    errors = [v["rel_err_vs_bf16"] for k, v in record.items() if k.endswith("/fp8") and _ok(v)]
    shown = ", ".join(f"{v} {x:.2f}x" for v, x in speedups.items()) + f", output {max(errors):.1%} from bf16"
    if min(speedups.values()) >= 1.03 and max(errors) < 0.05:
        return f"fp8: on (auto may use model.quantize=fp8 on this GPU): {shown}"
    return f"fp8: off (model.quantize=none; auto may not use it): {shown}"


def comm_verdict(results: dict[str, dict[str, Any]]) -> str:
    record = results.get("comm_dtype", {})
    if "pack_unpack_ms" not in record:
        return "comm_dtype: auto (fp8 across nodes only, by the memory-traffic estimate): unmeasured"
    cost, nvlink, ib = record["pack_unpack_ms"], record["nvlink_ms_saved"], record["infiniband_ms_saved"]
    inside = "none" if cost >= nvlink else "fp8"
    across = "fp8" if cost < ib else "none"
    keep = (
        "keep auto"
        if (inside, across) == ("none", "fp8")
        else f"measured: {inside} inside a node, {across} across"
    )
    return (
        f"comm_dtype: {keep} (packing {cost:.2f} ms per block transfer vs {nvlink:.2f} ms saved on NVLink, "
        f"{ib:.2f} ms on InfiniBand; link speeds assumed)"
    )


SSTA_PUBLISHED = "published: 1.87x end to end against FlashAttention-3 at 720p"


def _ssta_step_speedup(results: dict[str, dict[str, Any]], ssta: dict[str, Any], ms: float) -> float | None:
    """The 1.5 step's speed-up implied by the attention times: the measured dense step (batch 1, same
    grid) minus `full_depth x (dense - SSTA)` per call; None without a measured step on that grid."""
    step_record = results.get("hv15_step", {})
    depth = step_record.get("full_depth")
    for video in step_record.values():
        if not (_ok(video) and video.get("grid") == ssta.get("grid") and _ok(video.get("no_cfg"))):
            continue
        step = video["no_cfg"].get(f"s_per_step_{depth}")
        if not step:
            return None
        sparse = step - depth * (ssta["dense_ms"] - ms) / 1e3
        return step / sparse if sparse > 0 else None
    return None


def ssta_verdict(results: dict[str, dict[str, Any]]) -> str:
    """SSTA pays when the kernel `auto` runs (official if installed, else portable) beats dense by 3%."""
    record = results.get("ssta_attention", {})
    kernel = "official" if _ok(record.get("official")) else "portable"
    measured = record.get(kernel)
    if not _ok(measured) or "dense_ms" not in record:
        why = record.get("error") or measured or "no SSTA call timed"
        return f"ssta: use SSTA for sparse checkpoints: unmeasured ({why}); keep model.attention_mode=auto"
    speedup = measured["speedup_vs_dense"]
    shown = (
        f"grid {record.get('grid')}: SSTA {kernel} {measured['ms']:.1f} ms vs dense "
        f"{record.get('dense_backend')} {record['dense_ms']:.1f} ms per call, {speedup:.2f}x"
    )
    step = _ssta_step_speedup(results, record, measured["ms"])
    shown += f", {step:.2f}x per step" if step else ""
    shown += f" ({SSTA_PUBLISHED})"
    if kernel == "portable" and "official" not in record:
        shown += "; official kernel not installed (pip install flex-block-attn)"
    if speedup >= 1.03:
        return f"ssta: use SSTA for sparse checkpoints: yes (model.attention_mode=auto): {shown}"
    return (
        "ssta: use SSTA for sparse checkpoints: no (model.attention_mode=dense is faster here; the "
        f"sparse checkpoints were distilled with SSTA: check their output dense first): {shown}"
    )


def _hv15_videos(results: dict[str, dict[str, Any]], branch: str) -> dict[str, dict[str, Any]]:
    record = results.get("hv15_step", {})
    return {k: v for k, v in record.items() if _ok(v) and _ok(v.get(branch)) and "image_tokens" in v}


def hv15_cost_verdict(results: dict[str, dict[str, Any]]) -> str:
    """The 1.5 `seconds_per_cost_unit` (GPU-s per image token x step x CFG branch, the unit of
    `hvbatch/batch/control/calibration.py`) from the largest video's CFG step: the rate grows with
    the token count (attention), and walltimes sized from the largest hold for the smaller ones."""
    record = results.get("hv15_step", {})
    videos = _hv15_videos(results, "cfg")
    if not videos:
        why = record.get("error", "no 1.5 CFG step measured")
        return f"hv15_cost: seconds_per_cost_unit for 1.5: unmeasured ({why})"
    key = f"s_per_step_{record['full_depth']}"
    rates = {label: v["cfg"][key] / (2 * v["image_tokens"]) for label, v in videos.items()}
    largest = max(videos, key=lambda label: videos[label]["image_tokens"])
    others = "".join(f"; {label} {rate:.3g}" for label, rate in rates.items() if label != largest)
    minutes = videos[largest]["video_min"].get("50_steps_cfg")
    table = f"('{record.get('gpu_type') or record.get('gpu')}', '{record.get('backend')}')"
    return (
        f"hv15_cost: seconds_per_cost_unit for 1.5 at {table} = {rates[largest]:.3g} (GPU-s per image "
        f"token x step x CFG branch, {largest} CFG step at {record['full_depth']} blocks{others}); "
        f"{largest} x 50 steps with CFG = {minutes:.1f} min per video per GPU (transformer steps only)"
    )


def hv15_speed_line(results: dict[str, dict[str, Any]]) -> str:
    """Minutes per video per GPU next to the published figures (GPU-seconds)."""
    videos = _hv15_videos(results, "cfg")
    if not videos:
        why = results.get("hv15_step", {}).get("error", "no 1.5 CFG step measured")
        return f"hv15_speed: unmeasured ({why})"
    parts = []
    for label, video in videos.items():
        minutes = video["video_min"]
        text = f"{label}: {minutes.get('50_steps_cfg', 0):.1f} min at 50 steps with CFG"
        if "8_steps_step_distilled" in minutes:
            eight, twelve = minutes["8_steps_step_distilled"], minutes["12_steps_step_distilled"]
            text += f", {eight:.2f} / {twelve:.2f} at 8 / 12 steps step-distilled"
        for pub in video.get("published", []):
            text += (
                f"; {pub['source']}: {pub['published_s'] * pub['gpus']:.0f} GPU-s at {pub['steps']} steps, "
                f"{pub['published_gpu_s_over_ours']:.2f}x ours ({pub['ours_transformer_s']:.0f} s)"
            )
        parts.append(text)
    return "hv15_speed: per video per GPU, transformer only: " + " | ".join(parts)


def verdicts(results: dict[str, dict[str, Any]]) -> list[str]:
    return [
        attention_verdict(results), compile_verdict(results), fp8_verdict(results), comm_verdict(results),
        ssta_verdict(results), hv15_cost_verdict(results), hv15_speed_line(results),
    ]  # fmt: skip


def write_outputs(
    out_dir: Path, results: dict[str, dict[str, Any]], lines: list[str], meta: dict[str, Any]
) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    data = {"meta": meta, "phases": results, "verdicts": lines}
    markdown = [
        f"# gpu_check {meta.get('date', '')}",
        "",
        *(f"- {line}" for line in lines),
        "",
        "| phase | ok | s | budget s |",
    ]
    markdown += ["|---|---|---|---|"] + [
        f"| {n} | {r['ok']} | {r['seconds']} | {r['budget_s']} |" for n, r in results.items()
    ]
    for name, text in (
        ("gpu_check.json", json.dumps(data, indent=1, default=str)),
        ("gpu_check.md", "\n".join(markdown) + "\n"),
    ):
        tmp = out_dir / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(out_dir / name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU (CI)")
    parser.add_argument("--budget-s", type=float, default=480.0, help="total time budget (default 8 min)")
    parser.add_argument("--phases", nargs="+", choices=list(PHASES), default=list(PHASES))
    parser.add_argument("--out", help="write gpu_check.json and gpu_check.md into this directory")
    parser.add_argument("--stall-phase", choices=list(PHASES), help="test hook: this phase overruns")
    parser.add_argument("--child", choices=list(PHASES), help=argparse.SUPPRESS)
    parser.add_argument("--phase-budget-s", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--record", help=argparse.SUPPRESS)
    parser.add_argument("--results", help=argparse.SUPPRESS)
    parser.add_argument("--stall", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child_main(args)
    start = time.monotonic()
    end = start + args.budget_s - START_RESERVE_S
    chosen = [p for p in PHASES if p in args.phases]
    results: dict[str, dict[str, Any]] = {}
    meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "argv": sys.argv[1:] if argv is None else argv}
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        for i, name in enumerate(chosen):
            left = end - time.monotonic()
            budget = phase_budgets(chosen[i:], left)
            if budget < MIN_PHASE_S:
                results[name] = {
                    "phase": name,
                    "ok": False,
                    "error": "skipped: no time left",
                    "seconds": 0,
                    "budget_s": 0,
                }
            else:
                results[name] = run_phase(
                    name, budget, Path(tmp), results, args.cpu_smoke, name == args.stall_phase
                )
            print(json.dumps(results[name], default=str), flush=True)
            if args.out:
                write_outputs(Path(args.out), results, verdicts(results), meta)
    lines = verdicts(results)
    meta["total_s"] = round(time.monotonic() - start, 1)
    for line in lines:
        print(f"verdict: {line}", flush=True)
    print(json.dumps({"total_s": meta["total_s"], "budget_s": args.budget_s}), flush=True)
    if args.out:
        write_outputs(Path(args.out), results, lines, meta)
    return 0 if all(r["ok"] for r in results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
