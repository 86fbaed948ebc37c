"""The layout a config leads to: `ParallelPlan`s from the config tree, for a video or a job.

Nothing is loaded: the plan comes from the config tree alone (`parallel.*`, `sampling.*`,
`model=`, `model.dtype`, and whether the block linears run in FP8: `model.quantize=fp8`, or a
`model.transformer_path` that is an `_fp8.pt` checkpoint).
Used by `hvbatch plan`, `submit --dry-run` and inside every shard job.
"""

from __future__ import annotations

import dataclasses
import math

from hvbatch.config import Config, SamplingConfig
from hvbatch.parallel.memory import GIB, NO_COMPONENTS, ComponentMemory, ModelSize, host_memory_gib
from hvbatch.parallel.planner import ParallelPlan, image_tokens, plan_parallel

FP8_SUFFIX = "_fp8.pt"


def parse_degree(value: object, key: str) -> int | None:
    """A `parallel.ulysses` / `ring` / `cfg` value: `auto` -> None, else a positive integer."""
    text = str(value).strip()
    if text.lower() == "auto":
        return None
    try:
        degree = int(text)
    except ValueError:
        degree = 0
    if degree < 1:
        raise ValueError(f"{key}={text!r} must be 'auto' or a positive integer (e.g. {key}=8)")
    return degree


def plan_mode(config: Config) -> str:
    """`parallel.mode`, with `auto` meaning throughput (the batch default)."""
    mode = config.parallel.mode
    return "throughput" if mode == "auto" else mode


def uses_fp8(config: Config) -> bool:
    """Whether the block linears run in float8: `model.quantize=fp8`, or an `*_fp8.pt` checkpoint."""
    return config.model.quantize == "fp8" or str(config.model.transformer_path or "").endswith(FP8_SUFFIX)


def components_for(config: Config) -> ComponentMemory:
    """The text encoders and VAE the config loads (none for the random-weight presets)."""
    if config.model.random_weights:
        return NO_COMPONENTS
    return ComponentMemory.hunyuan(
        config.model.text_encoder_dtype,
        config.model.vae_dtype,
        offloaded=config.model.text_encoder_offload == "cpu",
    )


def host_memory_for_config(config: Config) -> float | None:
    """GiB of host memory one node of a job needs (`slurm.tasks_per_node` ranks); None for the
    random-weight presets, whose host memory the memory model does not describe."""
    if config.model.random_weights:
        return None
    return host_memory_gib(components_for(config), config.slurm.tasks_per_node)


def slurm_mem_gb(config: Config) -> int | None:
    """`slurm.mem_gb`, or when it is empty the memory model's host memory per node in whole GB
    (None: the cluster's default applies)."""
    if config.slurm.mem_gb:
        return config.slurm.mem_gb
    gib = host_memory_for_config(config)
    return None if gib is None else math.ceil(gib * GIB / 1e9)


def video_tokens(config: Config, sampling: SamplingConfig) -> int:
    """Image tokens of the video `sampling` describes, with the model's patch size."""
    t = config.model.transformer
    return image_tokens(
        sampling.height, sampling.width, sampling.num_frames, (t.patch_size_t, t.patch_size, t.patch_size)
    )


def plan_for_config(config: Config, sampling: SamplingConfig | None = None) -> ParallelPlan:
    """The plan for one video of size `sampling` (default `config.sampling`) under `config.parallel`."""
    sampling = config.sampling if sampling is None else sampling
    p = config.parallel
    ulysses = parse_degree(p.ulysses, "parallel.ulysses")
    ring = parse_degree(p.ring, "parallel.ring")
    cfg = parse_degree(p.cfg, "parallel.cfg")
    model = ModelSize.from_config(config.model.transformer, config.model.dtype, fp8=uses_fp8(config))
    components = components_for(config)
    plan = plan_parallel(
        model,
        image_tokens=video_tokens(config, sampling),
        text_tokens=config.model.text_encoder.max_text_tokens,
        gpus_per_node=p.gpus_per_node,
        num_nodes=p.num_nodes,
        gpu_memory_gib=p.gpu_memory_gib,
        mode=plan_mode(config),
        ulysses=ulysses,
        ring=ring,
        batch=2 if sampling.cfg_scale > 1 else 1,
        components=components,
        cfg=cfg,
    )
    if not config.vae.tiling:
        note = (
            "warning: vae.tiling=false: untiled decoding needs far more memory than the tiled peak "
            "counted here"
        )
        plan = dataclasses.replace(plan, reasons=(note, *plan.reasons))
    return plan


def plan_header(config: Config, sampling: SamplingConfig) -> str:
    weights = "fp8 block weights" if uses_fp8(config) else config.model.dtype
    cfg = ", true CFG (batch 2)" if sampling.cfg_scale > 1 else ""
    return (
        f"video: {sampling.height}x{sampling.width}x{sampling.num_frames} -> "
        f"{video_tokens(config, sampling):,} image tokens + {config.model.text_encoder.max_text_tokens} text "
        f"tokens{cfg}; model {config.model.name} ({weights})"
    )


def plan_to_dict(plan: ParallelPlan) -> dict[str, object]:
    """The plan as JSON-ready data (adds `sp`, `world_size`, `memory.total_gib` and `memory.fits`)."""
    data: dict[str, object] = dataclasses.asdict(plan)
    data["reasons"] = list(plan.reasons)
    data["sp"] = plan.sp
    data["world_size"] = plan.world_size
    memory = dataclasses.asdict(plan.memory)
    memory["total_gib"] = plan.memory.total_gib
    memory["fits"] = plan.memory.fits(plan.gpu_memory_gib)
    data["memory"] = memory
    return data


def plan_for_job(
    config: Config, sampling: SamplingConfig, gpus_per_node: int, num_nodes: int
) -> ParallelPlan:
    """The plan for a job of `num_nodes` x `gpus_per_node` ranks making a video of size `sampling`."""
    job = dataclasses.replace(
        config,
        parallel=dataclasses.replace(config.parallel, gpus_per_node=gpus_per_node, num_nodes=num_nodes),
    )
    return plan_for_config(job, sampling)
