"""A sync-free, compile-friendly step: no host sync per step, compiled blocks equal eager, no recompiles.

Compiling uses the inductor backend (about 45 s for the tiny model's two block graphs on 2 cores),
once per module, shared by the compile tests.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch._dynamo.utils import counters

from hvbatch.config import SamplingConfig, transformer_preset
from hvbatch.models import HunyuanVideoTransformer, random_transformer
from hvbatch.models.runtime import compile_blocks
from hvbatch.models.transformer import TextLengths
from hvbatch.parallel.dims import ParallelDims, build_groups
from hvbatch.parallel.runner import SequenceParallelTransformer
from hvbatch.sampling import denoise
from tests.helpers import rel_err
from tests.parallel_worker import LATENT_SHAPE, conditioning, initial_noise

SYNCS = ("item", "tolist", "__bool__", "__int__", "__float__")


@pytest.fixture
def sync_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Record every host sync (`.item()`, `.tolist()`, `torch.equal`, `bool(t)`, ...) on a tensor."""
    calls: list[str] = []

    def recorder(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            calls.append(name)
            return original(*args, **kwargs)

        return wrapped

    for name in SYNCS:
        monkeypatch.setattr(torch.Tensor, name, recorder(name, getattr(torch.Tensor, name)))
    monkeypatch.setattr(torch, "equal", recorder("equal", torch.equal))
    yield calls


def _forward(model: HunyuanVideoTransformer, text_len: int, t: float = 900.0) -> torch.Tensor:
    cond = conditioning(text_len, text_len)
    lengths = TextLengths.from_mask(cond.text_mask, 1, cond.text_states.shape[1])
    with torch.no_grad():
        return model(
            initial_noise(LATENT_SHAPE, 1),
            torch.tensor([t]),
            cond.text_states,
            lengths,
            cond.text_states_2,
            guidance=torch.tensor([6016.0]),
        )


def test_forward_has_no_host_sync(sync_calls: list[str]) -> None:
    model = random_transformer(transformer_preset("tiny"), seed=0)
    _forward(model, 9)
    sync_calls.clear()
    _forward(model, 9)  # TextLengths.from_mask above reads the mask once, outside the forward
    assert sync_calls == ["equal", "tolist"]  # both from TextLengths.from_mask, none from the forward


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_steps_have_no_host_sync(sync_calls: list[str], cfg_scale: float) -> None:
    """The per-video preparation syncs a fixed number of times; each added step adds none."""
    model = random_transformer(transformer_preset("tiny"), seed=0)
    per_run = []
    for steps in (1, 3):
        sync_calls.clear()
        denoise(
            model,
            initial_noise(LATENT_SHAPE, 1),
            conditioning(1, 9),
            SamplingConfig(num_inference_steps=steps, cfg_scale=cfg_scale),
            negative=conditioning(2, 5),
        )
        per_run.append(len(sync_calls))
    assert per_run[0] == per_run[1] <= 3, per_run


class CountingBackend:
    """An inductor backend that counts the graphs it compiles (first compiles plus recompiles)."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm: torch.fx.GraphModule, inputs: list[torch.Tensor]) -> Callable[..., Any]:
        from torch._inductor.compile_fx import compile_fx

        self.graphs += 1
        return compile_fx(gm, inputs)


@pytest.fixture(scope="module")
def compiled() -> tuple[HunyuanVideoTransformer, CountingBackend, dict[int, torch.Tensor]]:
    torch._dynamo.reset()
    counters.clear()
    model = random_transformer(transformer_preset("tiny"), seed=0)
    backend = CountingBackend()
    compile_blocks(model, backend=backend)  # type: ignore[arg-type]
    outputs = {n: _forward(model, n) for n in (9, 12, 5)}  # three prompts of different lengths
    outputs[-1] = _forward(model, 9, t=300.0)  # another step of the first prompt
    return model, backend, outputs


def test_compiled_equals_eager(compiled: tuple[HunyuanVideoTransformer, CountingBackend, dict]) -> None:
    eager = random_transformer(transformer_preset("tiny"), seed=0)
    _, _, outputs = compiled
    for n in (9, 12, 5):
        assert rel_err(outputs[n], _forward(eager, n)) < 1e-5
    assert rel_err(outputs[-1], _forward(eager, 9, t=300.0)) < 1e-5


def test_no_graph_breaks_and_no_recompiles(
    compiled: tuple[HunyuanVideoTransformer, CountingBackend, dict],
) -> None:
    model, backend, _ = compiled
    assert model.compiled_blocks
    assert dict(counters["graph_break"]) == {}
    # One graph per block kind (double, single), shared by all blocks, all lengths and steps:
    # at most one recompile is allowed across prompts; none happens.
    assert backend.graphs <= 2 + 1, backend.graphs
    assert backend.graphs == 2


def test_compiled_blocks_under_sequence_parallelism() -> None:
    """The USP attention runs eagerly inside compiled blocks; the output equals the eager model's."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1, timeout=timedelta(seconds=60)
    )
    try:
        eager = random_transformer(transformer_preset("tiny"), seed=0)
        model = random_transformer(transformer_preset("tiny"), seed=0)
        compile_blocks(model, backend="aot_eager")
        groups = build_groups(ParallelDims(dp=1, ulysses=1, ring=1, world_size=1), 0)
        runner = SequenceParallelTransformer(model, groups)
        cond = conditioning(1, 9)
        lengths = TextLengths.from_mask(cond.text_mask, 1, cond.text_states.shape[1])
        args = (initial_noise(LATENT_SHAPE, 1), torch.tensor([900.0]), cond.text_states, lengths)
        with torch.no_grad():
            got = runner(*args, cond.text_states_2, guidance=torch.tensor([6016.0]))  # type: ignore[arg-type]
            expected = eager(*args, cond.text_states_2, guidance=torch.tensor([6016.0]))
    finally:
        dist.destroy_process_group()
    assert rel_err(got, expected) < 1e-5


def warm_up_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """ulysses 2: the warm-up compiles both block graphs with every collective forbidden; the real
    forward afterwards compiles nothing more and equals the eager model."""
    from pathlib import Path

    from torch._dynamo.testing import CompileCounter

    from hvbatch.parallel.runner import warm_up
    from tests.parallel_worker import init_gloo

    init_gloo(rank, world, port)
    try:
        eager = random_transformer(transformer_preset("tiny"), seed=0)
        model = random_transformer(transformer_preset("tiny"), seed=0)
        counter = CompileCounter()
        compile_blocks(model, backend=counter)
        runner = SequenceParallelTransformer(model, build_groups(ParallelDims(1, 2, 1, world), rank))
        cond = conditioning(1, 9)
        lengths = TextLengths.from_mask(cond.text_mask, 1, cond.text_states.shape[1])
        inputs = (initial_noise(LATENT_SHAPE, 1), torch.tensor([900.0]), cond.text_states, lengths)
        inputs += (cond.text_states_2, torch.tensor([6016.0]))
        real = {
            name: getattr(dist, name) for name in ("all_to_all_single", "all_gather", "batch_isend_irecv")
        }

        def forbidden(*args: Any, **kwargs: Any) -> None:
            raise AssertionError("a collective ran during the compile warm-up")

        for name in real:
            setattr(dist, name, forbidden)
        try:
            warm_up(runner, *inputs)
        finally:
            for name, fn in real.items():
                setattr(dist, name, fn)
        compiled_in_warm_up = counter.frame_count
        with torch.no_grad():
            got = runner(*inputs)  # type: ignore[arg-type]
            expected = eager(*inputs)  # type: ignore[arg-type]
        result = {"warm_up": compiled_in_warm_up, "after": counter.frame_count, "err": rel_err(got, expected)}
        torch.save(result, Path(out_dir) / f"warm{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_compile_warm_up_runs_no_collective_and_leaves_nothing_to_compile(tmp_path: Any) -> None:
    import torch.multiprocessing as mp

    from tests.test_parallel import free_port

    mp.spawn(warm_up_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        result = torch.load(tmp_path / f"warm{rank}.pt")
        assert result["warm_up"] >= 2, result  # the double- and single-block graphs (and their pieces)
        assert result["after"] == result["warm_up"], result  # the timed run compiles nothing
        assert result["err"] < 1e-5
