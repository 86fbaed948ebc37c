"""`hvbatch generate`: one prompt to one mp4, in one process or over several ranks.

It takes the batch job's path for one video: the planner's layout for the ranks it runs on
(`parallel.mode=auto` means latency here: one node per video), `Pipeline.parallelize` (the
sequence- and CFG-parallel runner with `parallel.comm_dtype`, and the parallel VAE decode), then
`Pipeline.generate`.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import os
import re
import sys
import tempfile
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from hvbatch.config import Config, load_config, save_config
from hvbatch.models.family import family_of
from hvbatch.parallel.dims import ParallelDims
from hvbatch.parallel.plan import layout_for_job

if TYPE_CHECKING:
    from hvbatch.pipeline import GeneratedVideo, Timings

# The model, launch and video modules (torch, safetensors, imageio) are imported where a video is
# made, so that `hvbatch --help` and the argument checks do not wait for torch.


def default_output(prompt: str, seed: int) -> Path:
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:48] or "video"
    return Path("outputs") / f"{slug}-seed{seed}.mp4"


def _progress(step: int, total: int) -> None:
    filled = int(30 * step / total)
    print(f"\rdenoise [{'#' * filled}{'.' * (30 - filled)}] {step}/{total}", end="", file=sys.stderr)
    if step == total:
        print(file=sys.stderr)


def _check_writable(option: str, path: Path) -> None:
    """`path` can be created: its nearest existing folder takes a file (tried, not guessed from modes)."""
    if path.is_dir():
        raise ValueError(f"{option} {path} is a directory; give a file name")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        if not folder.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "not a directory", str(folder))
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise ValueError(
            f"{option} {path}: cannot write in {folder} ({err.strerror or err}); choose a writable place"
        ) from err


def _check_request(prompt: str, out: Path, latents_out: Path | None, config: Config) -> None:
    """Everything a user can get wrong, checked before any weights are loaded."""
    if not prompt.strip():
        raise ValueError("--prompt is empty: give the text of the video to generate")
    if out.suffix.lower() != ".mp4":
        raise ValueError(f"--out {out} must end in .mp4")
    if latents_out is not None and latents_out.suffix != ".safetensors":
        raise ValueError(f"--save-latents {latents_out} must end in .safetensors")
    _check_writable("--out", out)
    if latents_out is not None:
        _check_writable("--save-latents", latents_out)
    s = config.sampling
    family_of(config.model).geometry.latent_shape(s.height, s.width, s.num_frames)


def _save_latents(latents_path: Path, generated_latents: object) -> None:
    from safetensors.torch import save_file

    tmp = latents_path.with_name(f".{latents_path.name}.tmp")
    latents_path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"latents": generated_latents.contiguous()}, str(tmp))  # type: ignore[attr-defined]
    tmp.replace(latents_path)


@dataclass(frozen=True)
class GenerateRequest:
    prompt: str
    out: Path
    latents_out: Path | None
    config: Config
    image: bytes | None = None
    """`--image`: the input image file's bytes (image-to-video), read and checked before loading."""


def generate_layout(config: Config, world_size: int, local_world_size: int) -> ParallelDims:
    """The layout one video runs with on these ranks: the batch job's planner, `parallel.mode=auto`
    meaning latency (a whole node per video; explicit `parallel.*` degrees are respected)."""
    return layout_for_job(config, config.sampling, world_size, local_world_size, auto_mode="latency")


def _layout_line(dims: ParallelDims, parallel_decode: bool) -> str:
    cfg = f" x cfg {dims.cfg}" if dims.cfg > 1 else ""
    line = (
        f"layout: dp {dims.dp}{cfg} x ulysses {dims.ulysses} x ring {dims.ring} over {dims.world_size} ranks"
    )
    if parallel_decode:
        line += f"; VAE decode split over the video's {dims.video} ranks"
    if dims.dp > 1:
        line += (
            f"\nnote: {dims.world_size - dims.video} of the {dims.world_size} ranks wait: generate makes one "
            f"video and the layout gives it {dims.video} (parallel.mode=latency or larger parallel.ulysses, "
            "ring or cfg give it more)"
        )
    return line


def _write_outputs(
    request: GenerateRequest, generated: GeneratedVideo, timings: Timings, device: object
) -> None:
    from hvbatch.video import write_mp4

    assert generated.frames is not None
    config = request.config
    with timings.measure("write", device):  # type: ignore[arg-type]
        write_mp4(generated.frames, request.out, config.video)
        if request.latents_out is not None:
            _save_latents(request.latents_out, generated.latents)
        save_config(config, request.out.with_suffix(".yaml"))
    frames = generated.frames
    print(
        f"wrote {request.out} ({frames.shape[0]} frames, {frames.shape[2]}x{frames.shape[1]}, "
        f"{config.video.fps} fps)"
    )
    print(f"timing: {timings.summary()}")


def _input_image(image_path: str, config: Config, overrides: list[str]) -> tuple[bytes, Config]:
    """`--image`: the file read and checked, and the config with the video's size: the bucket of the
    image's aspect ratio at the preset's resolution, unless `sampling.height=` / `sampling.width=`
    are given on the command line (then the image is resized and centre-cropped to them)."""
    from hvbatch.images import ImageError, ImageRef, read_bytes, resolve_path
    from hvbatch.images import load_bytes as load_image_bytes

    family = family_of(config.model)
    refusal = family.no_images_reason(config.model)
    if refusal is not None or family.image_input is None:
        raise ValueError(f"--image {image_path}: {refusal}")
    spec = family.image_input
    try:
        data = read_bytes(ImageRef(image_path, None), ".")
        loaded = load_image_bytes(data, source=image_path, min_side=spec.min_side, label=image_path)
    except ImageError as err:
        raise ValueError(f"--image {resolve_path(image_path, '.')}: {err.kind.value}: {err.reason}") from None
    sized = [o for o in overrides if o.split("=", 1)[0] in ("sampling.height", "sampling.width")]
    if len(sized) == 2:
        return data, config
    if sized:
        raise ValueError("--image: give both sampling.height= and sampling.width=, or neither (the bucket)")
    height, width = spec.sizing.bucket(loaded.info.width, loaded.info.height, spec.resolution(config.model))
    sampling = dataclasses.replace(config.sampling, height=height, width=width)
    return data, dataclasses.replace(config, sampling=sampling)


def _fitted_image(request: GenerateRequest) -> object:
    """The request's input image fitted to its video (an `images.InputImage`), or None."""
    if request.image is None:
        return None
    from hvbatch.images import InputImage, content_hash, decode

    spec = family_of(request.config.model).image_input
    assert spec is not None  # checked by `_input_image`
    s = request.config.sampling
    return InputImage(content_hash(request.image), spec.sizing.fit(decode(request.image), s.height, s.width))


def generate_on_this_rank(request: GenerateRequest) -> None:
    """Run one generation as this process's rank (a single process when no distributed env is set)."""
    from hvbatch.parallel.dims import build_groups, destroy_groups
    from hvbatch.parallel.launch import setup_rank, teardown_rank
    from hvbatch.pipeline import Pipeline, Timings

    config = request.config
    setup = setup_rank(config.parallel, config.device)
    env, device = setup.env, setup.device
    try:
        world = env.world_size if env else 1
        dims = generate_layout(config, world, env.local_world_size if env else 1)
        timings = Timings()
        pipeline = Pipeline.load(config, timings, device=device)
        groups = build_groups(dims, setup.rank, timedelta(seconds=config.parallel.timeout_s))
        pipeline.parallelize(groups, env.local_world_size if env else 1)
        leader = groups.is_sp_leader and groups.dp_index == 0  # the video's leader decodes and writes
        if setup.rank == 0:
            print(f"attention: {pipeline.attention_backend}")
            print(_layout_line(dims, len(groups.video_ranks) > 1))
        if groups.dp_index == 0:  # the other dp replicas have no video to make
            generated = pipeline.generate(
                request.prompt,
                on_step=_progress if leader else None,
                timings=timings,
                image=_fitted_image(request),  # type: ignore[arg-type]
            )
            if generated.truncated and leader:
                print("warning: the prompt was truncated at the text encoders' token limit", file=sys.stderr)
            if leader:
                _write_outputs(request, generated, timings, pipeline.device)
        pipeline.unparallelize()
        destroy_groups(groups)
    finally:
        teardown_rank(setup)


def run_generate(args: argparse.Namespace) -> int:
    from hvbatch.parallel.launch import dist_env_from, spawn_local

    config = load_config(args.config, args.overrides)
    image = None
    if args.image:
        image, config = _input_image(args.image, config, list(args.overrides))
    out = Path(args.out) if args.out else default_output(args.prompt, config.sampling.seed)
    latents_out = Path(args.save_latents) if args.save_latents else None
    _check_request(args.prompt, out, latents_out, config)
    request = GenerateRequest(args.prompt, out, latents_out, config, image)
    if args.nproc > 1:
        env = dist_env_from(os.environ)
        if env is not None and env.world_size > 1:
            raise ValueError("--nproc starts its own processes: do not combine it with torchrun or srun")
        generate_layout(config, args.nproc, args.nproc)  # refuse a bad layout before starting anything
        spawn_local(args.nproc, generate_on_this_rank, request)
    else:
        generate_on_this_rank(request)
    return 0


def add_generate_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "generate",
        help="one prompt to one mp4 in this process",
        description="Generate one video. Settings come from the config tree: e.g. model=tiny "
        "sampling.height=544 sampling.width=960 sampling.num_frames=129 sampling.seed=3.",
    )
    parser.add_argument("--prompt", required=True, help="the text of the video")
    parser.add_argument("--out", help="output .mp4 (default: outputs/<prompt>-seed<seed>.mp4)")
    parser.add_argument("--save-latents", help="also write the final latents to this .safetensors file")
    parser.add_argument(
        "--image",
        help="input image (PNG, JPEG, WebP) for an image-to-video model: the video's size is the bucket "
        "of its aspect ratio, unless sampling.height= and sampling.width= are given",
    )
    parser.add_argument(
        "--nproc",
        type=int,
        default=1,
        help="start this many local processes and split the video over them (sequence parallel: gloo on "
        "CPU, NCCL on GPUs); under torchrun or srun, leave it at 1",
    )
    parser.add_argument("--config", help="a YAML file merged over the defaults and the preset")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. model=tiny sampling.seed=3")
    parser.set_defaults(func=run_generate)
