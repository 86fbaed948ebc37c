"""All parallel sizes in one place, validated once, and the process groups they imply.

Rank layout (dp outermost, then cfg, then ring, Ulysses innermost),
`rank = ((dp_index * cfg + cfg_index) * ring + ring_index) * ulysses + ulysses_index`:
- a Ulysses group is `ulysses` contiguous ranks (inside a node: all-to-all wants NVLink);
- a ring group is the `ring` ranks of one sequence-parallel block strided by `ulysses` (it may
  cross nodes: ring traffic is point-to-point and overlaps compute);
- a sequence-parallel (SP) block is `ulysses * ring` contiguous ranks running one CFG branch;
- a cfg group is the `cfg` ranks of one video at the same SP position, strided by `ulysses * ring`:
  with `cfg` 2 the two SP blocks of a video run the unconditional and the conditional branch and
  exchange their velocities once per step (the least traffic of any axis, so it may cross nodes);
- a video block is `cfg * ulysses * ring` contiguous ranks working on one video;
- dp blocks work on different prompts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch.distributed is imported where groups are made: the planner needs no torch
    import torch.distributed as dist


@dataclass(frozen=True)
class ParallelDims:
    dp: int
    ulysses: int
    ring: int
    world_size: int
    cfg: int = 1
    """Classifier-free-guidance parallelism: 2 runs the two CFG branches on two SP blocks, else 1."""

    @property
    def sp(self) -> int:
        return self.ulysses * self.ring

    @property
    def video(self) -> int:
        """Ranks working on one video: cfg * ulysses * ring."""
        return self.cfg * self.sp

    def validate(self, num_heads: int, cfg_scale: float | None = None) -> None:
        """Raise ValueError naming every factor when the sizes do not fit the world or the model.

        `cfg_scale` (when given) must be > 1 for cfg 2: without CFG there is no second branch.
        """
        problems = []
        for name in ("dp", "ulysses", "ring", "cfg"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.cfg > 2:
            problems.append(f"cfg({self.cfg}) must be 1 or 2 (the two CFG branches)")
        if self.cfg == 2 and cfg_scale is not None and cfg_scale <= 1:
            problems.append(
                f"cfg({self.cfg}) needs two CFG branches, but sampling.cfg_scale({cfg_scale:g}) <= 1 "
                "runs one; use parallel.cfg=1 (or auto) or sampling.cfg_scale > 1"
            )
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

    def coordinates(self, rank: int) -> tuple[int, int, int, int]:
        """`(dp_index, cfg_index, ring_index, ulysses_index)` of a global rank."""
        return (
            rank // self.video,
            (rank % self.video) // self.sp,
            (rank % self.sp) // self.ulysses,
            rank % self.ulysses,
        )

    def ulysses_ranks(self, rank: int) -> list[int]:
        start = rank - rank % self.ulysses
        return list(range(start, start + self.ulysses))

    def ring_ranks(self, rank: int) -> list[int]:
        block_start = rank - rank % self.sp
        return [block_start + rank % self.ulysses + i * self.ulysses for i in range(self.ring)]

    def sp_ranks(self, rank: int) -> list[int]:
        start = rank - rank % self.sp
        return list(range(start, start + self.sp))

    def cfg_ranks(self, rank: int) -> list[int]:
        video_start = rank - rank % self.video
        return [video_start + rank % self.sp + i * self.sp for i in range(self.cfg)]

    def video_ranks(self, rank: int) -> list[int]:
        start = rank - rank % self.video
        return list(range(start, start + self.video))


@dataclass(frozen=True)
class ParallelGroups:
    """This rank's process groups (passed explicitly; never stored in module globals).

    A group is None where its axis has one rank (no collective runs over it), and the default
    (world) group where it spans every rank.
    """

    dims: ParallelDims
    rank: int
    ulysses: dist.ProcessGroup | None
    ring: dist.ProcessGroup | None
    sp: dist.ProcessGroup | None
    ulysses_ranks: list[int]
    ring_ranks: list[int]
    sp_ranks: list[int]
    cfg: dist.ProcessGroup | None = None
    cfg_ranks: list[int] = field(default_factory=list)
    video: dist.ProcessGroup | None = None
    """The ranks of this rank's video (cfg x SP block): the parallel VAE decode sends within it."""

    @property
    def sp_index(self) -> int:
        """Position of this rank's token shard in the video's token sequence."""
        return self.sp_ranks.index(self.rank)

    @property
    def dp_index(self) -> int:
        return self.dims.coordinates(self.rank)[0]

    @property
    def cfg_index(self) -> int:
        """The CFG branch this rank's SP block runs (0 unconditional, 1 conditional; 0 with cfg 1)."""
        return self.dims.coordinates(self.rank)[1]

    @property
    def video_ranks(self) -> list[int]:
        """Every rank working on this rank's video (cfg x SP block): the ranks that must agree on it."""
        return self.dims.video_ranks(self.rank)

    @property
    def is_sp_leader(self) -> bool:
        """True for exactly one rank per video: the one that decodes and writes it."""
        return self.rank == self.video_ranks[0]


def layout_blocks(dims: ParallelDims) -> dict[str, list[tuple[int, ...]]]:
    """Every group of a layout, by axis: the member sets, sorted (the order all ranks create them in)."""
    ranks = range(dims.world_size)
    return {
        "ulysses": sorted({tuple(dims.ulysses_ranks(r)) for r in ranks}),
        "ring": sorted({tuple(dims.ring_ranks(r)) for r in ranks}),
        "sp": sorted({tuple(dims.sp_ranks(r)) for r in ranks}),
        "cfg": sorted({tuple(dims.cfg_ranks(r)) for r in ranks}),
        "video": sorted({tuple(dims.video_ranks(r)) for r in ranks}),
    }


class ProcessGroups:
    """The job's process groups, made once per member set and shared by every layout and axis that
    has those members (at ulysses 8 on 8 GPUs the Ulysses, SP and video groups are all the world).

    A one-rank set gets no group (None) and the full world the default group: only the other sets
    become communicators, each created the first time a layout needs it and reused by every later
    shard. All ranks must ask for the same layouts in the same order (as the shards of a job do):
    `torch.distributed.new_group` is collective over the world. `new_group` and `world_group` (the
    default group's stand-in) are injectable for tests.
    """

    def __init__(
        self,
        world_size: int,
        rank: int,
        timeout: timedelta | None = None,
        new_group: Callable[..., dist.ProcessGroup] | None = None,
        world_group: dist.ProcessGroup | None = None,
    ) -> None:
        self.world_size, self.rank, self.timeout = world_size, rank, timeout
        self._new_group, self._world_group = new_group, world_group
        self._made: dict[tuple[int, ...], dist.ProcessGroup] = {}

    @property
    def created(self) -> int:
        """Groups (communicators, on NCCL) this object has created, besides the default group."""
        return len(self._made)

    def group(self, members: tuple[int, ...]) -> dist.ProcessGroup | None:
        if len(members) == 1:
            return None
        if len(members) == self.world_size:
            if self._world_group is not None:
                return self._world_group
            import torch.distributed as dist

            return dist.group.WORLD
        if members not in self._made:
            new_group = self._new_group
            if new_group is None:
                import torch.distributed as dist

                new_group = dist.new_group
            self._made[members] = new_group(list(members), timeout=self.timeout)
        return self._made[members]

    def for_layout(self, dims: ParallelDims) -> ParallelGroups:
        """This rank's groups of `dims` (every rank calls it, with the same layouts, in the same order)."""
        assert dims.world_size == self.world_size, "a layout of another world"
        mine: dict[str, dist.ProcessGroup | None] = {}
        for kind, members_list in layout_blocks(dims).items():
            for members in members_list:
                group = self.group(members)
                if self.rank in members:
                    mine[kind] = group
        rank = self.rank
        return ParallelGroups(
            dims=dims,
            rank=rank,
            ulysses=mine["ulysses"],
            ring=mine["ring"],
            sp=mine["sp"],
            ulysses_ranks=dims.ulysses_ranks(rank),
            ring_ranks=dims.ring_ranks(rank),
            sp_ranks=dims.sp_ranks(rank),
            cfg=mine["cfg"],
            cfg_ranks=dims.cfg_ranks(rank),
            video=mine["video"],
        )

    def destroy(self) -> None:
        """Destroy the groups this object made (at the end of the job; the default group stays)."""
        import torch.distributed as dist

        for group in self._made.values():
            if group != dist.GroupMember.NON_GROUP_MEMBER:
                dist.destroy_process_group(group)
        self._made.clear()


def build_groups(dims: ParallelDims, rank: int, timeout: timedelta | None = None) -> ParallelGroups:
    """The groups of one layout (all ranks must call this, in the same order), for a process that
    uses one layout; a job with several shares a `ProcessGroups`.

    `timeout` bounds every collective of the groups; pass the job's (new groups do not inherit the
    default group's timeout).
    """
    return ProcessGroups(dims.world_size, rank, timeout).for_layout(dims)


def destroy_groups(groups: ParallelGroups) -> None:
    """Destroy the groups `build_groups` made for this rank (a job keeps its `ProcessGroups` instead);
    the default group stays."""
    import torch.distributed as dist

    made = (groups.ulysses, groups.ring, groups.sp, groups.cfg, groups.video)
    for group in {id(g): g for g in made if g is not None}.values():
        if group is not dist.group.WORLD and group != dist.GroupMember.NON_GROUP_MEMBER:
            dist.destroy_process_group(group)
