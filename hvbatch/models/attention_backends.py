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
- `auto`: Hopper (sm90) FA3 if installed, else cuDNN where PyTorch trusts it, else flash;
  Blackwell (sm100+) FA4 if installed, else cuDNN where trusted, else flash; Ampere/Ada (sm8x)
  flash; older GPUs and float32 memory-efficient; CPU the default.

cuDNN is used (by name, by `auto`, and in the log-sum-exp path) only where PyTorch's own SDPA
dispatch prefers it (`check_prefer_cudnn_attention` in aten/src/ATen/native/transformers/cuda/
sdp_utils.cpp): runtime cuDNN newer than 9.15.0, a GPU of major 9 or 10 (with a CUDA < 13 build
also minor 0 or 3), and `TORCH_CUDNN_SDPA_DEPRIORITIZED` unset. Older cuDNN corrupts memory when
the query length is not a multiple of 128 (pytorch#169849); 119,056 image tokens leave 16.

The device is read where the tensors are: a backend made without a `DeviceInfo`, or with one of
another device type, resolves its rule on the device of its first call (never a CPU default on a
GPU). A call the chosen kernel cannot serve (device, dtype, head dim, or a shape torch's own
eligibility check or an external kernel refuses) runs the next kernel; each such fallback is
logged once and counted in `AttentionBackend.fallbacks` (the batch metrics record them).
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

logger = logging.getLogger(__name__)
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
CUDNN_TRUSTED_ABOVE = 91500
"""PyTorch prefers cuDNN attention only with a runtime cuDNN version above this (9.15.0)."""
CUDNN_MAX_DIM = 65535
"""cuDNN SDPA refuses a batch or head count above this."""


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on", "y")


@dataclass(frozen=True)
class DeviceInfo:
    """What the choice depends on: device type, CUDA capability, importable external kernels, and
    what PyTorch's cuDNN rule reads (runtime cuDNN version, the CUDA version torch was built for,
    `TORCH_CUDNN_SDPA_DEPRIORITIZED`)."""

    type: str
    capability: tuple[int, int] | None = None
    installed: frozenset[str] = frozenset()
    cudnn_version: int | None = None
    cuda_build: tuple[int, int] | None = None
    cudnn_deprioritized: bool = False

    @property
    def cudnn_trusted(self) -> bool:
        """Whether PyTorch's own SDPA dispatch prefers cuDNN here (`check_prefer_cudnn_attention`)."""
        return cudnn_problem(self) is None


def cudnn_problem(info: DeviceInfo) -> str | None:
    """Why PyTorch would not prefer cuDNN attention on `info` (None: it would)."""
    if info.type != "cuda":
        return "cudnn needs a CUDA GPU"
    if info.cudnn_deprioritized:
        return "TORCH_CUDNN_SDPA_DEPRIORITIZED is set"
    version = info.cudnn_version or 0
    if version <= CUDNN_TRUSTED_ABOVE:
        shown = "no cuDNN" if not version else f"cuDNN {version}"
        return (
            f"PyTorch trusts cuDNN attention only above cuDNN {CUDNN_TRUSTED_ABOVE} (9.15.0: older ones "
            f"corrupt memory when the query length is not a multiple of 128); this GPU has {shown}"
        )
    major, minor = info.capability or (0, 0)
    if major not in (9, 10):
        return f"PyTorch prefers cuDNN attention only on sm9x/sm10x GPUs, not sm{major}{minor}"
    if (info.cuda_build or (13, 0)) < (13, 0) and minor not in (0, 3):
        return f"PyTorch built for CUDA < 13 prefers cuDNN attention on sm{major}0/sm{major}3 only"
    return None


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


def _cuda_build() -> tuple[int, int] | None:
    version = torch.version.cuda
    if not version:
        return None
    parts = [int(p) for p in version.split(".")[:2] if p.isdigit()]
    return (parts[0], parts[1] if len(parts) > 1 else 0) if parts else None


def device_info(device: torch.device | str) -> DeviceInfo:
    device = torch.device(device)
    if device.type != "cuda":
        return DeviceInfo(device.type)
    return DeviceInfo(
        "cuda",
        torch.cuda.get_device_capability(device),
        installed_kernels(),
        cudnn_version=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        cuda_build=_cuda_build(),
        cudnn_deprioritized=_env_true("TORCH_CUDNN_SDPA_DEPRIORITIZED"),
    )


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
    if name == "flash" and cap > (12, 1):
        return f"flash runs on sm80 to sm121, the GPU has {cap}"
    if name == "fa3" and cap >= (10, 0):
        return "fa3 runs on Hopper (sm90) only"
    if name == "cudnn" and (problem := cudnn_problem(info)) is not None:
        return problem
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


def torch_accepts(kind: str, q_BHLD: torch.Tensor, k_BHSD: torch.Tensor, v_BHSD: torch.Tensor) -> bool:
    """PyTorch's own eligibility check of SDPA kernel `kind` for this call (host side, no sync)."""
    if kind == "math":
        return True
    params = torch.backends.cuda.SDPAParams(q_BHLD, k_BHSD, v_BHSD, None, 0.0, False, False)
    check = {
        "cudnn": torch.backends.cuda.can_use_cudnn_attention,
        "flash": torch.backends.cuda.can_use_flash_attention,
        "efficient": torch.backends.cuda.can_use_efficient_attention,
    }[kind]
    return bool(check(params, False))


def _cudnn_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, False, False)[:2]


def _flash_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False)[:2]


def _efficient_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True)[:2]


LSE_OPS: dict[str, Callable[..., tuple[torch.Tensor, torch.Tensor]]] = {
    "cudnn": _cudnn_lse,
    "flash": _flash_lse,
    "efficient": _efficient_lse,
    "math": math_with_lse,
}
"""The CUDA SDPA kernels that give the LSE, called directly (each call first passes `torch_accepts`)."""
_SDPA_ORDER = ("cudnn", "flash", "efficient", "math")
_EXTERNAL_ERRORS = (RuntimeError, TypeError, ValueError, NotImplementedError, AssertionError)


class AttentionBackend:
    """One kernel family, resolved on the device its tensors are on. Never fails for want of a
    kernel: a call it cannot serve runs the next one, logged once and counted in `fallbacks`."""

    def __init__(self, name: str, info: DeviceInfo | None = None) -> None:
        if name not in BACKEND_CHOICES or name == "auto":
            raise ValueError(f"attention backend {name!r} is not one of {BACKEND_CHOICES[1:]}")
        self.name = name
        self.info = info
        self.fallbacks: Counter[str] = Counter()
        """`"<kernel> -> <kernel>: <why>"` -> calls that ran another kernel than this one."""
        self._infos: dict[str, DeviceInfo] = {} if info is None else {info.type: info}
        self._external: Callable[..., object] | None = None

    def __repr__(self) -> str:
        return f"AttentionBackend({self.name!r})"

    def info_for(self, tensor: torch.Tensor) -> DeviceInfo:
        """The rule's inputs on `tensor`'s device: the given info if it is of that device type."""
        kind = tensor.device.type
        if kind not in self._infos:
            self._infos[kind] = device_info(tensor.device)
        return self._infos[kind]

    def serves(self, q_BHLD: torch.Tensor) -> bool:
        """Whether this call's device, dtype and head dim suit the kernel (host-side, no sync)."""
        return cannot_serve(self.name, self.info_for(q_BHLD), q_BHLD.dtype, q_BHLD.shape[-1]) is None

    def _fell_back(
        self, ran: str, why: str, q_BHLD: torch.Tensor | None = None, k_BHSD: torch.Tensor | None = None
    ) -> None:
        key = f"{self.name} -> {ran}: {why}"
        if key not in self.fallbacks:
            shapes = (
                ""
                if q_BHLD is None or k_BHSD is None
                else f" (first: q {list(q_BHLD.shape)}, k {list(k_BHSD.shape)})"
            )
            logger.warning("attention: %s%s", key, shapes)
        self.fallbacks[key] += 1

    def _kernel(self, q_BHLD: torch.Tensor) -> str:
        """This backend's name if it serves the call's device, dtype and head dim, else `default`."""
        if self.name in ("default", "math"):
            return self.name
        problem = cannot_serve(self.name, self.info_for(q_BHLD), q_BHLD.dtype, q_BHLD.shape[-1])
        if problem is None:
            return self.name
        if not torch.compiler.is_compiling():
            self._fell_back("default", problem)
        return "default"

    def attention(self, q_BHLD: torch.Tensor, k_BHSD: torch.Tensor, v_BHSD: torch.Tensor) -> torch.Tensor:
        name = self._kernel(q_BHLD)
        if name == "default":
            return F.scaled_dot_product_attention(q_BHLD, k_BHSD, v_BHSD)
        if name in _SDPA_KINDS:
            order = [name, *(kind for kind in _SDPA_ORDER if kind != name)]
            if self.info_for(q_BHLD).type == "cuda" and not torch.compiler.is_compiling():
                ran = next(kind for kind in order if torch_accepts(kind, q_BHLD, k_BHSD, v_BHSD))
                if ran != name:
                    self._fell_back(ran, f"torch refuses {name} for the shape", q_BHLD, k_BHSD)
            with sdpa_kernel([_SDPA_KINDS[kind] for kind in order], set_priority=True):
                return F.scaled_dot_product_attention(q_BHLD, k_BHSD, v_BHSD)
        try:
            if name == "sage":
                return self._external_fn()(q_BHLD, k_BHSD, v_BHSD, tensor_layout="HND", is_causal=False)
            return self._flash_external(q_BHLD, k_BHSD, v_BHSD)[0]
        except _EXTERNAL_ERRORS as err:
            self._fell_back("default", f"{name} raised {type(err).__name__}: {str(err)[:120]}")
            return F.scaled_dot_product_attention(q_BHLD, k_BHSD, v_BHSD)

    def attention_with_lse(
        self, q_BHLD: torch.Tensor, k_BHSD: torch.Tensor, v_BHSD: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`(out [B, H, L, D], lse [B, H, L] float32)`; sage has no LSE and uses an SDPA kernel's."""
        length = q_BHLD.shape[2]
        device_type = self.info_for(q_BHLD).type  # (USP calls this eagerly: never inside a compiled graph)
        if self.name == "math" or device_type not in ("cpu", "cuda"):
            return math_with_lse(q_BHLD, k_BHSD, v_BHSD)
        if device_type == "cpu":
            if q_BHLD.dtype not in (torch.float32, *_HALF):
                return math_with_lse(q_BHLD, k_BHSD, v_BHSD)
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                q_BHLD, k_BHSD, v_BHSD, 0.0, False
            )[:2]
            return out, _lse_BHL(lse, length)
        name = self._kernel(q_BHLD)
        if name in ("fa3", "fa4"):
            try:
                out, lse = self._flash_external(q_BHLD, k_BHSD, v_BHSD, with_lse=True)
            except _EXTERNAL_ERRORS as err:
                out, lse = None, None
                why = f"{name} raised {type(err).__name__}: {str(err)[:120]}"
            else:
                why = f"{name} returned no log-sum-exp"
            if out is not None and lse is not None:
                return out, _lse_BHL(lse, length)
            fallback = sdpa_lse_kernel(self.info_for(q_BHLD), q_BHLD.dtype, q_BHLD.shape[-1])
            self._fell_back(fallback, why)
            name = fallback
        elif name not in _SDPA_KINDS:  # default or sage: the SDPA kernel auto would use for the LSE
            name = sdpa_lse_kernel(self.info_for(q_BHLD), q_BHLD.dtype, q_BHLD.shape[-1])
        return self._sdpa_with_lse(name, q_BHLD, k_BHSD, v_BHSD)

    def _sdpa_with_lse(
        self, name: str, q_BHLD: torch.Tensor, k_BHSD: torch.Tensor, v_BHSD: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The first of `name`, then flash, efficient, math that torch accepts for this call."""
        order = [name, *(kind for kind in _SDPA_ORDER if kind != name and kind != "cudnn")]
        info = self.info_for(q_BHLD)
        for kind in order:
            usable = cannot_serve(kind, info, q_BHLD.dtype, q_BHLD.shape[-1]) is None
            if usable and (kind == "math" or torch_accepts(kind, q_BHLD, k_BHSD, v_BHSD)):
                if kind != name:
                    self._fell_back(kind, f"torch refuses {name} for the shape", q_BHLD, k_BHSD)
                out, lse = LSE_OPS[kind](q_BHLD, k_BHSD, v_BHSD)
                return out, _lse_BHL(lse, q_BHLD.shape[2])
        raise AssertionError("the math kernel serves every call")

    def _external_fn(self) -> Callable[..., object]:
        if self._external is None:
            module = importlib.import_module(EXTERNAL_MODULES[self.name])
            self._external = module.sageattn if self.name == "sage" else module.flash_attn_func
        return self._external

    def _flash_external(
        self, q_BHLD: torch.Tensor, k_BHSD: torch.Tensor, v_BHSD: torch.Tensor, with_lse: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """FlashAttention-3/4 take `[B, L, H, D]` and give the LSE as `[B, H, L]`.

        FA4 (`flash_attn.cute.flash_attn_func`) takes `return_lse` and always returns `(out, lse)`
        (lse None unless asked); FA3 takes `return_attn_probs` and returns `out` or `(out, lse)`
        (early FA3 releases take neither and always return `(out, lse)`).
        """
        fn = self._external_fn()
        q_BLHD, k_BSHD, v_BSHD = q_BHLD.transpose(1, 2), k_BHSD.transpose(1, 2), v_BHSD.transpose(1, 2)
        if self.name == "fa4":
            result = fn(q_BLHD, k_BSHD, v_BSHD, causal=False, return_lse=with_lse)
        else:
            try:
                result = fn(q_BLHD, k_BSHD, v_BSHD, causal=False, return_attn_probs=with_lse)
            except TypeError:
                result = fn(q_BLHD, k_BSHD, v_BSHD, causal=False)
        out_BLHD, lse = (result[0], result[1]) if isinstance(result, tuple) else (result, None)
        return out_BLHD.transpose(1, 2), lse


def backend_for(
    requested: str, device: torch.device | str, dtype: torch.dtype, head_dim: int
) -> AttentionBackend:
    """The backend `model.attention=requested` resolves to on `device`."""
    info = device_info(device)
    return AttentionBackend(choose_backend(requested, info, dtype, head_dim).name, info)


def sdpa_lse_kernel(info: DeviceInfo, dtype: torch.dtype, head_dim: int) -> str:
    """The SDPA kernel that gives the LSE on a GPU for a backend without one (default, sage, or an
    external kernel that gave none): `auto`'s choice if it is an SDPA kernel, else the first usable."""
    usable = [name for name in _SDPA_ORDER if cannot_serve(name, info, dtype, head_dim) is None]
    preferred = auto_choice(info, dtype, head_dim)
    if preferred in usable:
        return preferred
    no_external = replace(info, installed=frozenset())
    preferred = auto_choice(no_external, dtype, head_dim)
    return preferred if preferred in usable else usable[0]
