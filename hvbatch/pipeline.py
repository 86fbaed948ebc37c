"""Prompt in, video frames out, in one process: text encoders, transformer sampler and VAE.

Loaded once (`Pipeline.load`: the configured model family builds its components), then `generate`
runs per prompt. `hvbatch generate` and the batch jobs both use it, and both apply a parallel layout
through `Pipeline.parallelize` (the sequence-/CFG-parallel runner and the parallel VAE decode).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from hvbatch.config import Config, SamplingConfig
from hvbatch.models.encoding import EncodedPrompts, PromptStore
from hvbatch.models.family import ModelFamily, family_of, folder_family_problem
from hvbatch.models.protocols import Conditioning, PromptEncoder, StagedTransformer, VideoVae
from hvbatch.models.runtime import configure_transformer
from hvbatch.models.vae_tiling import VaeTilingConfig
from hvbatch.parallel.attention import resolve_comm_dtype
from hvbatch.parallel.dims import ParallelGroups
from hvbatch.parallel.runner import Runner, parallelize, unparallelize
from hvbatch.parallel.vae_decode import video_decoder
from hvbatch.sampling import new_step_cache, sample
from hvbatch.video import frames_to_uint8

if TYPE_CHECKING:
    from hvbatch.images import InputImage


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
class VideoConditioning:
    """One video's conditioning (the family's objects), ready for the sampler."""

    positive: Conditioning
    negative: Conditioning | None
    """The negative prompt's, with true CFG (`cfg_scale > 1`)."""
    truncated: bool


def negative_text(sampling: SamplingConfig) -> str:
    return sampling.negative_prompt or " "


def negative_key(key: Hashable) -> Hashable:
    """The store key of a negative prompt's encoding: apart from a positive prompt of the same text
    (a family may encode negatives otherwise, e.g. without their quoted text)."""
    return ("negative", key)


VideoDecoder = Callable[[VideoVae, torch.Tensor, VaeTilingConfig], "torch.Tensor | None"]
"""`decoder(vae, latents, tiling)` -> float32 video in [0, 1]; None on a rank that only helps decode."""


def decode_here(vae: VideoVae, latents: torch.Tensor, tiling: VaeTilingConfig) -> torch.Tensor:
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
    """The components of the configured model family, and how one video is made with them."""

    def __init__(
        self,
        transformer: StagedTransformer | Runner,
        vae: VideoVae,
        text_encoder: PromptEncoder,
        config: Config,
        device: torch.device,
    ) -> None:
        self.transformer, self.vae, self.text_encoder = transformer, vae, text_encoder
        self.config, self.device = config, device
        self.family: ModelFamily = family_of(config.model)
        self.attention_backend = ""
        """The attention kernel the transformer runs, in words (e.g. `cudnn (auto)`); set by `load`."""
        self.decoder: VideoDecoder = decode_here
        """Latents -> video; `parallelize` installs one that splits the tiles over the video's ranks."""

    @classmethod
    def load(
        cls, config: Config, timings: Timings | None = None, device: torch.device | None = None
    ) -> Pipeline:
        """Build the configured family's components (`ModelFamily.load`) on `device` and configure
        the transformer's attention kernel, quantization and compilation."""
        device = device or resolve_device(config.device)
        timings = timings or Timings()
        problems = family_of(config.model).run_problems(config.model)
        problem = "; ".join(problems) if problems else folder_family_problem(config.model)
        if problem is not None:
            raise ValueError(problem)
        with timings.measure("load", device):
            components = family_of(config.model).load(config.model, device)
            backend = configure_transformer(components.transformer, config.model, device)
        pipeline = cls(components.transformer, components.vae, components.text_encoder, config, device)
        pipeline.attention_backend = backend
        return pipeline

    def parallelize(self, groups: ParallelGroups, gpus_per_node: int) -> None:
        """Run this rank's part of `groups`' layout: the transformer wrapped for sequence and/or CFG
        parallelism (attention transfers in `parallel.comm_dtype`, `auto` resolved for the layout on
        nodes of `gpus_per_node`), and the VAE decode split over the video's ranks. The batch job (per
        shard) and `hvbatch generate` both go through here."""
        comm_dtype = resolve_comm_dtype(self.config.parallel.comm_dtype, groups.dims, gpus_per_node)
        self.transformer = parallelize(self.transformer, groups, comm_dtype)
        self.decoder = video_decoder(groups) or decode_here

    def unparallelize(self) -> None:
        """Back to the one-rank transformer and decoder (before another layout is applied)."""
        self.transformer = unparallelize(self.transformer)
        self.decoder = decode_here

    def encode(
        self, prompts: list[str], num_frames: int, *, allow_blank: bool = False,
        images: list[InputImage | None] | None = None,
    ) -> EncodedPrompts:  # fmt: skip
        """The prompts' encoding; `images` reach a text encoder that reads them with the prompt
        (one with `takes_images = True`, as a multimodal text encoder), else only key the cache."""
        if images and any(images) and getattr(self.text_encoder, "takes_images", False):
            return self.text_encoder.encode(prompts, num_frames, allow_blank=allow_blank, images=images)  # type: ignore[call-arg]
        return self.text_encoder.encode(prompts, num_frames, allow_blank=allow_blank)

    def prompt_key(self, prompt: str, num_frames: int, image: InputImage | None = None) -> object:
        """The prompt-encoding cache key: the text encoder's, with the image's sha256 when there is one."""
        key = self.text_encoder.key(prompt, num_frames)
        return key if image is None else (key, "image", image.sha256)

    def encode_prompts(
        self, requests: list[tuple[str, SamplingConfig]], store: PromptStore,
        images: list[InputImage | None] | None = None,
    ) -> int:  # fmt: skip
        """Encode what `store` lacks for these videos (prompt, and the negative prompt with true CFG),
        each distinct (prompt, image) once; returns how many were encoded. `images`: each request's
        input image (None for text-to-video). The text encoders come to the device
        for it and, with `model.text_encoder_offload=cpu`, go back to host memory afterwards. An
        encoding that raises is kept in `store.errors` (raised again by `conditioning`)."""
        key, frames_of = self.prompt_key, self.text_encoder.encoding_frames
        wanted: dict[object, tuple[str, int, InputImage | None]] = {}
        negatives = set()
        for i, (prompt, sampling) in enumerate(requests):
            image = images[i] if images else None
            frames = frames_of(sampling.num_frames)
            wanted.setdefault(key(prompt, sampling.num_frames, image), (prompt, frames, image))
            if sampling.cfg_scale > 1.0:  # the negative prompt: without the image (the family's choice)
                negative = negative_text(sampling)
                negatives.add(negative_key(key(negative, sampling.num_frames)))
                wanted.setdefault(negative_key(key(negative, sampling.num_frames)), (negative, frames, None))
        todo = store.missing(list(wanted))
        if not todo:
            return 0
        self.text_encoder.to(self.device)
        try:
            for k in todo:
                prompt, num_frames, image = wanted[k]
                try:
                    allow = k in negatives
                    store.put(k, self.encode([prompt], num_frames, allow_blank=allow, images=[image]))
                except Exception as err:  # the video that needs it fails, not the whole window
                    store.errors[k] = err
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
        self, prompt: str, sampling: SamplingConfig, store: PromptStore | None = None,
        image: InputImage | None = None,
    ) -> VideoConditioning:  # fmt: skip
        """The video's conditioning from `store` (encoded now if missing), on the CPU."""
        store = PromptStore() if store is None else store
        keys = [self.prompt_key(prompt, sampling.num_frames, image)]
        if sampling.cfg_scale > 1.0:
            keys.append(negative_key(self.prompt_key(negative_text(sampling), sampling.num_frames)))
        if any(k not in store.entries and k not in store.errors for k in keys):
            self.encode_prompts([(prompt, sampling)], store, [image])  # a failed encoding is not retried here
        positive = store.get(keys[0])
        negative = store.get(keys[1]) if sampling.cfg_scale > 1.0 else None
        assert positive is not None and (negative is not None or sampling.cfg_scale <= 1.0)
        return VideoConditioning(
            positive.conditioning, negative and negative.conditioning, positive.truncated[0]
        )

    def tiling(self) -> VaeTilingConfig:
        v = self.config.vae
        return VaeTilingConfig(
            enabled=v.tiling,
            tile_latent_size=v.tile_latent_size,
            tile_latent_overlap=v.tile_latent_overlap,
            tile_latent_frames=v.tile_latent_frames,
            tile_latent_frame_overlap=v.tile_latent_frame_overlap,
            **self.family.vae_tiling,
        )

    # -- image-to-video: the input image threaded through (the family conditions on it) -----------

    def check_image(self, image: InputImage | None, sampling: SamplingConfig) -> None:
        """An input image this family can take, fitted to the video's size; ValueError otherwise."""
        if image is None:
            return
        spec = self.family.image_input
        refusal = self.family.no_images_reason(self.config.model)
        if refusal is not None:
            raise ValueError(f"this video has an input image, but {refusal}")
        if spec is None or spec.condition is None:
            raise ValueError(
                f"model family {self.family.name} ({self.family.description}) has no image-to-video "
                "sampling wired yet: this video has an input image; drop it for text-to-video"
            )
        if image.size != (sampling.height, sampling.width):
            raise ValueError(
                f"the input image is {image.size[0]}x{image.size[1]} (h x w), the video "
                f"{sampling.height}x{sampling.width}: fit it first (`ImageSizing.fit`)"
            )

    def image_conditioning(
        self, conditioning: VideoConditioning, image: InputImage | None, sampling: SamplingConfig
    ) -> VideoConditioning:
        """The video's conditioning with its input image in it (the family's `ImageInput.condition`)."""
        if image is None:
            return conditioning
        spec = self.family.image_input
        assert spec is not None and spec.condition is not None  # check_image ran first
        return spec.condition(self, conditioning, image, sampling)  # type: ignore[no-any-return]

    def check_sampling(self, sampling: SamplingConfig) -> None:
        """A video's size and settings as the family takes them; ValueError naming every problem."""
        self.family.geometry.latent_shape(sampling.height, sampling.width, sampling.num_frames)
        problems = self.family.sampling_problems(self.config.model, sampling)
        if problems:
            raise ValueError("invalid sampling settings for this model: " + "; ".join(problems))

    @torch.no_grad()
    def generate(
        self,
        prompt: str,
        sampling: SamplingConfig | None = None,
        *,
        on_step: Callable[[int, int], None] | None = None,
        timings: Timings | None = None,
        decode: bool = True,
        conditioning: VideoConditioning | None = None,
        image: InputImage | None = None,
    ) -> GeneratedVideo:
        """`conditioning` precomputed (the batch job's encoding window), else encoded here; `image`:
        the video's input image (image-to-video), fitted to its size."""
        sampling = sampling or self.config.sampling
        timings = timings or Timings()
        self.check_sampling(sampling)  # fail before any work
        self.check_image(image, sampling)
        if conditioning is None:
            with timings.measure("encode", self.device):
                conditioning = self.conditioning(prompt, sampling, image=image)
        if image is not None:
            with timings.measure("encode", self.device):
                conditioning = self.image_conditioning(conditioning, image, sampling)
        step_cache = new_step_cache(sampling, self.family.step_cache.teacache_coefficients)
        with timings.measure("denoise", self.device):
            latents = sample(
                self.transformer,
                conditioning.positive,
                sampling,
                geometry=self.family.geometry,
                negative=conditioning.negative,
                device=self.device,
                on_step=on_step,
                step_cache=step_cache,
                convention=self.family.sampler_convention(),
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
