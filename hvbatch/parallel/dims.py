"""All parallel sizes in one place, validated once, and the process groups they imply.

Rank layout (dp outermost, Ulysses innermost),
`rank = (dp_index * ring + ring_index) * ulysses + ulysses_index`:
- a Ulysses group is `ulysses` contiguous ranks (inside a node: all-to-all wants NVLink);
- a ring group is the `ring` ranks of one sequence-parallel block strided by `ulysses` (it may
  cross nodes: ring traffic is point-to-point and overlaps compute);
- a sequence-parallel (SP) block is `ulysses * ring` contiguous ranks working on one video;
- dp blocks work on different prompts.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist


@dataclass(frozen=True)
class ParallelDims:
    dp: int
    ulysses: int
    ring: int
    world_size: int
    cfg: int = 1
    """Reserved for classifier-free-guidance parallelism; only 1 is supported."""

    @property
    def sp(self) -> int:
        return self.ulysses * self.ring

    def validate(self, num_heads: int) -> None:
        """Raise ValueError naming every factor when the sizes do not fit the world or the model."""
        problems = []
        for name in ("dp", "ulysses", "ring", "cfg"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.cfg != 1:
            problems.append(f"cfg({self.cfg}) parallelism is not supported yet; use cfg=1")
        product = self.dp * self.cfg * self.ulysses * self.ring
        if product != self.world_size:
            problems.append(
                f"dp({self.dp}) * cfg({self.cfg}) * ulysses({self.ulysses}) * ring({self.ring}) = {product} "
                f"!= WORLD_SIZE({self.world_size})"
            )
        if self.ulysses >= 1 and num_heads % self.ulysses:
            divisors = [d for d in range(1, num_heads + 1) if num_heads % d == 0]
            problems.append(
                f"ulysses({self.ulysses}) must divide the model's {num_heads} attention heads "
                f"(valid: {divisors}); put the remaining factor into ring"
            )
        if problems:
            raise ValueError("invalid parallel layout: " + "; ".join(problems))

    def coordinates(self, rank: int) -> tuple[int, int, int]:
        """`(dp_index, ring_index, ulysses_index)` of a global rank."""
        return rank // self.sp, (rank % self.sp) // self.ulysses, rank % self.ulysses

    def ulysses_ranks(self, rank: int) -> list[int]:
        start = rank - rank % self.ulysses
        return list(range(start, start + self.ulysses))

    def ring_ranks(self, rank: int) -> list[int]:
        block_start = rank - rank % self.sp
        return [block_start + rank % self.ulysses + i * self.ulysses for i in range(self.ring)]

    def sp_ranks(self, rank: int) -> list[int]:
        start = rank - rank % self.sp
        return list(range(start, start + self.sp))


@dataclass(frozen=True)
class ParallelGroups:
    """This rank's process groups (passed explicitly; never stored in module globals)."""

    dims: ParallelDims
    rank: int
    ulysses: dist.ProcessGroup | None
    ring: dist.ProcessGroup | None
    sp: dist.ProcessGroup | None
    ulysses_ranks: list[int]
    ring_ranks: list[int]
    sp_ranks: list[int]

    @property
    def sp_index(self) -> int:
        """Position of this rank's token shard in the video's token sequence."""
        return self.sp_ranks.index(self.rank)

    @property
    def dp_index(self) -> int:
        return self.dims.coordinates(self.rank)[0]

    @property
    def is_sp_leader(self) -> bool:
        return self.sp_index == 0


def build_groups(dims: ParallelDims, rank: int, timeout: timedelta | None = None) -> ParallelGroups:
    """Create every Ulysses, ring and SP group (all ranks must call this, in the same order).

    `timeout` bounds every collective of the groups; pass the job's (new groups do not inherit the
    default group's timeout).
    """
    made: dict[str, dist.ProcessGroup | None] = {"ulysses": None, "ring": None, "sp": None}
    blocks = {
        "ulysses": sorted({tuple(dims.ulysses_ranks(r)) for r in range(dims.world_size)}),
        "ring": sorted({tuple(dims.ring_ranks(r)) for r in range(dims.world_size)}),
        "sp": sorted({tuple(dims.sp_ranks(r)) for r in range(dims.world_size)}),
    }
    for kind, members_list in blocks.items():
        for members in members_list:
            group = dist.new_group(list(members), timeout=timeout) if dims.world_size > 1 else None
            if rank in members:
                made[kind] = group
    return ParallelGroups(
        dims=dims,
        rank=rank,
        ulysses=made["ulysses"],
        ring=made["ring"],
        sp=made["sp"],
        ulysses_ranks=dims.ulysses_ranks(rank),
        ring_ranks=dims.ring_ranks(rank),
        sp_ranks=dims.sp_ranks(rank),
    )


def destroy_groups(groups: ParallelGroups) -> None:
    """Destroy the groups `build_groups` made for this rank (before groups of another layout)."""
    if groups.dims.world_size == 1:
        return
    for group in {id(g): g for g in (groups.ulysses, groups.ring, groups.sp) if g is not None}.values():
        if group != dist.GroupMember.NON_GROUP_MEMBER:
            dist.destroy_process_group(group)
