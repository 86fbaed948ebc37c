"""Forward time of hvbatch's transformer vs diffusers' on the same weights, mid-size config, CPU.

    python benchmarks/transformer_cpu.py [--repeats 5]

Prints ms per forward for each and the ratio diffusers/ours (> 1 means ours is faster), for
batch 1 (padded text, as every real prompt is) and batch 2 with different text lengths
(true CFG: negative and positive prompt in one batch).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from diffusers import HunyuanVideoTransformer3DModel

from hvbatch.models import load_transformer

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


def _time_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    reference = HunyuanVideoTransformer3DModel(**MID_SIZE).eval()
    with tempfile.TemporaryDirectory() as tmp:
        reference.save_pretrained(Path(tmp) / "transformer")
        ours = load_transformer(Path(tmp) / "transformer", dtype=torch.float32)
    print(f"threads={torch.get_num_threads()} torch={torch.__version__}")
    for label, batch, lens in (("batch 1, 90/256 text tokens", 1, [90]), ("batch 2, 40 and 90", 2, [40, 90])):
        x = _inputs(batch, lens)
        with torch.no_grad():
            ms_ours = _time_ms(
                lambda x=x: ours(x["x"], x["t"], x["text"], x["mask"], x["pooled"], guidance=x["guidance"]),
                args.repeats,
            )
            ms_ref = _time_ms(
                lambda x=x: reference(
                    hidden_states=x["x"],
                    timestep=x["t"],
                    encoder_hidden_states=x["text"],
                    encoder_attention_mask=x["mask"],
                    pooled_projections=x["pooled"],
                    guidance=x["guidance"],
                ),
                args.repeats,
            )
        print(
            f"{label}: hvbatch {ms_ours:.1f} ms, diffusers {ms_ref:.1f} ms, "
            f"diffusers/hvbatch = {ms_ref / ms_ours:.2f}x"
        )


if __name__ == "__main__":
    main()
