"""Attention kernels behind the one entry point, and the rule that picks one per device.

Shapes: B batch, H heads, L query tokens, S key tokens, D head dim. Every backend takes
`[B, H, L, D]` / `[B, H, S, D]` and returns `[B, H, L, D]`; `attention_with_lse` also returns the
log-sum-exp of each query row as `[B, H, L]` float32 (natural log), whatever layout the kernel
gives it in (cuDNN: `[B, H, L, 1]`; memory-efficient: `L` padded to a multiple of 32).

Backends (config key `model.attention`):
- `default`: `scaled_dot_product_attention` left to torch's own dispatch;
- `cudnn`, `flash`, `efficient`, `math`: one SDPA kernel first, torch's others after it as the
  fallback (`sdpa_kernel(..., set_priority=True)`), so a shape the kernel cannot serve still runs;
- `fa3` (`flash_attn_interface`, FlashAttention-3, Hopper), `fa4` (`flash_attn.cute`,
  FlashAttention-4, Hopper/Blackwell), `sage` (`sageattention`, INT8 QK / FP8 PV: the FP8
  attention option, lossy, never chosen by `auto`). Optional extras; used only when installed.
- `auto`: Hopper (sm90) FA3 if installed, else cuDNN; Blackwell (sm100+) FA4 if installed, else
  cuDNN; Ampere/Ada (sm8x) flash; older GPUs and float32 memory-efficient; CPU the default.
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKEND_CHOICES = ("auto", "default", "cudnn", "flash", "efficient", "math", "fa3", "fa4", "sage")
EXTERNAL_MODULES = {"fa3": "flash_attn_interface", "fa4": "flash_attn.cute", "sage": "sageattention"}
INSTALL_HINTS = {
    "fa3": "build FlashAttention-3 from flash-attention/hopper (no PyPI wheel)",
    "fa4": "pip install 'hvbatch[fa4]'",
    "sage": "pip install 'hvbatch[sage]'",
}
_SDPA_KINDS = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}
_HALF = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class DeviceInfo:
    """What the choice depends on: device type, CUDA capability, importable external kernels."""

    type: str
    capability: tuple[int, int] | None = None
    installed: frozenset[str] = frozenset()


@functools.cache
def installed_kernels() -> frozenset[str]:
    """The external attention kernels that import in this environment."""
    found = set()
    for name, module in EXTERNAL_MODULES.items():
        try:
            importlib.import_module(module)
        except Exception:
            continue
        found.add(name)
    return frozenset(found)


def device_info(device: torch.device | str) -> DeviceInfo:
    device = torch.device(device)
    if device.type != "cuda":
        return DeviceInfo(device.type)
    return DeviceInfo("cuda", torch.cuda.get_device_capability(device), installed_kernels())


def cannot_serve(name: str, info: DeviceInfo, dtype: torch.dtype, head_dim: int) -> str | None:
    """Why backend `name` cannot run on `info` with `dtype` and `head_dim` (None: it can)."""
    if name == "default":
        return None
    if info.type != "cuda":
        return None if name in ("flash", "math") else f"{name} needs a CUDA GPU"
    cap = info.capability or (0, 0)
    if name in EXTERNAL_MODULES and name not in info.installed:
        return f"{name} is not installed ({INSTALL_HINTS[name]})"
    if name in ("cudnn", "flash", "fa3", "fa4", "sage") and dtype not in _HALF:
        return f"{name} needs float16 or bfloat16, not {dtype}"
    needs = {"cudnn": (8, 0), "flash": (8, 0), "fa3": (9, 0), "fa4": (9, 0), "sage": (8, 0)}
    if name in needs and cap < needs[name]:
        return f"{name} needs compute capability >= {needs[name]}, the GPU has {cap}"
    if name == "fa3" and cap >= (10, 0):
        return "fa3 runs on Hopper (sm90) only"
    limit = 128 if name == "cudnn" else 256
    if name != "math" and (head_dim % 8 or head_dim > limit):
        return f"{name} needs a head dim that is a multiple of 8 and <= {limit}, got {head_dim}"
    return None


def auto_choice(info: DeviceInfo, dtype: torch.dtype, head_dim: int) -> str:
    """The fastest backend that applies on this device (see the module docstring)."""
    if info.type != "cuda":
        return "default"
    cap = info.capability or (0, 0)
    preferred = ["efficient"]
    if cap >= (10, 0):
        preferred = ["fa4", "cudnn", "flash", "efficient"]
    elif cap >= (9, 0):
        preferred = ["fa3", "cudnn", "flash", "efficient"]
    elif cap >= (8, 0):
        preferred = ["flash", "efficient"]
    for name in preferred:
        if cannot_serve(name, info, dtype, head_dim) is None:
            return name
    return "default"


@dataclass(frozen=True)
class BackendChoice:
    name: str
    """The backend that runs."""
    requested: str
    reason: str
    """Why it differs from `requested` (empty when it does not)."""

    def describe(self) -> str:
        if self.requested == "auto":
            return f"{self.name} (auto)"
        return self.name if not self.reason else f"{self.name} ({self.reason}; fell back)"


def choose_backend(requested: str, info: DeviceInfo, dtype: torch.dtype, head_dim: int) -> BackendChoice:
    """Resolve `model.attention`; a backend that cannot serve falls back to the `auto` choice."""
    if requested not in BACKEND_CHOICES:
        raise ValueError(
            f"model.attention={requested!r} is not a known attention backend; "
            f"choose one of {', '.join(BACKEND_CHOICES)}"
        )
    if requested == "auto":
        return BackendChoice(auto_choice(info, dtype, head_dim), requested, "")
    problem = cannot_serve(requested, info, dtype, head_dim)
    if problem is None:
        return BackendChoice(requested, requested, "")
    return BackendChoice(auto_choice(info, dtype, head_dim), requested, problem)


def _lse_BHL(lse: torch.Tensor, length: int) -> torch.Tensor:
    """`[B, H, L]`, `[B, H, L, 1]` (cuDNN) or `[B, H, ceil32(L)]` (efficient) -> `[B, H, L]` float32."""
    if lse.ndim == 4:
        lse = lse[..., 0]
    return lse[..., :length].float()


def math_with_lse(
    q_BHLD: torch.Tensor, k_BHSD: torch.Tensor, v_BHSD: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The float32 reference: explicit scores, softmax and log-sum-exp (O(L*S) memory)."""
    scores = (q_BHLD.float() @ k_BHSD.float().transpose(-1, -2)) * q_BHLD.shape[-1] ** -0.5
    lse = torch.logsumexp(scores, dim=-1)
    return (torch.softmax(scores, dim=-1) @ v_BHSD.float()).to(q_BHLD.dtype), lse


class AttentionBackend:
    """One kernel family on one device. A call it cannot serve runs the default: never fails."""

    def __init__(self, name: str, info: DeviceInfo | None = None) -> None:
        if name not in BACKEND_CHOICES or name == "auto":
            raise ValueError(f"attention backend {name!r} is not one of {BACKEND_CHOICES[1:]}")
        self.name = name
        self.info = info or DeviceInfo("cpu")
        self._external = None
        if name in EXTERNAL_MODULES and name in self.info.installed:
            module = importlib.import_module(EXTERNAL_MODULES[name])
            self._external = module.sageattn if name == "sage" else module.flash_attn_func

    def __repr__(self) -> str:
        return f"AttentionBackend({self.name!r})"

    def serves(self, q_BHLD: torch.Tensor) -> bool:
        """Whether this call's device, dtype and head dim suit the kernel (host-side, no sync)."""
        info = self.info if q_BHLD.device.type == self.info.type else DeviceInfo(q_BHLD.device.type)
        return cannot_serve(self.name, info, q_BHLD.dtype, q_BHLD.shape[-1]) is None

    def attention(self, q_BHLD: torch.Tensor, k_BHSD: torch.Tensor, v_BHSD: torch.Tensor) -> torch.Tensor:
        if self.name == "default" or not self.serves(q_BHLD):
            return F.scaled_dot_product_attention(q_BHLD, k_BHSD, v_BHSD)
        if self.name in _SDPA_KINDS:
            first = _SDPA_KINDS[self.name]
            order = [first, *(b for b in _SDPA_KINDS.values() if b != first)]
            with sdpa_kernel(order, set_priority=True):
                return F.scaled_dot_product_attention(q_BHLD, k_BHSD, v_BHSD)
        assert self._external is not None
        if self.name == "sage":
            return self._external(q_BHLD, k_BHSD, v_BHSD, tensor_layout="HND", is_causal=False)
        return self._flash_external(q_BHLD, k_BHSD, v_BHSD)[0]

    def attention_with_lse(
        self, q_BHLD: torch.Tensor, k_BHSD: torch.Tensor, v_BHSD: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`(out [B, H, L, D], lse [B, H, L] float32)`; sage has no LSE and uses the default's."""
        length = q_BHLD.shape[2]
        if self.name == "math" or q_BHLD.device.type not in ("cpu", "cuda"):
            return math_with_lse(q_BHLD, k_BHSD, v_BHSD)
        if q_BHLD.device.type == "cpu":
            if q_BHLD.dtype not in (torch.float32, *_HALF):
                return math_with_lse(q_BHLD, k_BHSD, v_BHSD)
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                q_BHLD, k_BHSD, v_BHSD, 0.0, False
            )[:2]
            return out, _lse_BHL(lse, length)
        name = self.name if self.serves(q_BHLD) else "default"
        if name in ("fa3", "fa4"):
            out, lse = self._flash_external(q_BHLD, k_BHSD, v_BHSD, with_lse=True)
            if lse is not None:
                return out, _lse_BHL(lse, length)
        if name not in _SDPA_KINDS:  # default, sage, or an external kernel that gave no LSE
            info = self.info if self.info.type == "cuda" else DeviceInfo("cuda")
            name = sdpa_lse_kernel(info, q_BHLD.dtype, q_BHLD.shape[-1])
        return _cuda_sdpa_with_lse(name, q_BHLD, k_BHSD, v_BHSD)

    def _flash_external(
        self, q_BHLD: torch.Tensor, k_BHSD: torch.Tensor, v_BHSD: torch.Tensor, with_lse: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """FlashAttention-3/4 take `[B, L, H, D]` and give the LSE as `[B, H, L]` (when they give it)."""
        assert self._external is not None
        q_BLHD, k_BSHD, v_BSHD = q_BHLD.transpose(1, 2), k_BHSD.transpose(1, 2), v_BHSD.transpose(1, 2)
        try:  # FlashAttention-3 releases differ: newer ones return the LSE only when asked
            result = self._external(q_BLHD, k_BSHD, v_BSHD, causal=False, return_attn_probs=with_lse)
        except TypeError:
            result = self._external(q_BLHD, k_BSHD, v_BSHD, causal=False)
        out_BLHD, lse = (result[0], result[1]) if isinstance(result, tuple) else (result, None)
        return out_BLHD.transpose(1, 2), lse


def backend_for(
    requested: str, device: torch.device | str, dtype: torch.dtype, head_dim: int
) -> AttentionBackend:
    """The backend `model.attention=requested` resolves to on `device`."""
    info = device_info(device)
    return AttentionBackend(choose_backend(requested, info, dtype, head_dim).name, info)


def sdpa_lse_kernel(info: DeviceInfo, dtype: torch.dtype, head_dim: int) -> str:
    """The SDPA kernel that gives the LSE on a GPU for a backend without one (default, sage)."""
    usable = [name for name in _SDPA_KINDS if cannot_serve(name, info, dtype, head_dim) is None]
    preferred = auto_choice(info, dtype, head_dim)
    return preferred if preferred in usable else usable[0]


def _cuda_sdpa_with_lse(
    name: str, q_BHLD: torch.Tensor, k_BHSD: torch.Tensor, v_BHSD: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    length = q_BHLD.shape[2]
    if name == "cudnn":
        out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
            q_BHLD, k_BHSD, v_BHSD, None, True, 0.0, False, False
        )[:2]
    elif name == "flash":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q_BHLD, k_BHSD, v_BHSD, 0.0, False)[:2]
    elif name == "efficient" and q_BHLD.shape[-1] % 8 == 0:
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q_BHLD, k_BHSD, v_BHSD, None, True)[
            :2
        ]
    else:
        return math_with_lse(q_BHLD, k_BHSD, v_BHSD)
    return out, _lse_BHL(lse, length)
