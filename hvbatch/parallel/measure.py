"""Counting FLOPs of a forward, CPU fused attention included (for tests and benchmarks)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode, flop_registry, register_flop_formula, sdpa_flop_count


def _register_cpu_attention_flops() -> None:
    """PyTorch's counter knows the CUDA SDPA kernels but not the CPU one; teach it once."""
    cpu_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    if cpu_flash in flop_registry:
        return

    @register_flop_formula(cpu_flash)
    def _cpu_flash_flops(
        query: Any, key: Any, value: Any, *args: Any, out_val: Any = None, **kwargs: Any
    ) -> int:
        return sdpa_flop_count(query, key, value)  # the registry passes shapes


def count_flops(fn: Callable[[], Any]) -> tuple[int, Any]:
    """`(total FLOPs, result)` of calling `fn()` under no_grad."""
    _register_cpu_attention_flops()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        result = fn()
    return counter.get_total_flops(), result
