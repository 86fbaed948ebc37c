"""Doctor checks of this machine: the parallel plan against the GPUs, ffmpeg, the run directory.

Output size estimate (`estimated_video_bytes`): x264 at crf 23 spends about 0.15 bits per pixel
per frame on generated video, twice as many for every 6 crf lower (crf 17, the default: ~0.3);
720p x 129 frames at crf 17 is then ~4.5 MB. Rough on purpose: it sizes the free space check.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from hvbatch.config import Config
from hvbatch.doctor.checks import Check, one_line

if TYPE_CHECKING:
    import pyarrow as pa

    from hvbatch.parallel.planner import ParallelPlan

BITS_PER_PIXEL_AT_CRF_23 = 0.15
CRF_STEPS_PER_DOUBLING = 6.0
GIB = 1024**3


def check_plan_and_gpus(config: Config, videos: pa.Table | None = None) -> list[Check]:
    """The parallel plan (as `hvbatch plan` makes it), then the GPUs visible here against it."""
    try:
        plan = _plan(config, videos)
    except ValueError as err:
        fix = "follow the message, or see `hvbatch plan` (a smaller video, more GPUs per video, fp8)"
        return [Check("plan", "fail", one_line(str(err)), fix)]
    memory = plan.memory
    detail = (
        f"dp {plan.dp} x ulysses {plan.ulysses} x ring {plan.ring} on {plan.num_nodes} x "
        f"{plan.gpus_per_node} GPUs, about {memory.total_gib:.1f} GiB per GPU of "
        f"parallel.gpu_memory_gib={plan.gpu_memory_gib:g}"
    )
    return [Check("plan", "ok", detail), check_gpus(config, plan)]


def _plan(config: Config, videos: pa.Table | None) -> ParallelPlan:
    if videos is not None and videos.num_rows:
        from hvbatch.batch.control.commands import job_plan

        return job_plan(config, videos)
    from hvbatch.parallel.plan import plan_for_config

    return plan_for_config(config)


def host_memory_total_gib() -> float | None:
    """This machine's memory (`MemTotal` of /proc/meminfo), None where it cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024 / GIB
    except (OSError, ValueError, IndexError):
        return None
    return None


def check_host_memory(config: Config) -> Check:
    """With the local executor the ranks run here: can this machine hold their host memory?"""
    from hvbatch.parallel.plan import host_memory_for_config

    needed, have = host_memory_for_config(config), host_memory_total_gib()
    if needed is None or have is None:
        return Check("host memory", "ok", "not estimated (random-weight preset, or no /proc/meminfo)")
    detail = (
        f"{config.slurm.tasks_per_node} ranks need ~{needed:.0f} GiB of host memory "
        f"(text encoders offloaded={config.model.text_encoder_offload}); this machine has {have:.0f} GiB"
    )
    if needed <= have:
        return Check("host memory", "ok", detail)
    status = "warn" if config.batch.executor != "slurm" else "ok"
    fix = (
        "run on nodes with more memory, model.text_encoder_offload=keep (more GPU memory: see "
        "`hvbatch plan`), or fewer ranks per node"
    )
    return Check(
        "host memory", status, detail + ("" if status == "warn" else " (jobs run on Slurm nodes)"), fix
    )


def check_gpus(config: Config, plan: ParallelPlan) -> Check:
    """GPUs visible to this process: none is a warning (login node), or a failure with device=cuda."""
    import torch

    device = config.device
    if device == "cpu":
        return Check("gpus", "ok", "device=cpu: no GPU used")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        detail = f"no GPU visible here (torch {torch.__version__}, CUDA_VISIBLE_DEVICES={visible})"
        if device.startswith("cuda"):
            fix = "run on a GPU node (srun --gpus=1 hvbatch doctor ...) or install a CUDA build of torch"
            return Check("gpus", "fail", f"{detail} but device={device}", fix)
        fix = (
            "fine on a login node; to check the GPUs, run doctor on a GPU node (srun --gpus=1 hvbatch doctor)"
        )
        return Check("gpus", "warn", f"{detail}: device=auto would run on the CPU", fix)
    props = [torch.cuda.get_device_properties(i) for i in range(count)]
    smallest = min(p.total_memory for p in props) / GIB
    names = sorted({p.name for p in props})
    detail = f"{count} GPU(s) visible ({', '.join(names)}), smallest {smallest:.1f} GiB"
    need = plan.memory.total_gib
    if smallest < need:
        fix = "use GPUs with more memory, or a layout with more GPUs per video (see hvbatch plan)"
        return Check("gpus", "fail", f"{detail}: the plan needs about {need:.1f} GiB per GPU", fix)
    if plan.gpu_memory_gib > smallest:
        fix = f"set parallel.gpu_memory_gib={smallest:.0f} so that the plan is made for these GPUs"
        return Check(
            "gpus", "warn", f"{detail}, less than parallel.gpu_memory_gib={plan.gpu_memory_gib:g}", fix
        )
    if count < plan.gpus_per_node:
        detail += f", fewer than the plan's {plan.gpus_per_node} per node (fine if jobs run elsewhere)"
    return Check("gpus", "ok", f"{detail}; the plan needs about {need:.1f} GiB per GPU")


def check_ffmpeg() -> Check:
    """imageio-ffmpeg's ffmpeg binary exists and lists the libx264 encoder."""
    fix = "pip install imageio-ffmpeg (its wheels bundle an ffmpeg with libx264), or set IMAGEIO_FFMPEG_EXE"
    try:
        import imageio_ffmpeg

        exe = imageio_ffmpeg.get_ffmpeg_exe()
    except (ImportError, RuntimeError) as err:
        return Check("ffmpeg", "fail", f"no ffmpeg found: {one_line(str(err))}", fix)
    try:
        listing = subprocess.run(
            [exe, "-hide_banner", "-encoders"], capture_output=True, text=True, timeout=60
        ).stdout
    except (OSError, subprocess.SubprocessError) as err:
        return Check("ffmpeg", "fail", f"{exe} does not run: {one_line(str(err))}", fix)
    if not any(line.split()[1:2] == ["libx264"] for line in listing.splitlines()):
        return Check("ffmpeg", "fail", f"{exe} has no libx264 encoder (`ffmpeg -encoders`)", fix)
    return Check("ffmpeg", "ok", f"{exe} has the libx264 encoder")


def _bytes_per_pixel(config: Config) -> float:
    """Estimated mp4 bytes per pixel of one frame at `video.crf`."""
    return BITS_PER_PIXEL_AT_CRF_23 * 2 ** ((23 - config.video.crf) / CRF_STEPS_PER_DOUBLING) / 8


def estimated_video_bytes(height: int, width: int, num_frames: int, config: Config) -> int:
    """Rough size of one video's mp4 at `video.crf` (plus its first-frame PNG when saved)."""
    size = height * width * num_frames * _bytes_per_pixel(config)
    if config.video.save_first_frame:
        size += height * width * 3  # an uncompressed-size upper bound for the PNG
    return int(size)


def _estimated_batch_bytes(videos: pa.Table, config: Config) -> int:
    """`estimated_video_bytes` summed over the prompts file's videos."""
    import numpy as np

    height, width, frames = (videos[n].to_numpy().astype(np.int64) for n in ("height", "width", "num_frames"))
    size = float((height * width * frames).sum()) * _bytes_per_pixel(config)
    if config.video.save_first_frame:
        size += float((height * width * 3).sum())
    return int(size)


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_run_dir(run_dir: Path, config: Config, videos: pa.Table | None = None) -> list[Check]:
    """The run directory's filesystem: a file can be created, hard links work, and there is room."""
    where = _nearest_existing(run_dir)
    if not where.is_dir():
        return [Check("run dir", "fail", f"{where} is a file, not a directory", "choose another --run-dir")]
    label = str(run_dir) if where == run_dir.absolute() else f"{run_dir} (to be created in {where})"
    fix = f"choose a --run-dir on a writable filesystem that the compute nodes share (not {where})"
    try:
        handle, name = tempfile.mkstemp(prefix=".hvbatch-doctor-", dir=where)
    except OSError as err:
        return [Check("run dir", "fail", f"{label}: cannot create a file: {err}", fix)]
    os.close(handle)
    try:
        checks = [Check("run dir", "ok", f"{label}: writable")]
        checks.append(_check_hard_links(Path(name)))
    finally:
        Path(name).unlink(missing_ok=True)
    checks.append(_check_free_space(where, config, videos))
    return checks


def _check_hard_links(file: Path) -> Check:
    link = file.with_name(file.name + ".link")
    try:
        os.link(file, link)
    except OSError as err:
        return Check(
            "run dir hard links",
            "warn",
            f"{file.parent} does not support hard links ({err}): finished videos are committed by rename, "
            "so two attempts of a shard racing on one video cannot tell who wrote it first",
            "prefer a filesystem with hard links (most POSIX filesystems; not some object-store mounts)",
        )
    link.unlink(missing_ok=True)
    return Check(
        "run dir hard links", "ok", f"{file.parent} supports hard links (videos are committed by link)"
    )


def _check_free_space(where: Path, config: Config, videos: pa.Table | None) -> Check:
    free = shutil.disk_usage(where).free
    s = config.sampling
    if videos is None or not videos.num_rows:
        need = estimated_video_bytes(s.height, s.width, s.num_frames, config)
        detail = (
            f"{free / GIB:.1f} GiB free at {where}; a {s.height}x{s.width}x{s.num_frames} video at crf "
            f"{config.video.crf} is ~{need / 1e6:.2g} MB, room for ~{free // max(need, 1):,} "
            "(pass --prompts to check a whole batch)"
        )
    else:
        need = _estimated_batch_bytes(videos, config)
        detail = f"{free / GIB:.1f} GiB free at {where}; {videos.num_rows} videos need ~{need / GIB:.2g} GiB"
    if free < need:
        return Check(
            "run dir space", "fail", detail, "free space, or choose a --run-dir on a larger filesystem"
        )
    return Check("run dir space", "ok", detail)
