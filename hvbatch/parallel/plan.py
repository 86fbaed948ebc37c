"""The layout a config leads to: `ParallelPlan`s from the config tree, for a video or a job.

Nothing is loaded: the plan comes from the config tree alone (`parallel.*`, the job's shape
`slurm.nodes` x `slurm.gpus_per_node` (its one owner, `hvbatch.config_layers`), `sampling.*`,
`model=`, `model.dtype`) and the model family's figures (`ModelFamily.memory`: parameter counts,
encoders, VAE, and whether the block linears run in FP8; `ModelFamily.geometry`: the image tokens
of a video). Used by `hvbatch plan`, `submit --dry-run`, inside every shard job and by
`hvbatch generate`.
"""

from __future__ import annotations

import dataclasses
import math

from hvbatch.config import Config, SamplingConfig
from hvbatch.models.family import MemoryFigures, family_of
from hvbatch.parallel.dims import ParallelDims
from hvbatch.parallel.memory import GIB, NO_COMPONENTS, ComponentMemory, ModelSize, host_memory_gib
from hvbatch.parallel.planner import ParallelPlan, plan_parallel


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


def plan_mode(config: Config, auto: str = "throughput") -> str:
    """`parallel.mode`, with `auto` meaning `auto` (throughput, the batch default; latency for generate)."""
    mode = config.parallel.mode
    return auto if mode == "auto" else mode


def memory_figures(config: Config) -> MemoryFigures:
    """The model family's figures for this config (transformer, encoders, VAE, fp8 weights), with
    the image encoder and the image's conditioning tokens of a family that takes images."""
    family = family_of(config.model)
    figures = family.memory(config.model)
    image = family.image_input
    if image is None or not (image.encoder_params or image.image_tokens):
        return figures
    words = " + ".join(w for w in (figures.encoder_words, image.encoder_words) if w)
    return dataclasses.replace(
        figures,
        encoder_params=figures.encoder_params + image.encoder_params,
        encoder_words=words,
        text_tokens=figures.text_tokens + image.image_tokens,
    )


def components_for(config: Config) -> ComponentMemory:
    """The text encoders and VAE the config loads (none for the random-weight presets)."""
    if config.model.random_weights:
        return NO_COMPONENTS
    return ComponentMemory.from_figures(
        memory_figures(config),
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
    """Image tokens of the video `sampling` describes, by the model family's latent geometry."""
    geometry = family_of(config.model).geometry
    return geometry.checked_image_tokens(sampling.height, sampling.width, sampling.num_frames)


def plan_for_config(
    config: Config, sampling: SamplingConfig | None = None, *, auto_mode: str = "throughput"
) -> ParallelPlan:
    """The plan for one video of size `sampling` (default `config.sampling`) under `config.parallel`.

    `auto_mode` is what `parallel.mode=auto` means here (throughput for batches, latency for generate).
    """
    sampling = config.sampling if sampling is None else sampling
    p = config.parallel
    ulysses = parse_degree(p.ulysses, "parallel.ulysses")
    ring = parse_degree(p.ring, "parallel.ring")
    cfg = parse_degree(p.cfg, "parallel.cfg")
    figures = memory_figures(config)
    model = ModelSize.from_figures(figures, config.model.dtype)
    components = components_for(config)
    plan = plan_parallel(
        model,
        image_tokens=video_tokens(config, sampling),
        text_tokens=figures.text_tokens,
        gpus_per_node=config.slurm.gpus_per_node,  # the job's shape has one owner: slurm.*
        num_nodes=config.slurm.nodes,
        gpu_memory_gib=p.gpu_memory_gib,
        mode=plan_mode(config, auto_mode),
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
    figures = memory_figures(config)
    weights = figures.fp8_words or config.model.dtype
    cfg = ", true CFG (batch 2)" if sampling.cfg_scale > 1 else ""
    return (
        f"video: {sampling.height}x{sampling.width}x{sampling.num_frames} -> "
        f"{video_tokens(config, sampling):,} image tokens + {figures.text_tokens} text "
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
    config: Config,
    sampling: SamplingConfig,
    gpus_per_node: int,
    num_nodes: int,
    *,
    auto_mode: str = "throughput",
) -> ParallelPlan:
    """The plan for a job of `num_nodes` x `gpus_per_node` ranks making a video of size `sampling`."""
    shape = {"gpus_per_node": gpus_per_node, "num_nodes": num_nodes}
    job = dataclasses.replace(
        config,
        parallel=dataclasses.replace(config.parallel, **shape),
        slurm=dataclasses.replace(
            config.slurm, nodes=num_nodes, gpus_per_node=gpus_per_node, tasks_per_node=gpus_per_node
        ),
    )
    return plan_for_config(job, sampling, auto_mode=auto_mode)


def layout_for_job(
    config: Config,
    sampling: SamplingConfig,
    world_size: int,
    local_world_size: int,
    *,
    auto_mode: str = "throughput",
) -> ParallelDims:
    """The layout of a job's `world_size` ranks (`local_world_size` per node) for videos the size of
    `sampling`, validated against the model's heads: what the batch job uses per shard and
    `hvbatch generate` for its video (`auto_mode="latency"`)."""
    nodes = max(1, world_size // local_world_size)
    dims = plan_for_job(config, sampling, local_world_size, nodes, auto_mode=auto_mode).dims(world_size)
    dims.validate(family_of(config.model).attention_heads(config.model))
    return dims
