"""Process start-up: rank and world from torchrun's or Slurm's environment, or N local processes.

- torchrun (and submitit, which sets the same variables): RANK, WORLD_SIZE, LOCAL_RANK,
  MASTER_ADDR, MASTER_PORT.
- srun: SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID; MASTER_ADDR defaults to the first host of
  SLURM_JOB_NODELIST and MASTER_PORT to a port derived from the job id.
- `spawn_local(n, fn, ...)`: n processes on this machine (what `hvbatch generate --nproc n` uses).
"""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hvbatch.config import ParallelConfig


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
            local_world_size=_int(environ, "SLURM_NTASKS_PER_NODE")
            if environ.get("SLURM_NTASKS_PER_NODE", "").isdigit()
            else _int(environ, "SLURM_NTASKS"),
            master_addr=addr,
            master_port=_int(environ, "MASTER_PORT") if "MASTER_PORT" in environ else 20000 + job_id % 20000,
        )
    return None


def rank_device(env: DistEnv | None, requested: str) -> torch.device:
    """`cuda:<local rank>` when CUDA is requested (or `auto` and available), else the CPU."""
    use_cuda = requested.startswith("cuda") or (requested == "auto" and torch.cuda.is_available())
    if not use_cuda:
        return torch.device("cpu")
    if env is None:
        return torch.device(requested if requested.startswith("cuda") else "cuda")
    return torch.device("cuda", env.local_rank)


def init_distributed(
    env: DistEnv,
    device: torch.device,
    *,
    backend: str = "auto",
    timeout_s: float = 600.0,
    nccl_env: Mapping[str, str] | None = None,
) -> None:
    """`init_process_group` (NCCL for CUDA devices, gloo for the CPU, unless `backend` says otherwise).

    `nccl_env` values are exported first, except names the environment already sets.
    """
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    for name, value in (nccl_env or {}).items():
        os.environ.setdefault(name, str(value))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // env.local_world_size))
    dist.init_process_group(
        backend,
        init_method=f"tcp://{env.master_addr}:{env.master_port}",
        rank=env.rank,
        world_size=env.world_size,
        timeout=timedelta(seconds=timeout_s),
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


def free_local_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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
    mp.spawn(_spawned_entry, args=(nproc, free_local_port(), fn, args), nprocs=nproc, join=True)
