"""Where the bytes of a collective travel: device memory, or host memory for gloo with CUDA tensors.

NCCL takes CUDA tensors. gloo takes host tensors: its point-to-point ops read the pointer as host
memory, so a CUDA tensor must be staged through the host. With `parallel.backend=gloo` on GPUs
(and in `benchmarks/gpu_check.py`, which runs several ranks on one GPU with gloo for the
collectives and CUDA for the compute) every transfer of the sequence-parallel code goes through
`to_wire` before the collective and `from_wire` after it; elsewhere both are the identity.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def staged(tensor: torch.Tensor, group: dist.ProcessGroup | None) -> bool:
    """Whether `tensor` must travel through host memory over `group`."""
    return tensor.device.type != "cpu" and dist.get_backend(group) == "gloo"


def to_wire(tensor: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """The tensor a collective over `group` sends (and whose `empty_like` it receives into)."""
    return tensor.cpu() if staged(tensor, group) else tensor


def from_wire(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A received tensor on the device the computation runs on."""
    return tensor if tensor.device == device else tensor.to(device, non_blocking=False)
