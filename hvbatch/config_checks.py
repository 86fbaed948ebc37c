"""Checks of the resolved config, run once by `load_config`: every problem, with its key, in one error.

- Nothing from the config reaches a shell as more than it says: every string under `slurm.`
  (partition, account, setup lines, additional_parameters keys and values, and any field added
  later) and every `parallel.nccl_env` name and value is one line without control characters;
  additional_parameters keys look like sbatch option names.
- Numbers are in range: the table `BOUNDS` below, plus two rules by name for fields in any section
  (so fields added later are covered): `*_timeout_s` and `*_interval_s` must be > 0, any other `*_s`
  must be >= 0. Every float must be finite.
- Enum-like strings (`parallel.mode`, `parallel.backend`, `batch.executor`, `device`, dtypes,
  `video.preset`) are one of their choices, and `model.name` is one of the presets in configs/model/.
- The model family checks its own sections (`ModelFamily.config_problems`: the architecture's
  consistency, the encoder settings' ranges) and what its variant refuses in `sampling.*`.

This module imports nothing from `hvbatch.config`, so that `config.py` can call it.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from hvbatch.models.family import family_for_preset, get_family

CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f-\x9f]")
SBATCH_OPTION = re.compile(r"[A-Za-z][A-Za-z0-9_-]*\Z")
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
CUDA_DEVICE = re.compile(r"cuda:\d+\Z")
INT64_MAX = 2**63 - 1


@dataclass(frozen=True)
class Bound:
    """A numeric range: `low` (exclusive when `open_low`) to `high`, both inclusive by default."""

    low: float | None = None
    high: float | None = None
    open_low: bool = False
    optional: bool = False
    """None (null) is allowed too."""

    def holds(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.open_low else value < self.low):
            return False
        return self.high is None or value <= self.high

    def describe(self) -> str:
        if self.low is not None and self.high is not None:
            text = f"in {self.low:g}..{self.high:g}"
        elif self.low is not None:
            text = f"{'>' if self.open_low else '>='} {self.low:g}"
        elif self.high is not None:
            text = f"<= {self.high:g}"
        else:
            text = "a finite number"
        return text + (" or null" if self.optional else "")


AT_LEAST_1 = Bound(1)
OPTIONAL_AT_LEAST_1 = Bound(1, optional=True)
POSITIVE = Bound(0, open_low=True)
NON_NEGATIVE = Bound(0)

BOUNDS: dict[str, Bound] = {
    "model.random_seed": Bound(0, INT64_MAX),
    "sampling.height": AT_LEAST_1,
    "sampling.width": AT_LEAST_1,
    "sampling.num_frames": AT_LEAST_1,
    "sampling.num_inference_steps": AT_LEAST_1,
    "sampling.seed": Bound(0, INT64_MAX),
    "sampling.flow_shift": POSITIVE,
    "sampling.cache_threshold": NON_NEGATIVE,
    "sampling.cache_max_skips": AT_LEAST_1,
    "vae.tile_latent_size": AT_LEAST_1,
    "vae.tile_latent_frames": AT_LEAST_1,
    "vae.tile_latent_overlap": NON_NEGATIVE,
    "vae.tile_latent_frame_overlap": NON_NEGATIVE,
    "video.fps": AT_LEAST_1,
    "video.crf": Bound(0, 51),
    # parallel.gpus_per_node / num_nodes mirror slurm.* (hvbatch.config_layers): checked there.
    "parallel.gpu_memory_gib": POSITIVE,
    "slurm.time_min": POSITIVE,
    "slurm.nodes": AT_LEAST_1,
    "slurm.gpus_per_node": AT_LEAST_1,
    "slurm.tasks_per_node": AT_LEAST_1,
    "slurm.cpus_per_task": OPTIONAL_AT_LEAST_1,
    "slurm.mem_gb": OPTIONAL_AT_LEAST_1,
    "slurm.array_parallelism": AT_LEAST_1,
    "slurm.max_array_size": OPTIONAL_AT_LEAST_1,
    "batch.seconds_per_cost_unit": Bound(0, open_low=True, optional=True),
    "batch.min_shards": AT_LEAST_1,
    "batch.encode_window": AT_LEAST_1,
    "retry.max_attempts": AT_LEAST_1,
    "retry.max_prompt_attempts": AT_LEAST_1,
    "retry.max_walltime_requeues": NON_NEGATIVE,
}

DTYPES = ("bfloat16", "float16", "float32")
X264_PRESETS = "ultrafast superfast veryfast faster fast medium slow slower veryslow placebo"
CHOICES: dict[str, tuple[str, ...]] = {
    "parallel.backend": ("auto", "nccl", "gloo"),
    "parallel.cfg": ("auto", "1", "2"),
    "parallel.comm_dtype": ("auto", "none", "fp8"),  # as hvbatch.parallel.attention.COMM_DTYPE_CHOICES
    "batch.executor": ("auto", "slurm", "local"),
    "batch.gpu_type": ("h100", "h200", "b200", "a100", "l40s"),  # as batch.control.calibration.GPU_TYPES
    "model.dtype": DTYPES,
    "model.text_encoder_dtype": DTYPES,
    "model.vae_dtype": DTYPES,
    "model.text_encoder_offload": ("cpu", "keep"),
    "video.preset": tuple(X264_PRESETS.split()),
    # As hvbatch.models.attention_backends.BACKEND_CHOICES (a test keeps the two equal).
    "model.attention": ("auto", "default", "cudnn", "flash", "efficient", "math", "fa3", "fa4", "sage"),
    "model.quantize": ("none", "fp8"),
    # As hvbatch.models.ssta_attention.ATTENTION_MODES (a test keeps the two equal).
    "model.attention_mode": ("auto", "dense", "ssta"),
    "sampling.cache": ("none", "teacache", "fbcache"),  # as hvbatch.sampling.cache.CACHE_MODES
}
PARALLEL_MODES = ("throughput", "latency")
# Sections whose strings go into job scripts or the job's environment.
SHELL_SECTIONS = ("slurm.", "parallel.nccl_env")


def leaves(obj: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, value) of every dataclass field under `obj`; dicts and lists are leaves."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            yield from leaves(value, key + ".")
        else:
            yield key, value


def bound_for(key: str) -> Bound | None:
    """The range a numeric field must be in: from `BOUNDS`, else by its name's suffix."""
    if key in BOUNDS:
        return BOUNDS[key]
    name = key.rsplit(".", 1)[-1]
    if name.endswith(("timeout_s", "interval_s")):
        return POSITIVE
    if name.endswith("_s"):
        return NON_NEGATIVE
    return None


def number_problems(key: str, value: Any) -> list[str]:
    """The range problem of one numeric (or null) field, if any."""
    bound = bound_for(key)
    if value is None:  # only fields typed `X | None` can be null; a bound by name alone allows it
        listed = BOUNDS.get(key)
        return [] if listed is None or listed.optional else [f"{key}=None must be {listed.describe()}"]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return []
    if bound is None:
        ok = math.isfinite(value)
        return [] if ok else [f"{key}={value!r} must be a finite number"]
    return [] if bound.holds(value) else [f"{key}={value!r} must be {bound.describe()}"]


SCRIPT_REASON = "the value goes into the job script or its environment and must be one line of printable text"


def one_line_problems(key: str, value: Any, reason: str = SCRIPT_REASON) -> list[str]:
    """Control characters (line breaks included) anywhere in a string, list or dict, keys too."""
    if isinstance(value, str):
        match = CONTROL_CHARS.search(value)
        if match is None:
            return []
        return [
            f"{key}={value!r} contains a line break or control character ({match.group()!r}; every "
            f"character below 32 or in 127..159 is refused): {reason}"
        ]
    if isinstance(value, list):
        return [p for i, item in enumerate(value) for p in one_line_problems(f"{key}[{i}]", item, reason)]
    if isinstance(value, dict):
        problems = []
        for name, item in value.items():
            problems += one_line_problems(f"{key} key", str(name), reason)
            problems += one_line_problems(f"{key}.{name}", item, reason)
        return problems
    return []


def name_problems(config: Any) -> list[str]:
    """additional_parameters keys are sbatch option names; nccl_env keys are variable names."""
    problems = []
    for name in config.slurm.additional_parameters or {}:
        if not SBATCH_OPTION.match(str(name)):
            problems.append(
                f"slurm.additional_parameters key {str(name)!r} is not a valid sbatch option name: use "
                "letters, digits, '-' and '_', starting with a letter (e.g. reservation, mail_user)"
            )
    for name in config.parallel.nccl_env or {}:
        if not ENV_NAME.match(str(name)):
            problems.append(
                f"parallel.nccl_env key {str(name)!r} is not an environment variable name: use "
                "letters, digits and '_', not starting with a digit"
            )
    return problems


def choice_problems(config: Any) -> list[str]:
    """Enum-like strings: each must be one of its choices."""
    values = dict(leaves(config))
    problems = [
        f"{key}={values[key]!r} is not one of {', '.join(choices)}"
        for key, choices in CHOICES.items()
        if key in values and values[key] not in choices
    ]
    mode = config.parallel.mode
    if mode != "auto" and mode not in PARALLEL_MODES:
        problems.append(f"parallel.mode={mode!r} is not one of {', '.join(PARALLEL_MODES)} (or auto)")
    for key in ("parallel.ulysses", "parallel.ring"):
        text = str(values[key]).strip()
        if text.lower() != "auto" and not (text.isdigit() and int(text) >= 1):
            problems.append(f"{key}={text!r} must be 'auto' or a positive integer (e.g. {key}=8)")
    device = config.device
    if device not in ("auto", "cpu", "cuda") and not CUDA_DEVICE.match(str(device)):
        problems.append(f"device={device!r} is not one of auto, cpu, cuda, cuda:N (N a GPU index)")
    return problems


def cross_field_problems(config: Any) -> list[str]:
    """Ranges that depend on another field."""
    problems = []
    retry = config.retry
    if retry.max_backoff_s < retry.backoff_s:
        problems.append(
            f"retry.max_backoff_s={retry.max_backoff_s!r} must be >= retry.backoff_s={retry.backoff_s!r}"
        )
    if str(config.parallel.cfg).strip() == "2" and config.sampling.cfg_scale <= 1:
        problems.append(
            f"parallel.cfg=2 needs two CFG branches, but sampling.cfg_scale={config.sampling.cfg_scale!r} "
            "<= 1 runs one: use parallel.cfg=auto (or 1), or sampling.cfg_scale > 1"
        )
    interval, peer = getattr(retry, "heartbeat_interval_s", None), getattr(retry, "peer_timeout_s", None)
    if interval is not None and peer is not None and 0 < peer <= interval:
        problems.append(
            f"retry.peer_timeout_s={peer!r} must be > retry.heartbeat_interval_s={interval!r} "
            "(else a live peer looks dead)"
        )
    vae = config.vae
    for tile_key, overlap_key in (
        ("tile_latent_size", "tile_latent_overlap"),
        ("tile_latent_frames", "tile_latent_frame_overlap"),
    ):
        tile, overlap = getattr(vae, tile_key), getattr(vae, overlap_key)
        if 2 * overlap > tile >= 1:
            problems.append(
                f"vae.{overlap_key}={overlap!r} must be in 0..vae.{tile_key} / 2 = {tile / 2:g} "
                "(only two tiles may overlap)"
            )
    return problems


def preset_problem(name: str, presets: list[str]) -> str | None:
    """Why `name` is not a model preset (None when it is one); presets are names, never paths."""
    if name in presets:
        return None
    available = f"available presets: {', '.join(presets)} (the YAML files in configs/model/)"
    if any(part in name for part in ("/", "\\", "..")) or name.startswith("~"):
        return f"unknown model preset {name!r}: a preset is a name, not a path; {available}"
    return f"unknown model preset {name!r}; {available}"


def config_problems(config: Any, presets: list[str]) -> list[str]:
    """Every problem of a resolved `Config`, each naming its key, value and the valid range."""
    problems: list[str] = []
    for key, value in leaves(config):
        problems += number_problems(key, value)
        if key.startswith(SHELL_SECTIONS):
            problems += one_line_problems(key, value)
    problems += name_problems(config)
    problems += choice_problems(config)
    problems += cross_field_problems(config)
    preset = preset_problem(str(config.model.name), presets)
    if preset is not None:
        problems.append(f"model.name: {preset}")
    return problems + family_problems(config)


def family_problems(config: Any) -> list[str]:
    """The model family's checks of its sections and of `sampling.*`, and that the preset is its own."""
    model = config.model
    try:
        family = get_family(str(model.family))
    except ValueError as err:
        return [f"model.family: {err}"]
    problems = []
    try:
        preset_family = family_for_preset(str(model.name)).name
    except ValueError:
        preset_family = family.name  # an unknown preset is reported by its own check
    if preset_family != family.name:
        problems.append(
            f"model.family={family.name!r} but preset {model.name!r} is a model of family {preset_family!r}: "
            f"choose one of {family.name}'s presets ({', '.join(family.presets)}) or leave model.family out"
        )
    if config.sampling.cache == "teacache" and not family.step_cache.teacache_coefficients:
        problems.append(
            f"sampling.cache='teacache': no TeaCache coefficients are published for {family.description}; "
            "use sampling.cache=fbcache (First-Block-Cache needs none) or none"
        )
    return problems + family.config_problems(model) + family.sampling_problems(model, config.sampling)


def raise_problems(problems: list[str]) -> None:
    """One ValueError listing every problem, or nothing when there is none."""
    if problems:
        count = "1 problem" if len(problems) == 1 else f"{len(problems)} problems"
        raise ValueError(
            f"invalid config ({count}; fix them in the config file or with key=value overrides):\n  - "
            + "\n  - ".join(problems)
        )


def check_config(config: Any, presets: list[str]) -> None:
    """Raise one ValueError listing every problem of `config` (see `config_problems`)."""
    raise_problems(config_problems(config, presets))


OVERRIDE_REASON = "an override is one line; set multi-line values in a config file"


def check_overrides(overrides: list[str]) -> None:
    """Refuse control characters in `key=value` overrides before they are parsed.

    The YAML parser behind them folds a line break into a space, so `slurm.partition=$'gpu\\nx'`
    would silently become `gpu x`; an override is one line, as the value it sets.
    """
    problems = []
    for item in overrides:
        key, _, value = item.partition("=")
        problems += one_line_problems(f"override {key.strip()}", value, OVERRIDE_REASON)
    raise_problems(problems)
