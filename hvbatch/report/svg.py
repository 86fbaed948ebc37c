"""The report's two plots as inline SVG: videos done over time, and each shard's job attempts."""

from __future__ import annotations

from html import escape
from typing import Any

from hvbatch.batch.attempt import ExitReason

EXIT_COLOURS = {
    ExitReason.COMPLETED: "#2e9d50",
    ExitReason.RUNNING: "#4a90d9",
    ExitReason.FAILED: "#d64545",
    ExitReason.CRASH: "#b0306a",
    ExitReason.TIMEOUT: "#e08a1e",
    ExitReason.STALLED: "#c7a200",
    ExitReason.OOM: "#8e44ad",
    ExitReason.WALLTIME: "#7f8c8d",
    ExitReason.PREEMPTED: "#16a0a0",
    ExitReason.CANCELLED: "#a0a0a0",
    ExitReason.NODE_FAILURE: "#6d3b1f",
    ExitReason.LOST: "#404040",
    ExitReason.LOAD_FAILED: "#5b6bbf",
    ExitReason.PORT_FAILED: "#3d7f9e",
    ExitReason.SUPERVISOR_ERROR: "#9e3d7f",
    ExitReason.DISK_FULL: "#c0392b",
}
MAX_POINTS = 2000  # the throughput line keeps at most this many corners
LEFT, RIGHT, TOP, BOTTOM = 56, 16, 12, 30  # plot margins, pixels


def colour_of(reason: str) -> str:
    try:
        return EXIT_COLOURS[ExitReason(reason)]
    except ValueError:
        return "#000000"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _ticks(span: float, count: int = 5) -> list[float]:
    """Round tick values from 0 to about `span`."""
    if span <= 0:
        return [0.0]
    raw = span / count
    step = min((m * 10**e for e in range(-3, 12) for m in (1, 2, 5) if m * 10**e >= raw), default=raw)
    return [i * step for i in range(int(span // step) + 1)]


def _time_axis(span: float, width: int, height: int) -> list[str]:
    unit, name = (1.0, "s") if span < 120 else (60.0, "min") if span < 7200 else (3600.0, "h")
    parts = []
    for tick in _ticks(span / unit):
        x = LEFT + tick * unit / span * (width - LEFT - RIGHT)
        parts.append(f'<line x1="{x:.1f}" y1="{height - BOTTOM}" x2="{x:.1f}" y2="{height - BOTTOM + 4}"/>')
        parts.append(
            f'<text x="{x:.1f}" y="{height - BOTTOM + 16}" text-anchor="middle">{tick:g} {name}</text>'
        )
    return parts


def throughput_svg(
    done_times: list[float], start: float, end: float, width: int = 640, height: int = 220
) -> str:
    """Cumulative videos done against time since the run was submitted."""
    span = max(end - start, 1.0)
    total = len(done_times)
    plot_w, plot_h = width - LEFT - RIGHT, height - TOP - BOTTOM
    every = max(1, total // MAX_POINTS)
    points = [(start, 0)] + [
        (t, i + 1) for i, t in enumerate(done_times) if (i + 1) % every == 0 or i + 1 == total
    ]
    coords = " ".join(
        f"{LEFT + (t - start) / span * plot_w:.1f},{TOP + plot_h - n / max(total, 1) * plot_h:.1f}"
        for t, n in points
    )
    parts = [
        f'<svg class="plot" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="videos done over time">',
        f'<g class="axis"><line x1="{LEFT}" y1="{TOP + plot_h}" x2="{width - RIGHT}" y2="{TOP + plot_h}"/>'
        f'<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{TOP + plot_h}"/>',
        *_time_axis(span, width, height),
    ]
    for tick in (t for t in _ticks(max(total, 1), 4) if t == int(t)):
        y = TOP + plot_h - tick / max(total, 1) * plot_h
        parts.append(f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{tick:g}</text>')
    parts.append("</g>")
    if total:
        parts.append(
            f'<polyline class="line" points="{coords}"><title>{total} videos done</title></polyline>'
        )
    else:
        parts.append(f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle">no video done yet</text>')
    return "\n".join([*parts, "</svg>"])


def _bar_title(row: dict[str, Any], start: float, end: float) -> str:
    layout = f"dp {row['dp']} x ulysses {row['ulysses']} x ring {row['ring']}" if row.get("dp") else ""
    lines = [
        f"shard {row['shard']}, job {row['job_id']}, attempt {row['attempt']} ({row['attempt_key']})",
        f"{row['exit_reason']}" + (f": {row['exit_detail']}" if row.get("exit_detail") else ""),
        f"{_duration(end - start)} wall, {row.get('world_size') or '?'} ranks {layout}".rstrip(),
        f"node {row['node']}" if row.get("node") else "",
    ]
    return escape("\n".join(line for line in lines if line))


def timeline_svg(
    attempts: list[dict[str, Any]], num_shards: int, start: float, end: float, width: int = 960
) -> str:
    """One row per shard, one bar per job attempt from its start to its end, coloured by exit reason."""
    span = max(end - start, 1.0)
    row_h = max(3, min(18, 480 // max(num_shards, 1)))
    height = TOP + BOTTOM + row_h * max(num_shards, 1)
    plot_w = width - LEFT - RIGHT
    parts = [
        f'<svg class="plot" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="job attempts per shard">',
        f'<g class="axis"><line x1="{LEFT}" y1="{height - BOTTOM}" x2="{width - RIGHT}" '
        f'y2="{height - BOTTOM}"/>',
        *_time_axis(span, width, height),
    ]
    label_every = max(1, 12 // row_h)
    for shard in range(0, num_shards, label_every):
        y = TOP + shard * row_h + row_h / 2 + 4
        parts.append(f'<text x="{LEFT - 6}" y="{y:.1f}" text-anchor="end">{shard}</text>')
    parts.append("</g>")
    for row in attempts:
        began = row.get("started_at") or start
        ended = row.get("finished_at") or end  # a running attempt reaches the report's time
        x = LEFT + (began - start) / span * plot_w
        bar_w = max(1.5, (ended - began) / span * plot_w)
        y = TOP + int(row["shard"]) * row_h + (1 if row_h > 4 else 0)
        parts.append(
            f'<rect x="{x:.1f}" y="{y}" width="{bar_w:.1f}" height="{max(2, row_h - 2)}" '
            f'fill="{colour_of(row["exit_reason"])}"><title>{_bar_title(row, began, ended)}</title></rect>'
        )
    return "\n".join([*parts, "</svg>"])


def legend_html(reasons: list[str]) -> str:
    return " ".join(
        f'<span class="legend"><i style="background:{colour_of(r)}"></i>{escape(r)}</span>' for r in reasons
    )
