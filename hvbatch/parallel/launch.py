"""Process start-up: rank and world from torchrun's or Slurm's environment, or N local processes.

- torchrun (and submitit, which sets the same variables): RANK, WORLD_SIZE, LOCAL_RANK,
  MASTER_ADDR, MASTER_PORT.
- srun: SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID; MASTER_ADDR defaults to the first host of
  SLURM_JOB_NODELIST and MASTER_PORT to a port derived from the job id.
- `spawn_local(n, fn, ...)`: n processes on this machine (what `hvbatch generate --nproc n` uses).

GPUs are taken as Slurm and torchrun hand them out: CUDA_VISIBLE_DEVICES is never rewritten (CUDA
may already be initialised, and then a change is silently ignored). A rank that sees one GPU uses
it; a rank that sees at least one GPU per rank on its node uses the one of its local rank
(`cuda_device_index`). `torch.cuda.set_device` runs before the process group is created.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hvbatch.config import ParallelConfig
from hvbatch.parallel import ports
from hvbatch.parallel.ports import free_local_port as free_local_port
from hvbatch.parallel.store import exit_unless_done_within

RENDEZVOUS_GRACE, RENDEZVOUS_EXTRA_S = 1.2, 5.0  # torch's own timeout error comes first when it can


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int


def _int(environ: Mapping[str, str], name: str) -> int:
    try:
        return int(environ[name])
    except ValueError as err:
        raise ValueError(f"environment variable {name}={environ[name]!r} is not an integer") from err


def _first_slurm_host(nodelist: str) -> str:
    try:
        hosts = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout.split()
    except (OSError, subprocess.SubprocessError) as err:
        raise ValueError(
            f"cannot expand SLURM_JOB_NODELIST={nodelist!r} with scontrol ({err}); set MASTER_ADDR"
        ) from err
    return hosts[0]


def dist_env_from(environ: Mapping[str, str]) -> DistEnv | None:
    """The distributed set-up described by the environment, or None for a single process."""
    if "RANK" in environ and "WORLD_SIZE" in environ:
        world = _int(environ, "WORLD_SIZE")
        missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if name not in environ]
        if world > 1 and missing:
            raise ValueError(f"RANK and WORLD_SIZE are set but {', '.join(missing)} is not")
        return DistEnv(
            rank=_int(environ, "RANK"),
            world_size=world,
            local_rank=_int(environ, "LOCAL_RANK") if "LOCAL_RANK" in environ else 0,
            local_world_size=_int(environ, "LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in environ else world,
            master_addr=environ.get("MASTER_ADDR", "127.0.0.1"),
            master_port=_int(environ, "MASTER_PORT") if "MASTER_PORT" in environ else 29500,
        )
    if "SLURM_PROCID" in environ and _int(environ, "SLURM_NTASKS") > 1:
        job_id = _int(environ, "SLURM_JOB_ID") if "SLURM_JOB_ID" in environ else 0
        addr = environ.get("MASTER_ADDR") or _first_slurm_host(environ["SLURM_JOB_NODELIST"])
        return DistEnv(
            rank=_int(environ, "SLURM_PROCID"),
            world_size=_int(environ, "SLURM_NTASKS"),
            local_rank=_int(environ, "SLURM_LOCALID"),
            local_world_size=_slurm_tasks_on_this_node(environ),
            master_addr=addr,
            master_port=_int(environ, "MASTER_PORT") if "MASTER_PORT" in environ else 20000 + job_id % 20000,
        )
    return None


def _slurm_tasks_on_this_node(environ: Mapping[str, str]) -> int:
    """Tasks on this node: SLURM_NTASKS_PER_NODE, else this node's entry of the step's (or job's)
    tasks-per-node list (`8(x2),4`: 8 on nodes 0 and 1, 4 on node 2), else SLURM_NTASKS."""
    if environ.get("SLURM_NTASKS_PER_NODE", "").isdigit():
        return _int(environ, "SLURM_NTASKS_PER_NODE")
    node = _int(environ, "SLURM_NODEID") if environ.get("SLURM_NODEID", "").isdigit() else 0
    for name in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
        counts: list[int] = []
        for part in environ.get(name, "").split(","):
            match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
            if match is None:
                counts = []
                break
            counts += [int(match.group(1))] * int(match.group(2) or 1)
        if node < len(counts):
            return counts[node]
    return _int(environ, "SLURM_NTASKS")


def cuda_device_index(
    local_rank: int, local_world_size: int, num_visible: int, visible_devices: str | None = None
) -> int:
    """Which of the visible CUDA devices the rank `local_rank` of `local_world_size` on a node uses.

    - One visible GPU: index 0. Slurm bound one GPU to each task (`--gpus-per-task=1`), or each
      process got its own CUDA_VISIBLE_DEVICES (torchrun wrappers, the local executor).
    - At least one visible GPU per rank on the node: index `local_rank`. torchrun, or Slurm giving
      every task all of the node's GPUs (`--gpus-per-node=8 --gpu-bind=none`).
    - Otherwise no binding works (e.g. 3 GPUs visible to each of 8 tasks): a ValueError that says
      what was visible, what was needed and which Slurm options fix it. `visible_devices` (the
      value of CUDA_VISIBLE_DEVICES) is only quoted in that message.
    """
    if not 0 <= local_rank < local_world_size:
        raise ValueError(
            f"local rank {local_rank} is outside 0..{local_world_size - 1} (ranks on this node): "
            "check LOCAL_RANK / LOCAL_WORLD_SIZE or SLURM_LOCALID / SLURM_NTASKS_PER_NODE"
        )
    if num_visible == 1:
        return 0
    if num_visible >= local_world_size:
        return local_rank
    shown = "unset" if visible_devices is None else repr(visible_devices)
    raise ValueError(
        f"local rank {local_rank} of {local_world_size} ranks on this node needs a GPU, but this process "
        f"sees {num_visible} (CUDA_VISIBLE_DEVICES={shown}): it needs exactly 1 visible GPU (its own) or "
        f"at least {local_world_size} (one per rank on the node). Under Slurm give each task its own GPU "
        f"with `--gpus-per-task=1`, or every task all of them with `--gpus-per-node={local_world_size} "
        f"--gpu-bind=none`; under torchrun leave at least {local_world_size} GPUs in CUDA_VISIBLE_DEVICES"
    )


def rank_device(env: DistEnv | None, requested: str) -> torch.device:
    """This rank's device: CUDA when requested (or `auto` and available), else the CPU.

    With several ranks the GPU is chosen by `cuda_device_index` from the local rank and the number
    of visible GPUs; a single process takes `cuda:N` as given, else the first visible GPU.
    """
    use_cuda = requested.startswith("cuda") or (requested == "auto" and torch.cuda.is_available())
    if not use_cuda:
        return torch.device("cpu")
    num_visible = torch.cuda.device_count()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        index = cuda_device_index(env.local_rank, env.local_world_size, num_visible, visible)
        return torch.device("cuda", index)
    index = int(requested.split(":", 1)[1]) if requested.startswith("cuda:") else 0
    if not 0 <= index < num_visible:
        shown = "unset" if visible is None else repr(visible)
        valid = f"cuda:N with N in 0..{num_visible - 1}" if num_visible else "a machine with a GPU"
        raise ValueError(
            f"device={requested!r} but this process sees {num_visible} GPU(s) (CUDA_VISIBLE_DEVICES="
            f"{shown}): use device=cpu, or {valid}"
        )
    return torch.device("cuda", index)


def export_submitit_environment() -> DistEnv | None:
    """Under a submitit job, publish RANK / WORLD_SIZE / LOCAL_RANK / MASTER_* for `dist_env_from`.

    Use instead of `submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=
    ...)`: CUDA_VISIBLE_DEVICES is left as Slurm set it (`rank_device` picks the GPU from it), since
    rewriting it breaks one-GPU-per-task bindings and is ignored once CUDA is initialised; and a
    MASTER_ADDR / MASTER_PORT the job already has is kept (submitit's export refuses to run then).
    Does nothing where RANK is already set (torchrun, the local executor's ranks) or outside
    submitit. Returns the resulting environment (None for a single process).
    """
    if "RANK" not in os.environ and "SUBMITIT_EXECUTOR" in os.environ:
        import submitit

        job = submitit.helpers.TorchDistributedEnvironment()
        os.environ.setdefault("MASTER_ADDR", job.master_addr)
        os.environ.setdefault("MASTER_PORT", str(job.master_port))
        os.environ.update(
            RANK=str(job.rank),
            WORLD_SIZE=str(job.world_size),
            LOCAL_RANK=str(job.local_rank),
            LOCAL_WORLD_SIZE=str(job.local_world_size),
        )
    return dist_env_from(os.environ)


def init_distributed(
    env: DistEnv,
    device: torch.device,
    *,
    backend: str = "auto",
    timeout_s: float = 600.0,
    nccl_env: Mapping[str, str] | None = None,
) -> None:
    """`init_process_group` (NCCL for CUDA devices, gloo for the CPU, unless `backend` says otherwise).

    NCCL gets `device_id`: the world communicator is created here, eagerly (not inside the first
    collective, whose timeout would then absorb it), and every later group is split from it
    (`ncclCommSplit`) instead of bootstrapping its own. `nccl_env` values are exported first,
    except names the environment already sets.
    """
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    for name, value in (nccl_env or {}).items():
        os.environ.setdefault(name, str(value))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // env.local_world_size))
    # The rendezvous talks to rank 0's TCPStore inside torch, where a stopped rank 0 blocks it past
    # `timeout_s`: the process ends if torch has neither returned nor raised by a later deadline.
    where = f"rank {env.rank}: the rendezvous with rank 0 at {env.master_addr}:{env.master_port}"
    with exit_unless_done_within(timeout_s * RENDEZVOUS_GRACE + RENDEZVOUS_EXTRA_S, where):
        dist.init_process_group(
            backend,
            init_method=f"tcp://{env.master_addr}:{env.master_port}",
            rank=env.rank,
            world_size=env.world_size,
            timeout=timedelta(seconds=timeout_s),
            device_id=device if backend == "nccl" and device.type == "cuda" else None,
        )


@dataclass(frozen=True)
class RankSetup:
    env: DistEnv | None
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.env is not None and self.env.world_size > 1

    @property
    def rank(self) -> int:
        return self.env.rank if self.env else 0


def setup_rank(parallel: ParallelConfig, device: str) -> RankSetup:
    """This process's rank, device and (when there are several ranks) its process group."""
    env = dist_env_from(os.environ)
    setup = RankSetup(env, rank_device(env, device))
    if setup.device.type == "cuda":
        torch.cuda.set_device(setup.device)  # before NCCL, which binds to the current device
    if setup.distributed:
        assert env is not None
        init_distributed(
            env,
            setup.device,
            backend=parallel.backend,
            timeout_s=parallel.timeout_s,
            nccl_env=parallel.nccl_env,
        )
    return setup


def teardown_rank(setup: RankSetup) -> None:
    if setup.distributed and dist.is_initialized():
        dist.destroy_process_group()


def _spawned_entry(
    local_rank: int, nproc: int, port: int, fn: Callable[..., None], args: tuple[Any, ...]
) -> None:
    os.environ.update(
        RANK=str(local_rank),
        WORLD_SIZE=str(nproc),
        LOCAL_RANK=str(local_rank),
        LOCAL_WORLD_SIZE=str(nproc),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    fn(*args)


def spawn_local(nproc: int, fn: Callable[..., None], *args: Any) -> None:
    """Run `fn(*args)` in `nproc` fresh processes with the torchrun environment set; re-raises a failure."""
    if nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {nproc}")
    mp.spawn(_spawned_entry, args=(nproc, ports.free_local_port(), fn, args), nprocs=nproc, join=True)
