"""What `submit` and `retry` check before writing anything: the model's files, and which
`key=value` overrides a retry may apply to a run that exists.

The model's files are checked as `hvbatch doctor` checks them (the weights root's layout, every
transformer and VAE tensor's name and shape from file headers, the encoder and tokenizer folders;
no tensor values read), so a run whose jobs could only fail with `load-failed` is refused in
seconds instead of failing every job attempt.

A retry may change how and where the videos are made, never what they are: weight paths, the
Slurm placement and walltime (`slurm.partition`, `time_min`, ...), the executor, the retry budget
and waits. Everything that decides a video's pixels or the parallel layout it is computed with
(sampling, the model's settings, the VAE, the mp4 encoding, the device, `parallel.*`, the ranks
of a job) is refused, naming the key and why. The overrides are merged into the run's
`config.yaml` (rewritten atomically, as every job reads it) and recorded with their previous
values in `config-overrides.json`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from hvbatch.batch.files import read_json, write_json_atomic
from hvbatch.batch.rundir import RunDir
from hvbatch.config import Config, load_config, save_config

OVERRIDES_FILE = "config-overrides.json"

RETRY_SAFE_KEYS = (
    "model.path", "model.transformer_path", "model.vae_path", "model.text_encoder_path",
    "model.text_encoder_2_path", "slurm.partition", "slurm.account", "slurm.qos", "slurm.constraint",
    "slurm.time_min", "slurm.cpus_per_task", "slurm.mem_gb", "slurm.array_parallelism",
    "slurm.max_array_size", "slurm.additional_parameters", "slurm.setup", "batch.executor",
    "batch.gpu_type", "batch.seconds_per_cost_unit", "batch.reserve_s", "batch.encode_window",
    "batch.overlap_writes", "retry", "parallel.timeout_s", "parallel.backend", "parallel.nccl_env",
    "fault",
)  # fmt: skip
"""Keys (and the sections whose every key) a retry may override: none changes what a video is."""

RETRY_REFUSED = (
    ("model", "decides the model the videos are made with (preset, architecture, dtypes, kernels)"),
    ("sampling", "is part of each video's identity (its size, steps, guidance, seed)"),
    ("vae", "changes how the videos are decoded, and so their pixels"),
    ("video", "changes the mp4 files themselves (frame rate, encoding)"),
    ("device", "changes the device the videos are computed on, and so their numerics"),
    ("parallel", "changes the parallel layout the videos are computed with, and so their numerics"),
    ("slurm", "changes the ranks of each job, and so the parallel layout the videos are computed with"),
    ("batch.min_shards", "has no effect on a run: its shards were frozen at submit"),
    ("batch", "has no effect on a run that exists"),
)
"""The first matching prefix says why a key a retry may not change is refused."""


def check_model_files(config: Config, command: str) -> None:
    """The doctor's weight and component checks; a ValueError lists every failing one."""
    from hvbatch.doctor.checks import guarded
    from hvbatch.doctor.weights import check_weights

    failed = [c for c in guarded("weights", lambda: check_weights(config.model)) if c.status == "fail"]
    if failed:
        lines = "\n".join(
            f"  {c.check}: {c.detail.rstrip().rstrip('.')}" + (f"; fix: {c.fix}" if c.fix else "")
            for c in failed
        )
        raise ValueError(
            f"the model's files (model={config.model.name}) would fail every job, so nothing was "
            f"{command}:\n{lines}\n(`hvbatch doctor` checks a config without submitting; --no-weight-check "
            "skips this check where the weights are visible only on the compute nodes)"
        )


def _under(key: str, prefix: str) -> bool:
    return key == prefix or key.startswith(prefix + ".")


def retry_refusal(key: str) -> str | None:
    """Why a retry may not override `key`, or None when it may."""
    if any(_under(key, safe) for safe in RETRY_SAFE_KEYS):
        return None
    for prefix, why in RETRY_REFUSED:
        if _under(key, prefix):
            return why
    return "is not a setting a retry can change"


@dataclass(frozen=True)
class RetryOverrides:
    """Overrides a retry will apply: the run's new config and what each key was before."""

    config: Config
    changes: dict[str, dict[str, Any]]
    """key -> {"from": value before, "to": value after}."""

    @classmethod
    def check(cls, run: RunDir, overrides: list[str]) -> RetryOverrides | None:
        """Refuse (ValueError) any override that could change a video, naming each key and why;
        None without overrides."""
        if not overrides:
            return None
        keys = [item.split("=", 1)[0].strip() for item in overrides]
        refused = [f"{key} ({why})" for key in keys if (why := retry_refusal(key)) is not None]
        if refused:
            raise ValueError(
                f"a retry cannot override {'; '.join(refused)}. A retry may change only what does not "
                "change a video: the weight paths (model.path, model.*_path), slurm.partition, account, "
                "qos, constraint, time_min, mem_gb, cpus_per_task, array_parallelism, setup and "
                "additional_parameters, batch.executor, retry.*, parallel.timeout_s and backend. "
                f"Nothing was changed; for other settings submit a new run (hvbatch submit --run-dir NEW)"
            )
        path = run.root / "config.yaml"
        before, after = _plain(load_config(path)), load_config(path, overrides)
        changes = {key: {"from": _select(before, key), "to": _select(_plain(after), key)} for key in keys}
        return cls(after, changes)

    def apply(self, run: RunDir) -> None:
        """Save the new config beside the run's outputs and record the change (both atomically)."""
        save_config(self.config, run.root / "config.yaml")
        path = run.root / OVERRIDES_FILE
        history = read_json(path) if path.is_file() else {"overrides": []}
        history["overrides"].append({"at": time.time(), "command": "hvbatch retry", "set": self.changes})
        write_json_atomic(path, history)

    def words(self) -> str:
        return ", ".join(
            f"{key}={change['to']!r} (was {change['from']!r})" for key, change in self.changes.items()
        )


def _plain(config: Config) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.structured(config))


def _select(tree: Any, key: str) -> Any:
    for part in key.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree
