"""One denoising step of the full-size transformer on one GPU: ms/step, FLOPs, TFLOP/s, attention backend.

    python benchmarks/transformer_gpu.py [--sizes 544x960x129 720x1280x129] [--repeats 3]

Builds HYVideo-T/2-cfgdistill (12.8B parameters) with random bf16 weights directly on the GPU
(no checkpoint needed), times one forward per size with warm-ups excluded, and reports which
SDPA backend ran. Each backend is first probed on an attention call of the real shape; the
fastest one that works is used for the step.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from hvbatch.config import transformer_preset
from hvbatch.models import HunyuanVideoTransformer
from hvbatch.sampling import latent_shape

BACKENDS = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
}


def step_flops(model: HunyuanVideoTransformer, num_image_tokens: int, num_text_tokens: int) -> float:
    """Matmul FLOPs of one forward: 2 * tokens * block-linear weights + 4 * L^2 * hidden per block."""
    cfg = model.config
    tokens = num_image_tokens + num_text_tokens
    block_params = sum(
        p.numel()
        for n, p in model.named_parameters()
        if "_blocks." in n and n.endswith("weight") and p.ndim == 2
    )
    # Modulation linears act on one vector per sample, not per token.
    mod_params = sum(
        p.numel()
        for n, p in model.named_parameters()
        if n.endswith(("_mod.linear.weight", "modulation.linear.weight"))
    )
    linear = 2.0 * tokens * (block_params - mod_params)
    attention = 4.0 * tokens**2 * cfg.hidden_size * (cfg.num_double_blocks + cfg.num_single_blocks)
    return linear + attention


def probe_backends(num_tokens: int, heads: int, head_dim: int) -> dict[str, float]:
    q = torch.randn(1, heads, num_tokens, head_dim, device="cuda", dtype=torch.bfloat16)
    results = {}
    for name, backend in BACKENDS.items():
        try:
            with sdpa_kernel([backend]):
                F.scaled_dot_product_attention(q, q, q)
                torch.cuda.synchronize()
                start = time.perf_counter()
                F.scaled_dot_product_attention(q, q, q)
                torch.cuda.synchronize()
            results[name] = (time.perf_counter() - start) * 1e3
        except RuntimeError as err:
            print(f"  backend {name}: unavailable ({str(err).splitlines()[0][:100]})")
    return results


def time_step(model: HunyuanVideoTransformer, height: int, width: int, frames: int, repeats: int) -> None:
    cfg = model.config
    channels, t, h, w = latent_shape(height, width, frames)
    num_image_tokens = t * (h // 2) * (w // 2)
    num_text = 256
    probes = probe_backends(num_image_tokens + num_text, cfg.num_heads, cfg.head_dim)
    print(
        f"{height}x{width}x{frames}: {num_image_tokens} image tokens; attention-only ms per backend: "
        + ", ".join(f"{k}={v:.0f}" for k, v in probes.items())
    )
    backend = min(probes, key=probes.get)
    x = torch.randn(1, channels, t, h, w, device="cuda", dtype=torch.bfloat16)
    text = torch.randn(1, num_text, cfg.text_dim, device="cuda", dtype=torch.bfloat16)
    mask = torch.ones(1, num_text, dtype=torch.long, device="cuda")
    pooled = torch.randn(1, cfg.pooled_text_dim, device="cuda", dtype=torch.bfloat16)
    t_in = torch.tensor([900.0], device="cuda")
    guidance = torch.tensor([6016.0], device="cuda", dtype=torch.bfloat16)
    times = []
    with torch.no_grad(), sdpa_kernel([BACKENDS[backend]]):
        for i in range(repeats + 1):
            torch.cuda.synchronize()
            start = time.perf_counter()
            model(x, t_in, text, mask, pooled, guidance=guidance)
            torch.cuda.synchronize()
            if i > 0:  # the first call is the warm-up
                times.append(time.perf_counter() - start)
    seconds = min(times)
    flops = step_flops(model, num_image_tokens, num_text)
    print(
        f"  backend={backend} ms/step={seconds * 1e3:.0f} FLOPs={flops:.3e} "
        f"TFLOP/s={flops / seconds / 1e12:.0f} peak_mem_GiB={torch.cuda.max_memory_allocated() / 2**30:.1f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", nargs="+", default=["544x960x129", "720x1280x129"])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/transformer_gpu.py needs a CUDA GPU")
    print(f"device={torch.cuda.get_device_name()} torch={torch.__version__}")
    with torch.device("cuda"):
        model = HunyuanVideoTransformer(transformer_preset("hunyuan-video-t2v-720p"))
    model = model.to(torch.bfloat16).eval().requires_grad_(False)
    for size in args.sizes:
        height, width, frames = (int(v) for v in size.split("x"))
        time_step(model, height, width, frames, args.repeats)


if __name__ == "__main__":
    main()
