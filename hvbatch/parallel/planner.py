"""Choose `dp x cfg x ulysses x ring` for a job from a per-GPU memory model.

The memory model (per GPU, in `hvbatch.parallel.memory`, reported in GiB):
    transformer weights  params * bytes per param (bf16 2; fp8 checkpoints keep block linear weights at 1)
  + text encoders        the model family's text encoders, in their dtype
  + VAE weights          the causal 3D VAE (encoder and decoder), in its dtype
  + activations          bytes per token per hidden channel * hidden size * tokens per rank * batch,
                         batch = 2 with true CFG, 1 without or with cfg 2 (one branch per rank),
                         tokens per rank = ceil(image tokens / sp) + text tokens (text is replicated)
  + VAE decode peak      one tile's activations at the default tiles (counted on every GPU: only the
                         SP group's leader decodes, but any rank may be it)
  + safety margin        10% of the sum (allocator fragmentation, CUDA context, NCCL buffers)

Layout rules (a "group" is the cfg * ulysses * ring GPUs of one video):
  * cfg 2 (auto, only with true CFG): the two CFG branches run on two halves of the group. It halves
    the activations per GPU like sp 2 but exchanges one velocity per step instead of an all-to-all
    per block, so for the same group size a layout with cfg 2 is preferred to one without.
  * Ulysses takes the largest divisor of the head count that divides the SP size and the node's GPU
    count (so Ulysses groups, contiguous ranks, never straddle a node); ring takes the rest and may
    cross nodes.
  * `throughput`: the smallest group (a divisor of the world size) whose estimate fits; the other
    GPUs become data-parallel replicas.
  * `latency`: one node per video (group = GPUs per node), more nodes only if a node's memory is short.
  * Explicit `cfg` / `ulysses` / `ring` are respected (the other is filled in by the rules), validated with
    `ParallelDims`, and only warned about when the estimate does not fit.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from hvbatch.parallel.dims import ParallelDims
from hvbatch.parallel.memory import (
    DEFAULT_TEXT_TOKENS,
    MODES,
    SAFETY_MARGIN,
    ComponentMemory,
    MemoryEstimate,
    ModelSize,
    estimate_memory,
)


@dataclass(frozen=True)
class ParallelPlan:
    """A job's parallel layout, the memory estimate behind it, and why it was chosen."""

    dp: int
    """Data-parallel replicas: videos generated at the same time (outermost)."""
    ulysses: int
    """Ulysses degree (all-to-all over heads; contiguous ranks inside a node)."""
    ring: int
    """Ring degree (rotating keys and values; may cross nodes)."""
    mode: str
    """`throughput` or `latency`."""
    memory: MemoryEstimate
    """Per-GPU memory estimate of this layout."""
    reasons: tuple[str, ...]
    """Human-readable sentences explaining each choice, warnings first prefixed `warning:`."""
    gpus_per_node: int = 8
    """GPUs per node the plan was made for."""
    num_nodes: int = 1
    """Nodes per job the plan was made for."""
    gpu_memory_gib: float = 80.0
    """Usable memory per GPU the plan was checked against."""
    model: str = ""
    """The transformer's size, in words (e.g. `12.82B params, 16-bit`)."""
    cfg: int = 1
    """CFG-parallel degree: 2 runs the two CFG branches on two SP blocks of the video's GPUs."""
    encoders: str = ""
    """The text encoders counted, in words (the model family's)."""

    @property
    def sp(self) -> int:
        """GPUs per CFG branch: ulysses * ring."""
        return self.ulysses * self.ring

    @property
    def group(self) -> int:
        """GPUs per video: cfg * ulysses * ring."""
        return self.cfg * self.sp

    @property
    def world_size(self) -> int:
        return self.gpus_per_node * self.num_nodes

    def dims(self, world_size: int | None = None) -> ParallelDims:
        """The layout as `ParallelDims` for `world_size` (default the plan's own; dp = world / group).

        Call `.validate(num_heads)` on it: a world size that the group does not divide is refused there.
        """
        world = self.world_size if world_size is None else world_size
        return ParallelDims(
            dp=max(1, world // self.group),
            ulysses=self.ulysses,
            ring=self.ring,
            world_size=world,
            cfg=self.cfg,
        )


@dataclass(frozen=True)
class _Candidate:
    ulysses: int
    ring: int
    memory: MemoryEstimate
    cfg: int = 1

    @property
    def sp(self) -> int:
        return self.ulysses * self.ring

    @property
    def group(self) -> int:
        return self.cfg * self.sp

    @property
    def name(self) -> str:
        """`sp=4`, or `cfg=2 x sp=4` with CFG parallelism."""
        return f"sp={self.sp}" if self.cfg == 1 else f"cfg={self.cfg} x sp={self.sp}"


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def auto_ulysses(sp: int, num_heads: int, gpus_per_node: int) -> int:
    """The largest divisor of `num_heads` that divides both `sp` and `gpus_per_node` (at least 1)."""
    return max(d for d in _divisors(num_heads) if sp % d == 0 and gpus_per_node % d == 0)


def _layouts(
    world: int, num_heads: int, gpus_per_node: int, ulysses: int | None, ring: int | None
) -> list[tuple[int, int]]:
    """Every `(ulysses, ring)` whose product divides `world` and agrees with the explicit settings."""
    layouts = []
    for sp in _divisors(world):
        if ulysses is not None and ring is not None:
            if sp == ulysses * ring:
                layouts.append((ulysses, ring))
        elif ulysses is not None:
            if sp % ulysses == 0:
                layouts.append((ulysses, sp // ulysses))
        elif ring is not None:
            u = sp // ring
            if sp % ring == 0 and num_heads % u == 0 and gpus_per_node % u == 0:
                layouts.append((u, ring))
        else:
            u = auto_ulysses(sp, num_heads, gpus_per_node)
            layouts.append((u, sp // u))
    return layouts


def _validate(dims: ParallelDims, num_heads: int, gpus_per_node: int, num_nodes: int) -> None:
    try:
        dims.validate(num_heads)
    except ValueError as err:
        raise ValueError(
            f"{err} (WORLD_SIZE = slurm.gpus_per_node({gpus_per_node}) * slurm.nodes({num_nodes}); "
            "set parallel.ulysses and parallel.ring to auto, or to degrees whose product divides WORLD_SIZE)"
        ) from err


def _check_inputs(mode: str, minimums: dict[str, tuple[float, float]]) -> None:
    """`minimums` maps a setting's name to (value, smallest allowed value)."""
    problems = [
        f"{key} must be >= {low:g}, got {value:g}" for key, (value, low) in minimums.items() if value < low
    ]
    if mode not in MODES:
        problems.append(f"parallel.mode={mode!r} is not one of {', '.join(MODES)} (or auto)")
    if problems:
        raise ValueError("cannot plan: " + "; ".join(problems))


def _too_big(largest: _Candidate, gpu_memory_gib: float, world: int) -> ValueError:
    m = largest.memory
    base = m.total_gib - m.margin_gib
    fixed = (base - m.activations_gib) * m.total_gib / base
    why = (
        f"even with all {world} GPUs on one video ({largest.name}) the estimate is "
        f"{m.total_gib:.1f} GiB per GPU, more than parallel.gpu_memory_gib={gpu_memory_gib:g}"
    )
    if fixed > gpu_memory_gib:
        why += (
            f"; the weights, text encoders and VAE decode alone need {fixed:.1f} GiB (with the margin) "
            "and do not shrink with more GPUs"
        )
    more_gpus = "use more GPUs per job (slurm.nodes, slurm.gpus_per_node) or "
    if fixed > gpu_memory_gib:  # sequence parallelism splits the video's tokens, never the weights
        more_gpus = "more GPUs per job cannot help; use "
    return ValueError(
        f"the video does not fit: {why}. To fix: {more_gpus}GPUs with more memory, fp8 transformer weights "
        "(the model's fp8 checkpoint in model.transformer_path), or a smaller video "
        "(sampling.height, sampling.width, sampling.num_frames)"
    )


def _does_not_fit(c: _Candidate, gpu_memory_gib: float) -> str:
    return (
        f"warning: the estimate ({c.memory.total_gib:.1f} GiB per GPU) exceeds {gpu_memory_gib:g} GiB: "
        "expect out-of-memory errors; use a larger sp (parallel.ulysses / parallel.ring), fp8 weights "
        "or a smaller video"
    )


def _pick_throughput(
    candidates: list[_Candidate], gpu_memory_gib: float, explicit: bool, world: int
) -> tuple[_Candidate, list[str]]:
    fitting = [i for i, c in enumerate(candidates) if c.memory.fits(gpu_memory_gib)]
    if not fitting:
        if not explicit:
            raise _too_big(candidates[-1], gpu_memory_gib, world)
        chosen = candidates[-1]
        return chosen, [
            _does_not_fit(chosen, gpu_memory_gib),
            f"{chosen.name}: the largest group the explicit settings allow",
        ]
    chosen = candidates[fitting[0]]
    est = f"{chosen.memory.total_gib:.1f} GiB"
    if fitting[0] == 0:
        if chosen.group == 1:
            return chosen, [
                f"sp=1: one GPU per video fits (estimate {est} of {gpu_memory_gib:g} GiB per GPU)"
            ]
        return chosen, [
            f"{chosen.name}: the smallest group the explicit settings allow; its estimate ({est}) fits in "
            f"{gpu_memory_gib:g} GiB per GPU"
        ]
    smaller = candidates[fitting[0] - 1]
    return chosen, [
        f"{chosen.name}: the smallest sequence-parallel group whose estimate ({est}) fits in "
        f"{gpu_memory_gib:g} GiB per GPU; {smaller.name} needs {smaller.memory.total_gib:.1f} GiB"
    ]


def _pick_latency(
    candidates: list[_Candidate], gpu_memory_gib: float, explicit: bool, gpus_per_node: int, world: int
) -> tuple[_Candidate, list[str]]:
    node = [c for c in candidates if c.group == gpus_per_node]
    inside = [c for c in candidates if c.group <= gpus_per_node]
    chosen = (node or inside[-1:] or candidates[:1])[0]
    if chosen.group == gpus_per_node:
        reasons = [f"{chosen.name}: latency mode gives each video a whole node ({gpus_per_node} GPUs)"]
    else:
        reasons = [
            f"{chosen.name}: the group closest to a whole node ({gpus_per_node} GPUs) that the "
            "explicit settings allow"
        ]
    if chosen.memory.fits(gpu_memory_gib):
        return chosen, reasons
    if explicit:
        return chosen, [_does_not_fit(chosen, gpu_memory_gib), *reasons]
    bigger = [c for c in candidates if c.group > chosen.group and c.memory.fits(gpu_memory_gib)]
    if not bigger:
        raise _too_big(candidates[-1], gpu_memory_gib, world)
    return bigger[0], [
        f"{bigger[0].name}: one node ({chosen.name}) needs {chosen.memory.total_gib:.1f} GiB per GPU, more "
        f"than {gpu_memory_gib:g} GiB, so each video spans {bigger[0].group / gpus_per_node:g} nodes"
    ]


def _layout_reasons(
    c: _Candidate, num_heads: int, gpus_per_node: int, world: int, explicit: tuple[bool, bool]
) -> list[str]:
    u, r, sp = c.ulysses, c.ring, c.sp
    ulysses_set, ring_set = explicit
    if ulysses_set:
        reasons = [f"ulysses={u}: set explicitly (parallel.ulysses)"]
    elif ring_set:
        reasons = [f"ulysses={u}: filled in as sp / ring = {sp} / {r}"]
    else:
        reasons = [
            f"ulysses={u}: the largest divisor of the {num_heads} heads that divides sp={sp} and "
            f"the {gpus_per_node} GPUs of a node"
        ]
    if ring_set:
        reasons.append(f"ring={r}: set explicitly (parallel.ring)")
    else:
        reasons.append(f"ring={r}: the rest of the group (sp / ulysses = {sp} / {u})")
    if sp > gpus_per_node:
        reasons.append(
            f"the group spans {math.ceil(sp / gpus_per_node)} nodes: ring crosses nodes "
            "(point-to-point traffic that overlaps compute)"
        )
    elif c.group > gpus_per_node:
        reasons.append(
            f"the two CFG halves sit on {math.ceil(c.group / gpus_per_node)} nodes: only their one velocity "
            "exchange per step crosses the network"
        )
    elif gpus_per_node % sp:
        reasons.append(
            f"note: sp={sp} does not divide the {gpus_per_node} GPUs of a node, so some groups "
            "straddle two nodes (their ring crosses the network)"
        )
    if u > gpus_per_node or gpus_per_node % u:
        reasons.append(
            f"warning: ulysses={u} does not divide the {gpus_per_node} GPUs of a node, so "
            "Ulysses all-to-alls cross nodes (slow); prefer a ulysses that divides "
            f"{gpus_per_node} and put the rest into ring"
        )
    dp = world // c.group
    if dp == 1:
        reasons.append(f"dp=1: all {world} GPUs work on one video")
    else:
        size = f"sp={sp}" if c.cfg == 1 else f"cfg * sp={c.group}"
        reasons.append(f"dp={dp}: the {world} GPUs make {dp} videos at a time ({world} / {size})")
    return reasons


def _cfg_reasons(c: _Candidate, batch: int, cfg_set: bool) -> list[str]:
    how = "set explicitly (parallel.cfg)" if cfg_set else "auto"
    if c.cfg == 2 and batch == 1:
        return [
            "warning: cfg=2 without true CFG (sampling.cfg_scale <= 1): both halves of the group compute "
            "the same video; use parallel.cfg=auto"
        ]
    if c.cfg == 2:
        return [
            f"cfg=2 ({how}): the unconditional and conditional branches run on two halves of the "
            f"{c.group} GPUs, one velocity exchange per step"
        ]
    if batch == 2 and not cfg_set and c.group > 1:
        return [
            f"cfg=1: the settings allow no split of the {c.group} GPUs into two CFG halves; both "
            "branches run as one batch"
        ]
    return []


def _candidates(
    model: ModelSize, world: int, gpus_per_node: int, degrees: tuple[int | None, ...], batch: int,
    estimate: functools.partial[MemoryEstimate],
) -> list[_Candidate]:  # fmt: skip
    """Every layout the settings allow, smallest group first; for one group size, cfg 2 first."""
    cfg, ulysses, ring = degrees
    cfgs = [cfg] if cfg is not None else ([2, 1] if batch == 2 else [1])
    candidates = []
    for c in cfgs:
        if world % c:
            continue
        for u, r in _layouts(world // c, model.num_heads, gpus_per_node, ulysses, ring):
            memory = estimate(ulysses=u, ring=r, batch=max(1, batch // c))
            candidates.append(_Candidate(u, r, memory, c))
    return sorted(candidates, key=lambda c: (c.group, -c.cfg))


def plan_parallel(
    model: ModelSize,
    *,
    image_tokens: int,
    text_tokens: int = DEFAULT_TEXT_TOKENS,
    gpus_per_node: int = 8,
    num_nodes: int = 1,
    gpu_memory_gib: float = 80.0,
    mode: str = "throughput",
    ulysses: int | None = None,
    ring: int | None = None,
    batch: int = 1,
    components: ComponentMemory | None = None,
    cfg: int | None = None,
) -> ParallelPlan:
    """Choose `dp x cfg x ulysses x ring` for `gpus_per_node * num_nodes` GPUs (rules: module docstring).

    `cfg` / `ulysses` / `ring` None means auto. `batch` is 2 with true CFG (both branches in one
    forward, or one branch per half of the group with cfg 2).
    Raises ValueError for inconsistent settings (naming every factor) and, with no explicit degree,
    when no layout fits (saying what to change).
    """
    minimums: dict[str, tuple[float, float]] = {"slurm.gpus_per_node": (gpus_per_node, 1)}
    minimums |= {"slurm.nodes": (num_nodes, 1), "parallel.gpu_memory_gib": (gpu_memory_gib, 0.001)}
    minimums |= {"image_tokens": (image_tokens, 1), "text_tokens": (text_tokens, 0), "batch": (batch, 1)}
    _check_inputs(mode, minimums)
    world = gpus_per_node * num_nodes
    explicit = ulysses is not None or ring is not None
    estimate = functools.partial(
        estimate_memory, model, image_tokens=image_tokens, text_tokens=text_tokens, components=components
    )
    positive = all(d is None or d >= 1 for d in (cfg, ulysses, ring))
    degrees = (cfg, ulysses, ring)
    candidates = _candidates(model, world, gpus_per_node, degrees, batch, estimate) if positive else []
    if explicit or cfg is not None:  # refuse bad explicit degrees with ParallelDims' message (every factor)
        first = candidates[0] if candidates else None
        c = first.cfg if first else (1 if cfg is None else cfg)
        u = first.ulysses if first else (1 if ulysses is None else ulysses)
        r = first.ring if first else (1 if ring is None else ring)
        dims = ParallelDims(max(1, world // max(1, c * u * r)), u, r, world, cfg=c)
        _validate(dims, model.num_heads, gpus_per_node, num_nodes)
    if mode == "throughput":
        chosen, reasons = _pick_throughput(candidates, gpu_memory_gib, explicit, world)
    else:
        chosen, reasons = _pick_latency(candidates, gpu_memory_gib, explicit, gpus_per_node, world)
    reasons += _cfg_reasons(chosen, batch, cfg is not None)
    reasons += _layout_reasons(
        chosen, model.num_heads, gpus_per_node, world, (ulysses is not None, ring is not None)
    )
    reasons.sort(key=lambda s: not s.startswith("warning:"))
    plan = ParallelPlan(
        dp=world // chosen.group,
        ulysses=chosen.ulysses,
        ring=chosen.ring,
        mode=mode,
        memory=chosen.memory,
        reasons=tuple(reasons),
        gpus_per_node=gpus_per_node,
        num_nodes=num_nodes,
        gpu_memory_gib=gpu_memory_gib,
        model=model.describe(),
        cfg=chosen.cfg,
        encoders=components.encoder_words if components is not None else "",
    )
    _validate(plan.dims(), model.num_heads, gpus_per_node, num_nodes)
    return plan


def format_plan(plan: ParallelPlan) -> str:
    """The text `hvbatch plan` prints: layout, per-GPU memory breakdown, reasons."""
    m = plan.memory
    nodes = f"{plan.num_nodes} node{'s' if plan.num_nodes > 1 else ''}"
    rows = [
        ("transformer weights", m.transformer_weights_gib, plan.model),
        ("text encoders", m.text_encoders_gib, plan.encoders),
        ("VAE weights", m.vae_weights_gib, ""),
        ("activations", m.activations_gib, f"{m.tokens_per_rank:,} tokens per GPU"),
        *(
            [("FP8 temporaries", m.fp8_temporaries_gib, "quantized GEMM inputs")]
            if m.fp8_temporaries_gib
            else []
        ),
        ("VAE decode peak", m.vae_decode_gib, "tiled"),
        ("safety margin", m.margin_gib, f"{SAFETY_MARGIN:.0%}"),
    ]
    cfg = f" x cfg {plan.cfg}" if plan.cfg > 1 else ""
    lines = [
        f"layout: dp {plan.dp}{cfg} x ulysses {plan.ulysses} x ring {plan.ring}  "
        f"({plan.mode}; {plan.world_size} GPUs = {nodes} x {plan.gpus_per_node}, {plan.group} per video)",
        "memory per GPU (estimate):",
        *(
            f"  {name:<20} {gib:6.1f} GiB" + (f"  ({note})" if note and gib else "")
            for name, gib, note in rows
        ),
        f"  {'total':<20} {m.total_gib:6.1f} GiB  of {plan.gpu_memory_gib:g} GiB"
        + ("" if m.fits(plan.gpu_memory_gib) else "  (DOES NOT FIT)"),
        "why:",
        *(f"  - {reason}" for reason in plan.reasons),
    ]
    return "\n".join(lines)
