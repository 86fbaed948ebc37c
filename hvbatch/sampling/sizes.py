"""Valid video sizes and their latent shapes (plain Python: the control plane checks sizes without torch)."""

from __future__ import annotations

VAE_TEMPORAL_RATIO = 4
VAE_SPATIAL_RATIO = 8
SIZE_MULTIPLE = 16


def _nearest_multiples(value: int, multiple: int) -> str:
    low = max(multiple, value // multiple * multiple)
    return f"{low} or {low + multiple}" if low < value else f"{low}"


def latent_shape(
    height: int, width: int, num_frames: int, *, channels: int = 16
) -> tuple[int, int, int, int]:
    """`(C, T, Hh, Ww)` of the latent for a video; errors name the nearest valid sizes."""
    problems = []
    for name, value in (("height", height), ("width", width)):
        if value < SIZE_MULTIPLE or value % SIZE_MULTIPLE:
            problems.append(
                f"{name}={value} is not a positive multiple of {SIZE_MULTIPLE} "
                f"(nearest valid: {_nearest_multiples(value, SIZE_MULTIPLE)})"
            )
    if num_frames < 1 or (num_frames - 1) % VAE_TEMPORAL_RATIO:
        low = max(1, (num_frames - 1) // VAE_TEMPORAL_RATIO * VAE_TEMPORAL_RATIO + 1)
        choices = f"{low} or {low + VAE_TEMPORAL_RATIO}" if low < num_frames else f"{low}"
        problems.append(f"num_frames={num_frames} is not of the form 4k+1 (nearest valid: {choices})")
    if problems:
        raise ValueError("invalid video size: " + "; ".join(problems))
    return (
        channels,
        (num_frames - 1) // VAE_TEMPORAL_RATIO + 1,
        height // VAE_SPATIAL_RATIO,
        width // VAE_SPATIAL_RATIO,
    )
