"""Attention backends: the choice per device/capability/dtype (dispatch faked), CPU numerics, LSE layouts."""

from __future__ import annotations

import socket
from collections.abc import Callable
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from torch.nn.attention import SDPBackend

import hvbatch.models.attention_backends as ab
from hvbatch.config import ModelConfig, transformer_preset
from hvbatch.models import random_transformer
from hvbatch.models.attention import LocalAttention, resolved_backend_name
from hvbatch.models.attention_backends import AttentionBackend, DeviceInfo, choose_backend, math_with_lse
from hvbatch.parallel.attention import USPAttention, merge_blocks
from hvbatch.parallel.dims import ParallelDims, build_groups
from hvbatch.parallel.runner import SequenceParallelTransformer
from tests.helpers import rel_err
from tests.parallel_worker import LATENT_SHAPE, conditioning, initial_noise, one_forward

CPU = DeviceInfo("cpu")
NEW_CUDNN, OLD_CUDNN = 91501, 91002  # 9.15.1: the first release PyTorch trusts; 9.10.2
V100 = DeviceInfo("cuda", (7, 0), cudnn_version=NEW_CUDNN)
A100 = DeviceInfo("cuda", (8, 0), cudnn_version=NEW_CUDNN)
L40 = DeviceInfo("cuda", (8, 9), cudnn_version=NEW_CUDNN)
H100 = DeviceInfo("cuda", (9, 0), cudnn_version=NEW_CUDNN)
H100_OLD_CUDNN = DeviceInfo("cuda", (9, 0), cudnn_version=OLD_CUDNN)
H100_FA3 = DeviceInfo("cuda", (9, 0), frozenset({"fa3"}), cudnn_version=NEW_CUDNN)
H100_ALL = DeviceInfo("cuda", (9, 0), frozenset({"fa3", "fa4", "sage"}), cudnn_version=NEW_CUDNN)
B200 = DeviceInfo("cuda", (10, 0), cudnn_version=NEW_CUDNN)
B200_FA = DeviceInfo("cuda", (10, 0), frozenset({"fa3", "fa4"}), cudnn_version=NEW_CUDNN)
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
    (A100, BF16, 128, "cudnn", "flash", True),  # PyTorch prefers cuDNN on sm9x/sm10x only
    (A100, FP32, 128, "auto", "efficient", False),
    (L40, BF16, 128, "auto", "flash", False),
    (L40, BF16, 128, "sage", "flash", True),
    (H100, BF16, 128, "auto", "cudnn", False),
    (H100_OLD_CUDNN, BF16, 128, "auto", "flash", False),  # cuDNN 9.10: not trusted, flash
    (H100_OLD_CUDNN, BF16, 128, "cudnn", "flash", True),
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
    ("capability", "cudnn", "cuda_build", "deprioritized", "trusted"),
    [
        # PyTorch's check_prefer_cudnn_attention (sdp_utils.cpp): cuDNN > 91500 on major 9 or 10,
        # minor 0 or 3 as well with a CUDA < 13 build, unless TORCH_CUDNN_SDPA_DEPRIORITIZED is set.
        ((9, 0), 91501, (13, 0), False, True),
        ((9, 0), 91500, (13, 0), False, False),  # 9.15.0 still has the non-multiple-of-128 bug
        ((9, 0), 91002, (12, 8), False, False),
        ((9, 0), 91501, (12, 8), False, True),
        ((10, 0), 91600, (13, 0), False, True),
        ((10, 3), 91600, (12, 9), False, True),
        ((10, 1), 91600, (12, 9), False, False),
        ((10, 1), 91600, (13, 0), False, True),
        ((8, 0), 91600, (13, 0), False, False),
        ((12, 0), 91600, (13, 0), False, False),
        ((9, 0), 91600, (13, 0), True, False),
        ((9, 0), None, (13, 0), False, False),
    ],
)
def test_cudnn_is_trusted_where_torch_prefers_it(
    capability: tuple[int, int],
    cudnn: int | None,
    cuda_build: tuple[int, int],
    deprioritized: bool,
    trusted: bool,
) -> None:
    info = DeviceInfo(
        "cuda", capability, cudnn_version=cudnn, cuda_build=cuda_build, cudnn_deprioritized=deprioritized
    )
    assert info.cudnn_trusted == trusted
    assert (ab.cannot_serve("cudnn", info, BF16, 128) is None) == trusted
    expected = "cudnn" if trusted else ("flash" if capability <= (12, 1) else "efficient")
    assert ab.auto_choice(info, BF16, 128) == expected


def test_device_info_reads_the_runtime_cudnn(monkeypatch: pytest.MonkeyPatch) -> None:
    """The gate reads what the GPU machine has: runtime cuDNN, torch's CUDA build, the env switch."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.backends.cudnn, "is_available", lambda: True)
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: 91002)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    info = ab.device_info("cuda:0")
    assert (info.capability, info.cudnn_version, info.cuda_build) == ((9, 0), 91002, (13, 0))
    assert not info.cudnn_trusted and ab.auto_choice(info, BF16, 128) == "flash"
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: 91700)
    assert ab.device_info("cuda:0").cudnn_trusted
    monkeypatch.setenv("TORCH_CUDNN_SDPA_DEPRIORITIZED", "1")
    assert not ab.device_info("cuda:0").cudnn_trusted


@pytest.mark.parametrize(
    ("info", "dtype", "head_dim", "expected"),
    [
        (H100, BF16, 128, "cudnn"),
        (H100_OLD_CUDNN, BF16, 128, "flash"),
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


@pytest.fixture
def fake_gpu(monkeypatch: pytest.MonkeyPatch) -> Callable[[DeviceInfo], dict[str, list[str]]]:
    """Dispatch faked: CPU tensors look like they are on the given GPU; the LSE kernels and torch's
    eligibility checks are recorders (run by the CPU reference), and `refuse` lists what torch refuses."""
    calls: dict[str, list[str]] = {"lse": [], "refuse": []}

    def install(info: DeviceInfo) -> dict[str, list[str]]:
        monkeypatch.setattr(ab, "device_info", lambda device: info)
        for kind in ("cudnn", "flash", "efficient"):

            def op(q, k, v, kind=kind):  # type: ignore[no-untyped-def]
                calls["lse"].append(kind)
                return math_with_lse(q, k, v)

            monkeypatch.setitem(ab.LSE_OPS, kind, op)
        monkeypatch.setattr(ab, "torch_accepts", lambda kind, q, k, v: kind not in calls["refuse"])
        return calls

    return install


def test_sdpa_backend_is_tried_first_then_the_others(monkeypatch: pytest.MonkeyPatch, fake_gpu) -> None:  # type: ignore[no-untyped-def]
    orders: list[list[SDPBackend]] = []
    real = ab.sdpa_kernel

    def recording(order: list[SDPBackend], set_priority: bool = False):  # type: ignore[no-untyped-def]
        orders.append(list(order))
        assert set_priority
        return real(order, set_priority=True)

    monkeypatch.setattr(ab, "sdpa_kernel", recording)
    calls = fake_gpu(H100)
    q = torch.randn(1, 2, 7, 16).to(BF16)
    backend = AttentionBackend("cudnn", H100)
    out = backend.attention(q, q, q)
    assert orders[0][0] == SDPBackend.CUDNN_ATTENTION and len(set(orders[0])) == 4
    assert rel_err(out.float(), math_with_lse(q, q, q)[0].float()) < 1e-2
    assert not backend.fallbacks
    calls["refuse"].append("cudnn")  # torch's own check refuses cuDNN for this shape: recorded
    backend.attention(q, q, q)
    assert backend.fallbacks == {"cudnn -> flash: torch refuses cudnn for the shape": 1}


def test_unservable_call_runs_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ab, "sdpa_kernel", lambda *a, **k: pytest.fail("a CPU call must not force cuDNN"))
    q = torch.randn(1, 2, 7, 16)
    backend = AttentionBackend("cudnn", H100)
    assert not backend.serves(q)  # resolved on the tensor's device (the CPU), not the given GPU
    assert rel_err(backend.attention(q, q, q), math_with_lse(q, q, q)[0]) < 1e-5
    assert backend.fallbacks == {"cudnn -> default: cudnn needs a CUDA GPU": 1}


@pytest.mark.parametrize(("q_len", "k_len"), [(4112, 4362), (65, 1)])
def test_lse_path_takes_only_trusted_and_accepted_kernels(fake_gpu, q_len: int, k_len: int, caplog) -> None:  # type: ignore[no-untyped-def]
    """cuDNN's LSE op is called directly: only where PyTorch trusts cuDNN, and only for a call its
    own eligibility check accepts; otherwise flash, the fallback logged once and counted."""
    q, k, v = (torch.randn(1, 1, n, 8).to(BF16) for n in (q_len, k_len, k_len))
    calls = fake_gpu(H100_OLD_CUDNN)
    assert AttentionBackend("default").attention_with_lse(q, k, v)[1].shape == (1, 1, q_len)
    assert calls["lse"] == ["flash"]  # untrusted cuDNN: flash
    calls = fake_gpu(H100)
    calls["lse"].clear()
    if k_len == 1:
        calls["refuse"].append("cudnn")  # as torch's check_cudnn_tensor_shapes does for one key
    backend = AttentionBackend("cudnn", H100)
    for _ in range(2):
        out, lse = backend.attention_with_lse(q, k, v)
    ref_out, ref_lse = math_with_lse(q, k, v)
    assert rel_err(out.float(), ref_out.float()) < 1e-5 and (lse - ref_lse).abs().max() < 1e-4
    expected = "flash" if k_len == 1 else "cudnn"
    assert calls["lse"] == [expected, expected]
    assert sum(backend.fallbacks.values()) == (2 if k_len == 1 else 0)
    assert sum("torch refuses cudnn" in r.message for r in caplog.records) == (1 if k_len == 1 else 0)


def test_default_backend_resolves_on_the_tensors_device(fake_gpu) -> None:  # type: ignore[no-untyped-def]
    """A backend made without a device (the model's placeholder, a runner's default) reads the GPU the
    call runs on: on an H100 with a trusted cuDNN its LSE comes from cuDNN, not the memory-efficient
    kernel a CPU-resolved default used to pick."""
    calls = fake_gpu(H100)
    q = torch.randn(1, 2, 33, 16).to(BF16)
    AttentionBackend("default").attention_with_lse(q, q, q)
    assert calls["lse"] == ["cudnn"]


class FakeFlash:
    """`flash_attn.cute.flash_attn_func` (FA4) or `flash_attn_interface.flash_attn_func` (FA3)."""

    def __init__(self, fa4: bool) -> None:
        self.fa4 = fa4
        self.kwargs: list[dict[str, object]] = []

    def __call__(self, q, k, v, *, causal: bool = False, **kwargs):  # type: ignore[no-untyped-def]
        allowed = {"return_lse"} if self.fa4 else {"return_attn_probs"}
        if set(kwargs) - allowed:
            raise TypeError(f"flash_attn_func() got an unexpected keyword argument {sorted(kwargs)[0]!r}")
        self.kwargs.append({"causal": causal, **kwargs})
        out, lse = math_with_lse(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        if self.fa4:
            return out.transpose(1, 2), (lse if kwargs.get("return_lse") else None)
        return (out.transpose(1, 2), lse) if kwargs.get("return_attn_probs") else out.transpose(1, 2)


@pytest.mark.parametrize("name", ["fa4", "fa3"])
def test_flash_attention_lse_call_shape(fake_gpu, monkeypatch: pytest.MonkeyPatch, name: str) -> None:  # type: ignore[no-untyped-def]
    """FA4 gives the LSE through `return_lse` (FA3 through `return_attn_probs`): ring blocks use it."""
    calls = fake_gpu(H100_ALL)
    fake = FakeFlash(fa4=name == "fa4")
    backend = AttentionBackend(name, H100_ALL)
    monkeypatch.setattr(backend, "_external", fake)
    q, k = torch.randn(1, 2, 37, 16).to(BF16), torch.randn(1, 2, 41, 16).to(BF16)
    out, lse = backend.attention_with_lse(q, k, k)
    flag = "return_lse" if name == "fa4" else "return_attn_probs"
    assert fake.kwargs == [{"causal": False, flag: True}]
    ref_out, ref_lse = math_with_lse(q, k, k)
    assert (
        lse.shape == (1, 2, 37)
        and (lse - ref_lse).abs().max() < 1e-4
        and rel_err(out.float(), ref_out.float()) < 1e-5
    )
    assert calls["lse"] == [] and not backend.fallbacks  # no SDPA kernel needed
    assert rel_err(backend.attention(q, k, k).float(), ref_out.float()) < 1e-5
    assert fake.kwargs[-1] == {"causal": False, flag: False}


def test_external_kernel_errors_fall_back_once_logged(
    fake_gpu, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:  # type: ignore[no-untyped-def]
    calls = fake_gpu(B200_FA)

    def refuses(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise RuntimeError("head dim not supported")

    backend = AttentionBackend("fa4", B200_FA)
    monkeypatch.setattr(backend, "_external", refuses)
    q = torch.randn(1, 2, 9, 16).to(BF16)
    for _ in range(3):
        out, _ = backend.attention_with_lse(q, q, q)
    assert rel_err(out.float(), math_with_lse(q, q, q)[0].float()) < 1e-2
    assert calls["lse"] == ["cudnn"] * 3
    assert backend.fallbacks == {"fa4 -> cudnn: fa4 raised RuntimeError: head dim not supported": 3}
    assert sum("fa4 -> cudnn" in r.message for r in caplog.records) == 1


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
        cond = conditioning(1, 9)
        args = (initial_noise(LATENT_SHAPE, 1), torch.tensor([900.0]), cond.text_states, cond.text_mask)
        with torch.no_grad():
            expected = model(*args, cond.text_states_2, guidance=torch.tensor([6016.0]))
            groups = build_groups(ParallelDims(dp=1, ulysses=1, ring=1, world_size=1), 0)
            runner = SequenceParallelTransformer(model, groups)
            backend = CountingBackend()
            runner.attention = model.attention_fn = USPAttention(groups, backend=backend)
            got = runner(*args, cond.text_states_2, guidance=torch.tensor([6016.0]))
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


def test_fallbacks_are_taken_per_shard_for_the_metrics() -> None:
    """What a shard records in the metrics column `attention_fallbacks`: its own calls, summed over ranks."""
    import json

    from hvbatch.batch.runtime.job import _merged_fallbacks
    from hvbatch.batch.runtime.support import take_attention_fallbacks

    model = random_transformer(transformer_preset("tiny"), seed=0)
    model.attention_fn = LocalAttention(AttentionBackend("cudnn", H100))  # a CPU run: cuDNN cannot serve
    one_forward(model)
    blocks = model.config.num_double_blocks + model.config.num_single_blocks
    counts = take_attention_fallbacks(model)
    assert counts == {"cudnn -> default: cudnn needs a CUDA GPU": blocks}
    assert take_attention_fallbacks(model) == {}  # the next shard starts from zero
    assert json.loads(_merged_fallbacks([counts, {}, counts]) or "") == {next(iter(counts)): 2 * blocks}
    assert _merged_fallbacks([{}, {}]) is None
