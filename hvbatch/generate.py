"""`hvbatch generate`: one prompt to one mp4 in a single process."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from safetensors.torch import save_file

from hvbatch.config import Config, load_config, save_config
from hvbatch.pipeline import Pipeline, Timings
from hvbatch.sampling import latent_shape
from hvbatch.video import write_mp4


def default_output(prompt: str, seed: int) -> Path:
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:48] or "video"
    return Path("outputs") / f"{slug}-seed{seed}.mp4"


def _progress(step: int, total: int) -> None:
    filled = int(30 * step / total)
    print(f"\rdenoise [{'#' * filled}{'.' * (30 - filled)}] {step}/{total}", end="", file=sys.stderr)
    if step == total:
        print(file=sys.stderr)


def _check_request(prompt: str, out: Path, latents_out: Path | None, config: Config) -> None:
    """Everything a user can get wrong, checked before any weights are loaded."""
    if not prompt.strip():
        raise ValueError("--prompt is empty: give the text of the video to generate")
    if out.suffix.lower() != ".mp4":
        raise ValueError(f"--out {out} must end in .mp4")
    if latents_out is not None and latents_out.suffix != ".safetensors":
        raise ValueError(f"--save-latents {latents_out} must end in .safetensors")
    s = config.sampling
    latent_shape(s.height, s.width, s.num_frames)


def _save_latents(latents_path: Path, generated_latents: object) -> None:
    tmp = latents_path.with_name(f".{latents_path.name}.tmp")
    latents_path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"latents": generated_latents.contiguous()}, str(tmp))  # type: ignore[attr-defined]
    tmp.replace(latents_path)


def run_generate(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)
    out = Path(args.out) if args.out else default_output(args.prompt, config.sampling.seed)
    latents_out = Path(args.save_latents) if args.save_latents else None
    _check_request(args.prompt, out, latents_out, config)
    timings = Timings()
    pipeline = Pipeline.load(config, timings)
    generated = pipeline.generate(args.prompt, on_step=_progress, timings=timings)
    if generated.truncated:
        print("warning: the prompt was truncated at the text encoders' token limit", file=sys.stderr)
    with timings.measure("write", pipeline.device):
        write_mp4(generated.frames, out, config.video)
        if latents_out is not None:
            _save_latents(latents_out, generated.latents)
        save_config(config, out.with_suffix(".yaml"))
    print(
        f"wrote {out} ({generated.frames.shape[0]} frames, {generated.frames.shape[2]}x"
        f"{generated.frames.shape[1]}, {config.video.fps} fps)"
    )
    print(f"timing: {timings.summary()}")
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
    parser.add_argument("--config", help="a YAML file merged over the defaults and the preset")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. model=tiny sampling.seed=3")
    parser.set_defaults(func=run_generate)
