"""Prompt in, video frames out, in one process: text encoders, transformer sampler and VAE.

Loaded once (`Pipeline.load`), then `generate` runs per prompt. `hvbatch generate` and the batch
jobs both use it; the sequence-parallel runner swaps the transformer's attention from outside.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from hvbatch.config import Config, ModelConfig, SamplingConfig, torch_dtype
from hvbatch.models import HunyuanVideoTransformer, load_transformer, random_transformer
from hvbatch.models.runtime import configure_transformer
from hvbatch.models.vae import AutoencoderKLCausal3D, VaeConfig
from hvbatch.models.vae_loading import load_vae
from hvbatch.models.vae_tiling import VaeTilingConfig
from hvbatch.sampling import TextConditioning, latent_shape, new_step_cache, sample
from hvbatch.text_encoders import (
    EncodedPrompts,
    HunyuanTextEncoder,
    PromptStore,
    conditioning_key,
    load_text_encoder,
    tiny_text_encoder,
)
from hvbatch.video import frames_to_uint8

# The tiny preset's VAE: the released structure (4 levels, causal 3D convs, mid attention) at
# a width that decodes a small video on a CPU in about a second.
TINY_VAE = VaeConfig(block_out_channels=(8, 16, 32, 32), layers_per_block=1, norm_num_groups=4)

EXPECTED_LAYOUT = (
    "model.path must be either the official ckpts/ folder "
    "(hunyuan-video-t2v-720p/transformers/mp_rank_00_model_states.pt, hunyuan-video-t2v-720p/vae/, "
    "text_encoder/, text_encoder_2/) or a diffusers HunyuanVideo folder (transformer/, vae/, "
    "text_encoder/, tokenizer/, text_encoder_2/, tokenizer_2/); model.transformer_path, model.vae_path, "
    "model.text_encoder_path and model.text_encoder_2_path override single components"
)


@dataclass
class ComponentPaths:
    transformer: Path
    vae: Path
    text_encoder: Path
    text_encoder_2: Path
    tokenizer: Path | None = None
    tokenizer_2: Path | None = None


def layout_under(root: Path) -> dict[str, Path]:
    """Component folders implied by a weights root of either layout (empty if neither)."""
    if (root / "transformer").is_dir():
        names = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
        return {name: root / name for name in names}
    official = root / "hunyuan-video-t2v-720p"
    if official.is_dir():
        return {
            "transformer": official / "transformers" / "mp_rank_00_model_states.pt",
            "vae": official / "vae",
            "text_encoder": root / "text_encoder",
            "text_encoder_2": root / "text_encoder_2",
        }
    return {}


def resolve_paths(model: ModelConfig) -> ComponentPaths:
    """Where each component's weights are; every missing one is named in one error."""
    found = layout_under(Path(model.path).expanduser()) if model.path else {}
    if model.path and not found:
        raise ValueError(f"model.path={model.path} is not a recognised weights folder: {EXPECTED_LAYOUT}")
    overrides = {
        "transformer": model.transformer_path,
        "vae": model.vae_path,
        "text_encoder": model.text_encoder_path,
        "text_encoder_2": model.text_encoder_2_path,
    }
    tokenizer_of = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}
    for name, value in overrides.items():
        if value:
            found[name] = Path(value).expanduser()
            if name in tokenizer_of:  # an overridden encoder folder carries its own tokenizer
                found.pop(tokenizer_of[name], None)
    missing = [
        f"{name} (looked in {found[name]})" if name in found else name
        for name in overrides
        if name not in found or not found[name].exists()
    ]
    if missing:
        raise ValueError(f"model weights not found: {', '.join(missing)}. {EXPECTED_LAYOUT}")
    return ComponentPaths(**{k: v for k, v in found.items() if v.exists()})


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass
class Timings:
    seconds: dict[str, float] = field(default_factory=dict)

    def measure(self, stage: str, device: torch.device) -> _Stage:
        return _Stage(self, stage, device)

    def summary(self) -> str:
        total = sum(self.seconds.values())
        parts = ", ".join(f"{name} {value:.2f}s" for name, value in self.seconds.items())
        return f"{parts}; total {total:.2f}s"


class _Stage:
    def __init__(self, timings: Timings, stage: str, device: torch.device) -> None:
        self.timings, self.stage, self.device = timings, stage, device

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elapsed = time.perf_counter() - self.start
        self.timings.seconds[self.stage] = self.timings.seconds.get(self.stage, 0.0) + elapsed


@dataclass
class Conditioning:
    """One video's text conditioning, ready for the sampler."""

    positive: TextConditioning
    negative: TextConditioning | None
    """The negative prompt's, with true CFG (`cfg_scale > 1`)."""
    truncated: bool


def negative_text(sampling: SamplingConfig) -> str:
    return sampling.negative_prompt or " "


VideoDecoder = Callable[[AutoencoderKLCausal3D, torch.Tensor, VaeTilingConfig], "torch.Tensor | None"]
"""`decoder(vae, latents, tiling)` -> float32 video in [0, 1]; None on a rank that only helps decode."""


def decode_here(vae: AutoencoderKLCausal3D, latents: torch.Tensor, tiling: VaeTilingConfig) -> torch.Tensor:
    """The default decoder: the whole (tiled) decode on this rank."""
    return vae.decode_latents(latents, tiling)


@dataclass
class GeneratedVideo:
    latents: torch.Tensor
    """Final latents `[1, C, T, Hh, Ww]`, float32, on the CPU."""
    frames: np.ndarray | None
    """`[F, H, W, 3]` uint8; None when decoding was skipped, and on every rank of a video but its leader."""
    truncated: bool
    """The prompt was cut at the text encoders' token limit."""
    timings: Timings
    steps_computed: int | None = None
    """Denoising steps the transformer computed (all of them without step caching)."""
    steps_skipped: int | None = None
    """Steps that reused the cached residual (`sampling.cache`); 0 without step caching."""


class Pipeline:
    def __init__(
        self,
        transformer: torch.nn.Module,
        vae: AutoencoderKLCausal3D,
        text_encoder: HunyuanTextEncoder,
        config: Config,
        device: torch.device,
    ) -> None:
        self.transformer, self.vae, self.text_encoder = transformer, vae, text_encoder
        self.config, self.device = config, device
        self.attention_backend = ""
        """The attention kernel the transformer runs, in words (e.g. `cudnn (auto)`); set by `load`."""
        self.decoder: VideoDecoder = decode_here
        """Latents -> video; `hvbatch.parallel.vae_decode` installs one that splits the tiles over a group."""

    @classmethod
    def load(
        cls, config: Config, timings: Timings | None = None, device: torch.device | None = None
    ) -> Pipeline:
        device = device or resolve_device(config.device)
        timings = timings or Timings()
        with timings.measure("load", device):
            transformer, vae, text_encoder = _load_components(config.model, device)
            backend = configure_transformer(transformer, config.model, device)
        pipeline = cls(transformer, vae, text_encoder, config, device)
        pipeline.attention_backend = backend
        return pipeline

    def encode(self, prompts: list[str], num_frames: int, *, allow_blank: bool = False) -> EncodedPrompts:
        return self.text_encoder.encode(prompts, num_frames, allow_blank=allow_blank)

    def encode_prompts(self, requests: list[tuple[str, SamplingConfig]], store: PromptStore) -> int:
        """Encode what `store` lacks for these videos (prompt, and the negative prompt with true CFG),
        each distinct one once; returns how many were encoded. The text encoders come to the device
        for it and, with `model.text_encoder_offload=cpu`, go back to host memory afterwards. An
        encoding that raises is kept in `store.errors` (raised again by `conditioning`)."""
        keys, negatives = [], set()
        for prompt, sampling in requests:
            keys.append(conditioning_key(prompt, sampling.num_frames))
            if sampling.cfg_scale > 1.0:
                negatives.add(conditioning_key(negative_text(sampling), sampling.num_frames))
                keys.append(conditioning_key(negative_text(sampling), sampling.num_frames))
        todo = store.missing(keys)
        if not todo:
            return 0
        self.text_encoder.to(self.device)
        try:
            for key in todo:
                prompt, video = key
                try:
                    store.put(key, self.encode([prompt], 2 if video else 1, allow_blank=key in negatives))
                except Exception as err:  # the video that needs it fails, not the whole window
                    store.errors[key] = err
        finally:
            self.release_text_encoders()
        return len(todo)

    def release_text_encoders(self) -> None:
        """Move the text encoders to host memory if `model.text_encoder_offload` says so (GPU only)."""
        if self.config.model.text_encoder_offload == "cpu" and self.device.type != "cpu":
            self.text_encoder.to(torch.device("cpu"))
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def conditioning(
        self, prompt: str, sampling: SamplingConfig, store: PromptStore | None = None
    ) -> Conditioning:
        """The video's conditioning from `store` (encoded now if missing), on the CPU."""
        store = PromptStore() if store is None else store
        keys = [conditioning_key(prompt, sampling.num_frames)]
        if sampling.cfg_scale > 1.0:
            keys.append(conditioning_key(negative_text(sampling), sampling.num_frames))
        if any(key not in store.entries and key not in store.errors for key in keys):
            self.encode_prompts([(prompt, sampling)], store)  # a failed encoding is not retried here
        positive = store.get(conditioning_key(prompt, sampling.num_frames))
        negative = None
        if sampling.cfg_scale > 1.0:
            negative = store.get(conditioning_key(negative_text(sampling), sampling.num_frames))
        assert positive is not None and (negative is not None or sampling.cfg_scale <= 1.0)
        return Conditioning(positive.conditioning, negative and negative.conditioning, positive.truncated[0])

    def tiling(self) -> VaeTilingConfig:
        v = self.config.vae
        return VaeTilingConfig(
            enabled=v.tiling,
            tile_latent_size=v.tile_latent_size,
            tile_latent_overlap=v.tile_latent_overlap,
            tile_latent_frames=v.tile_latent_frames,
            tile_latent_frame_overlap=v.tile_latent_frame_overlap,
        )

    @torch.no_grad()
    def generate(
        self,
        prompt: str,
        sampling: SamplingConfig | None = None,
        *,
        on_step: Callable[[int, int], None] | None = None,
        timings: Timings | None = None,
        decode: bool = True,
        conditioning: Conditioning | None = None,
    ) -> GeneratedVideo:
        """`conditioning` precomputed (the batch job's encoding window), else encoded here."""
        sampling = sampling or self.config.sampling
        timings = timings or Timings()
        latent_shape(sampling.height, sampling.width, sampling.num_frames)  # fail before any work
        if conditioning is None:
            with timings.measure("encode", self.device):
                conditioning = self.conditioning(prompt, sampling)
        step_cache = new_step_cache(sampling)
        with timings.measure("denoise", self.device):
            latents = sample(
                self.transformer,
                conditioning.positive,
                sampling,
                negative=conditioning.negative,
                latent_channels=self.transformer.config.in_channels,
                device=self.device,
                on_step=on_step,
                step_cache=step_cache,
            )
        if not torch.isfinite(latents).all():
            raise FloatingPointError("the denoised latents contain NaN or Inf")
        frames = None
        if decode:
            with timings.measure("decode", self.device):
                video = self.decoder(self.vae, latents, self.tiling())
                if video is not None and not torch.isfinite(video).all():
                    raise FloatingPointError("the decoded video contains NaN or Inf")
                frames = None if video is None else frames_to_uint8(video)
        steps = sampling.num_inference_steps
        computed, skipped = (steps, 0) if step_cache is None else (step_cache.computed, step_cache.skipped)
        return GeneratedVideo(latents.cpu(), frames, conditioning.truncated, timings, computed, skipped)


def _load_components(
    model: ModelConfig, device: torch.device
) -> tuple[HunyuanVideoTransformer, AutoencoderKLCausal3D, HunyuanTextEncoder]:
    dtype = torch_dtype(model.dtype)
    if model.random_weights:
        seed = model.random_seed
        transformer = random_transformer(model.transformer, seed=seed, dtype=dtype, device=device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 1)
            vae = AutoencoderKLCausal3D(TINY_VAE)
        vae = vae.to(device=device, dtype=torch_dtype(model.vae_dtype)).eval().requires_grad_(False)
        text_encoder = tiny_text_encoder(
            model.transformer.text_dim,
            model.transformer.pooled_text_dim,
            seed=seed + 2,
            settings=model.text_encoder,
        )
        text_encoder.llm.to(device=device, dtype=torch_dtype(model.text_encoder_dtype))
        text_encoder.clip.to(device=device, dtype=torch_dtype(model.text_encoder_dtype))
        return transformer, vae, text_encoder
    paths = resolve_paths(model)
    # A diffusers folder brings its architecture in config.json; official files use the preset's.
    transformer = load_transformer(
        paths.transformer,
        dtype=dtype,
        device=device,
        config=model.transformer,
        load_key=model.transformer_load_key,
    )
    vae = load_vae(paths.vae, dtype=torch_dtype(model.vae_dtype), device=device)
    text_encoder = load_text_encoder(
        paths.text_encoder,
        paths.text_encoder_2,
        llm_tokenizer_dir=paths.tokenizer,
        clip_tokenizer_dir=paths.tokenizer_2,
        settings=model.text_encoder,
        dtype=torch_dtype(model.text_encoder_dtype),
        device=device,
    )
    return transformer, vae, text_encoder
