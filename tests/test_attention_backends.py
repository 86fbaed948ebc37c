"""Attention backends: the choice per device/capability/dtype (dispatch faked), CPU numerics, LSE layouts."""

from __future__ import annotations

import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from torch.nn.attention import SDPBackend

import hvbatch.models.attention_backends as ab
from hvbatch.config import ModelConfig, transformer_preset
from hvbatch.models.attention import LocalAttention, resolved_backend_name
from hvbatch.models.attention_backends import AttentionBackend, DeviceInfo, choose_backend, math_with_lse
from hvbatch.models.hunyuan_video import random_transformer
from hvbatch.parallel.attention import USPAttention, merge_blocks
from hvbatch.parallel.dims import ParallelDims, build_groups
from hvbatch.parallel.runner import SequenceParallelTransformer
from tests.helpers import rel_err
from tests.parallel_worker import LATENT_SHAPE, conditioning, guided, initial_noise, one_forward

CPU = DeviceInfo("cpu")
V100 = DeviceInfo("cuda", (7, 0))
A100 = DeviceInfo("cuda", (8, 0))
L40 = DeviceInfo("cuda", (8, 9))
H100 = DeviceInfo("cuda", (9, 0))
H100_FA3 = DeviceInfo("cuda", (9, 0), frozenset({"fa3"}))
H100_ALL = DeviceInfo("cuda", (9, 0), frozenset({"fa3", "fa4", "sage"}))
B200 = DeviceInfo("cuda", (10, 0))
B200_FA = DeviceInfo("cuda", (10, 0), frozenset({"fa3", "fa4"}))
BF16, FP32 = torch.bfloat16, torch.float32

CASES = [
    # (device, dtype, head dim, requested, expected backend, falls back)
    (CPU, FP32, 128, "auto", "default", False),
    (CPU, BF16, 128, "auto", "default", False),
    (CPU, FP32, 128, "flash", "flash", False),
    (CPU, FP32, 128, "math", "math", False),
    (CPU, BF16, 128, "cudnn", "default", True),
    (CPU, BF16, 128, "efficient", "default", True),
    (CPU, BF16, 128, "fa3", "default", True),
    (V100, BF16, 128, "auto", "efficient", False),
    (V100, BF16, 128, "flash", "efficient", True),
    (A100, BF16, 128, "auto", "flash", False),
    (A100, BF16, 128, "cudnn", "cudnn", False),
    (A100, FP32, 128, "auto", "efficient", False),
    (L40, BF16, 128, "auto", "flash", False),
    (L40, BF16, 128, "sage", "flash", True),
    (H100, BF16, 128, "auto", "cudnn", False),
    (H100, FP32, 128, "auto", "efficient", False),
    (H100, FP32, 128, "cudnn", "efficient", True),
    (H100, BF16, 160, "auto", "flash", False),
    (H100, BF16, 160, "cudnn", "flash", True),
    (H100, BF16, 12, "auto", "default", False),
    (H100, BF16, 128, "fa3", "cudnn", True),
    (H100_FA3, BF16, 128, "auto", "fa3", False),
    (H100_ALL, BF16, 128, "auto", "fa3", False),
    (H100_ALL, BF16, 128, "sage", "sage", False),
    (H100_ALL, BF16, 128, "fa4", "fa4", False),
    (H100_ALL, torch.float16, 128, "efficient", "efficient", False),
    (A100, torch.float16, 128, "auto", "flash", False),
    (A100, torch.float16, 256, "cudnn", "flash", True),
    (B200, BF16, 128, "auto", "cudnn", False),
    (B200_FA, BF16, 128, "auto", "fa4", False),
    (B200_FA, BF16, 128, "fa3", "fa4", True),
]


@pytest.mark.parametrize(("info", "dtype", "head_dim", "requested", "expected", "falls_back"), CASES)
def test_backend_choice(
    info: DeviceInfo, dtype: torch.dtype, head_dim: int, requested: str, expected: str, falls_back: bool
) -> None:
    choice = choose_backend(requested, info, dtype, head_dim)
    assert choice.name == expected
    assert bool(choice.reason) == falls_back, choice.reason


@pytest.mark.parametrize(
    ("info", "dtype", "head_dim", "expected"),
    [
        (H100, BF16, 128, "cudnn"),
        (H100_ALL, BF16, 128, "cudnn"),  # fa3 is preferred but gives the LSE itself; sage has none
        (B200_FA, BF16, 128, "cudnn"),
        (A100, BF16, 128, "flash"),
        (A100, torch.float16, 256, "flash"),
        (V100, BF16, 128, "efficient"),
        (H100, FP32, 128, "efficient"),
        (H100, BF16, 12, "math"),
    ],
)
def test_lse_kernel_for_backends_without_lse(
    info: DeviceInfo, dtype: torch.dtype, head_dim: int, expected: str
) -> None:
    assert ab.sdpa_lse_kernel(info, dtype, head_dim) == expected


def test_unknown_backend_names_the_choices() -> None:
    with pytest.raises(ValueError, match=r"model.attention='xformers'.*auto, default, cudnn, flash"):
        choose_backend("xformers", CPU, FP32, 64)


def test_resolved_backend_name_on_cpu() -> None:
    assert resolved_backend_name(ModelConfig(), "cpu", BF16) == "default (auto)"
    explicit = resolved_backend_name(ModelConfig(attention="cudnn"), "cpu", BF16)
    assert explicit == "default (cudnn needs a CUDA GPU; fell back)"


def test_sdpa_backend_is_tried_first_then_the_others(monkeypatch: pytest.MonkeyPatch) -> None:
    """Dispatch faked: a backend that serves the call asks SDPA for its kernel first, the rest after."""
    orders: list[list[SDPBackend]] = []
    real = ab.sdpa_kernel

    def recording(order: list[SDPBackend], set_priority: bool = False):  # type: ignore[no-untyped-def]
        orders.append(list(order))
        assert set_priority
        return real(order, set_priority=True)

    monkeypatch.setattr(ab, "sdpa_kernel", recording)
    monkeypatch.setattr(AttentionBackend, "serves", lambda self, q: True)
    q = torch.randn(1, 2, 7, 16)
    out = AttentionBackend("cudnn", H100).attention(q, q, q)
    assert orders[0][0] == SDPBackend.CUDNN_ATTENTION and len(set(orders[0])) == 4
    assert rel_err(out, math_with_lse(q, q, q)[0]) < 1e-5


def test_unservable_call_runs_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ab, "sdpa_kernel", lambda *a, **k: pytest.fail("a CPU call must not force cuDNN"))
    q = torch.randn(1, 2, 7, 16)
    assert not AttentionBackend("cudnn", H100).serves(q)
    assert rel_err(AttentionBackend("cudnn", H100).attention(q, q, q), math_with_lse(q, q, q)[0]) < 1e-5


def test_lse_layouts_are_normalized() -> None:
    lse = torch.randn(2, 3, 5)
    assert torch.equal(ab._lse_BHL(lse[..., None], 5), lse)  # cuDNN: [B, H, L, 1]
    padded = torch.cat([lse, torch.full((2, 3, 27), float("nan"))], dim=-1)  # efficient: L -> 32
    assert torch.equal(ab._lse_BHL(padded, 5), lse)


@pytest.mark.parametrize("name", ["default", "flash", "math", "cudnn", "efficient"])
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_cpu_numerics(name: str, dtype: torch.dtype, tol: float) -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 16, generator=g).to(dtype) for n in (37, 41, 41))
    ref_out, ref_lse = math_with_lse(q.float(), k.float(), v.float())
    backend = AttentionBackend(name)
    assert rel_err(backend.attention(q, k, v).float(), ref_out) < tol
    out, lse = backend.attention_with_lse(q, k, v)
    assert lse.shape == (2, 3, 37) and lse.dtype == torch.float32
    assert rel_err(out.float(), ref_out) < tol
    assert (lse - ref_lse).abs().max() < tol * 10


@pytest.mark.parametrize("name", ["default", "math"])
@pytest.mark.parametrize("blocks", [2, 4, 8])
def test_ring_split_with_text_block_equals_one_call(name: str, blocks: int) -> None:
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 4, 50, 16, generator=g)
    k, v = torch.randn(2, 1, 4, 43, 16, generator=g)  # 40 image keys + 3 text keys
    backend = AttentionBackend(name)
    out, lse = backend.attention_with_lse(q, k[:, :, 40:], v[:, :, 40:])  # the text block
    for k_b, v_b in zip(k[:, :, :40].chunk(blocks, dim=2), v[:, :, :40].chunk(blocks, dim=2), strict=True):
        out, lse = merge_blocks(out, lse, *backend.attention_with_lse(q, k_b, v_b))
    full_out, full_lse = math_with_lse(q, k, v)
    assert rel_err(out, full_out) < 1e-5
    assert (lse - full_lse).abs().max() < 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class CountingBackend(AttentionBackend):
    def __init__(self) -> None:
        super().__init__("default")
        self.calls = {"attention": 0, "lse": 0}

    def attention(self, q_BHLD: torch.Tensor, k_BHSD: torch.Tensor, v_BHSD: torch.Tensor) -> torch.Tensor:
        self.calls["attention"] += 1
        return super().attention(q_BHLD, k_BHSD, v_BHSD)

    def attention_with_lse(
        self, q_BHLD: torch.Tensor, k_BHSD: torch.Tensor, v_BHSD: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls["lse"] += 1
        return super().attention_with_lse(q_BHLD, k_BHSD, v_BHSD)


def test_ring_one_joins_text_keys_in_one_call() -> None:
    """Ring degree 1: one plain call per block (no LSE, no merge), same output as the plain model."""
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{_free_port()}",
        rank=0,
        world_size=1,
        timeout=timedelta(seconds=60),
    )
    try:
        model = random_transformer(transformer_preset("tiny"), seed=0)
        args = (initial_noise(LATENT_SHAPE, 1), torch.tensor([900.0]), guided(conditioning(1, 9)))
        with torch.no_grad():
            expected = model(*args)
            groups = build_groups(ParallelDims(dp=1, ulysses=1, ring=1, world_size=1), 0)
            runner = SequenceParallelTransformer(model, groups)
            backend = CountingBackend()
            runner.attention = model.attention_fn = USPAttention(groups, backend=backend)
            got = runner(*args)
    finally:
        dist.destroy_process_group()
    num_blocks = model.config.num_double_blocks + model.config.num_single_blocks
    assert backend.calls == {"attention": num_blocks, "lse": 0}
    assert rel_err(got, expected) < 1e-5


def test_model_runs_the_configured_backend() -> None:
    model = random_transformer(transformer_preset("tiny"), seed=0)
    backend = CountingBackend()
    model.attention_fn = LocalAttention(backend)
    one_forward(model)
    assert backend.calls["attention"] == model.config.num_double_blocks + model.config.num_single_blocks
