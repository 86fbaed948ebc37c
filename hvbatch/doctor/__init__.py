"""`hvbatch doctor`: check what a run needs without loading the model, and say what to fix.

Each check gives one `Check` record (`ok`, `warn` or `fail`): the weights (layout, every tensor's
name and shape from the file headers, the text encoder and tokenizer folders, the VAE), the
parallel plan and the GPUs visible here, ffmpeg with libx264, the run directory's filesystem and
Slurm (controller, accounting, partition, account, QoS, MaxArraySize). Nothing reads tensor values.
Modules: `weights` (model files), `system` (plan, GPUs, ffmpeg, run directory), `cluster` (Slurm).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from hvbatch.doctor import cluster, system, weights
from hvbatch.doctor.checks import Check, guarded, one_line

__all__ = ["Check", "exit_status", "one_line", "run_doctor"]

if TYPE_CHECKING:
    import pyarrow as pa

    from hvbatch.config import Config


def run_doctor(config: Config, *, run_dir: Path, videos: pa.Table | None = None) -> list[Check]:
    """Every check for a run of `config` in `run_dir` (`videos`: the prompts file's videos, if given)."""
    checks: list[Check] = []
    checks += guarded("weights", lambda: weights.check_weights(config.model))
    checks += guarded("plan", lambda: system.check_plan_and_gpus(config, videos))
    checks += guarded("host memory", lambda: [system.check_host_memory(config)])
    checks += guarded("ffmpeg", lambda: [system.check_ffmpeg()])
    checks += guarded("run dir", lambda: system.check_run_dir(run_dir, config, videos))
    checks += guarded("slurm", lambda: cluster.check_slurm(config))
    return checks


def exit_status(checks: list[Check]) -> int:
    """1 if any check failed, else 0 (warnings do not fail)."""
    return 1 if any(c.status == "fail" for c in checks) else 0
