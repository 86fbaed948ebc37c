"""`hvbatch generate`: one prompt to one mp4 in a single process."""

from __future__ import annotations

import argparse
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
from hvbatch.parallel.dims import ParallelDims, build_groups
from hvbatch.parallel.plan import parse_degree
from hvbatch.parallel.planner import auto_ulysses
from hvbatch.sampling.sizes import latent_shape

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
    latent_shape(s.height, s.width, s.num_frames)


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


def generate_layout(config: Config, world_size: int, gpus_per_node: int) -> ParallelDims:
    """One video over all ranks: Ulysses inside a node (largest fitting divisor of the heads), ring across."""
    heads = config.model.transformer.num_heads
    ulysses = parse_degree(config.parallel.ulysses, "parallel.ulysses")
    ring = parse_degree(config.parallel.ring, "parallel.ring")
    if ulysses is None:
        ulysses = auto_ulysses(world_size // ring if ring else world_size, heads, gpus_per_node)
    dims = ParallelDims(
        dp=1, ulysses=ulysses, ring=ring or max(1, world_size // ulysses), world_size=world_size
    )
    dims.validate(heads)
    return dims


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


def generate_on_this_rank(request: GenerateRequest) -> None:
    """Run one generation as this process's rank (a single process when no distributed env is set)."""
    from hvbatch.parallel.launch import setup_rank, teardown_rank
    from hvbatch.parallel.runner import SequenceParallelTransformer
    from hvbatch.pipeline import Pipeline, Timings

    config = request.config
    setup = setup_rank(config.parallel, config.device)
    env, device, distributed = setup.env, setup.device, setup.distributed
    try:
        leader = env is None or env.rank == 0
        timings = Timings()
        pipeline = Pipeline.load(config, timings, device=device)
        if leader:
            print(f"attention: {pipeline.attention_backend}")
        if distributed:
            assert env is not None
            dims = generate_layout(config, env.world_size, env.local_world_size)
            if leader:
                print(
                    f"sequence parallel: ulysses {dims.ulysses} x ring {dims.ring} "
                    f"over {env.world_size} ranks"
                )
            timeout = timedelta(seconds=config.parallel.timeout_s)
            groups = build_groups(dims, env.rank, timeout)
            pipeline.transformer = SequenceParallelTransformer(pipeline.transformer, groups)
        generated = pipeline.generate(
            request.prompt, on_step=_progress if leader else None, timings=timings, decode=leader
        )
        if generated.truncated and leader:
            print("warning: the prompt was truncated at the text encoders' token limit", file=sys.stderr)
        if leader:
            _write_outputs(request, generated, timings, pipeline.device)
    finally:
        teardown_rank(setup)


def run_generate(args: argparse.Namespace) -> int:
    from hvbatch.parallel.launch import dist_env_from, spawn_local

    config = load_config(args.config, args.overrides)
    out = Path(args.out) if args.out else default_output(args.prompt, config.sampling.seed)
    latents_out = Path(args.save_latents) if args.save_latents else None
    _check_request(args.prompt, out, latents_out, config)
    request = GenerateRequest(args.prompt, out, latents_out, config)
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
        "--nproc",
        type=int,
        default=1,
        help="start this many local processes and split the video over them (sequence parallel: gloo on "
        "CPU, NCCL on GPUs); under torchrun or srun, leave it at 1",
    )
    parser.add_argument("--config", help="a YAML file merged over the defaults and the preset")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. model=tiny sampling.seed=3")
    parser.set_defaults(func=run_generate)
