"""Forward time of hvbatch's transformer vs diffusers' on the same weights, mid-size config, CPU.

    python benchmarks/transformer_cpu.py [--repeats 5] [--compiled] [--fp8]

Prints the median ms per forward for each (calls interleaved, so load changes hit all alike)
and the ratio diffusers/ours (> 1 means ours is faster), for batch 1 (padded text, as every real
prompt is) and batch 2 with different text lengths (true CFG: negative and positive prompt in
one batch). Ours gets the text lengths once, as the
encoders hand them over (`TextConditioning`). `--compiled` also times ours with compiled blocks
(inductor; the compile itself is in the warm-up), `--fp8` with FP8 block linears (`_scaled_mm`).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import HunyuanVideoTransformer3DModel

from hvbatch.models.fp8 import quantize_model_fp8
from hvbatch.models.hunyuan_video import HunyuanVideoTransformer, TextConditioning, load_transformer
from hvbatch.models.runtime import compile_blocks

MID_SIZE = {
    "num_attention_heads": 8,
    "attention_head_dim": 64,
    "num_layers": 4,
    "num_single_layers": 8,
    "num_refiner_layers": 2,
    "text_embed_dim": 512,
    "pooled_projection_dim": 128,
    "rope_axes_dim": (16, 24, 24),
}


def _time_ms(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median ms per call of each function, the calls interleaved so that load changes hit all alike."""
    for fn in fns.values():
        fn()  # warm-up (and the compile, for compiled blocks)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(values) for name, values in times.items()}


def _inputs(batch: int, text_lens: list[int]) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    mask = torch.zeros(batch, 256, dtype=torch.long)
    for b, n in enumerate(text_lens):
        mask[b, :n] = 1
    return {
        "x": torch.randn(batch, 16, 9, 24, 32, generator=g),  # 9 * 12 * 16 = 1728 image tokens
        "t": torch.full((batch,), 900.0),
        "text": torch.randn(batch, 256, MID_SIZE["text_embed_dim"], generator=g),
        "mask": mask,
        "pooled": torch.randn(batch, MID_SIZE["pooled_projection_dim"], generator=g),
        "guidance": torch.full((batch,), 6016.0),
    }


def _ours(model: HunyuanVideoTransformer, x: dict[str, torch.Tensor]) -> Callable[[], object]:
    scale = float(x["guidance"][0]) / 1000
    cond = TextConditioning.from_mask(x["text"], x["mask"], x["pooled"], guidance_scale=scale)
    return lambda: model(x["x"], x["t"], cond)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compiled", action="store_true", help="also time ours with compiled blocks")
    parser.add_argument("--fp8", action="store_true", help="also time ours with FP8 block linears")
    args = parser.parse_args()
    torch.manual_seed(0)
    reference = HunyuanVideoTransformer3DModel(**MID_SIZE).eval()
    variants: dict[str, HunyuanVideoTransformer] = {}
    with tempfile.TemporaryDirectory() as tmp:
        reference.save_pretrained(Path(tmp) / "transformer")
        ours = load_transformer(Path(tmp) / "transformer", dtype=torch.float32)
        if args.compiled:
            variants["compiled"] = load_transformer(Path(tmp) / "transformer", dtype=torch.float32)
            compile_blocks(variants["compiled"])
        if args.fp8:
            variants["fp8"] = load_transformer(Path(tmp) / "transformer", dtype=torch.float32)
            quantize_model_fp8(variants["fp8"])
    print(f"threads={torch.get_num_threads()} torch={torch.__version__}")
    for label, batch, lens in (("batch 1, 90/256 text tokens", 1, [90]), ("batch 2, 40 and 90", 2, [40, 90])):
        x = _inputs(batch, lens)
        fns = {
            "hvbatch": _ours(ours, x),
            "diffusers": lambda x=x: reference(
                hidden_states=x["x"],
                timestep=x["t"],
                encoder_hidden_states=x["text"],
                encoder_attention_mask=x["mask"],
                pooled_projections=x["pooled"],
                guidance=x["guidance"],
            ),
            **{name: _ours(model, x) for name, model in variants.items()},
        }
        with torch.no_grad():
            ms = _time_ms(fns, args.repeats)
        ms_ours, ms_ref = ms.pop("hvbatch"), ms.pop("diffusers")
        extra = ms
        print(
            f"{label}: hvbatch {ms_ours:.1f} ms, diffusers {ms_ref:.1f} ms, "
            f"diffusers/hvbatch = {ms_ref / ms_ours:.2f}x"
            + "".join(
                f"; hvbatch {name} {ms:.1f} ms ({ms_ours / ms:.2f}x eager)" for name, ms in extra.items()
            )
        )


if __name__ == "__main__":
    main()
