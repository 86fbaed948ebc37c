"""The report page: one HTML file with its CSS, script, plots, thumbnails and data inside."""

from __future__ import annotations

import base64
import json
import re
import time
from html import escape
from importlib import resources
from pathlib import Path
from typing import Any

from hvbatch.batch.files import named_by_user, write_text_atomic
from hvbatch.batch.rundir import RunDir
from hvbatch.report.data import ReportData, collect
from hvbatch.report.svg import legend_html, throughput_svg, timeline_svg
from hvbatch.report.thumbnails import add_input_thumbnails, add_thumbnails

MAX_FAILURE_ROWS = 500  # more are in the contact sheet's "failed" filter
SLOT = re.compile(r"<!--slot:([a-z]+)-->")
VIDEO_KEYS = (
    "id",
    "prompt",
    "seed",
    "shard",
    "status",
    "attempts",
    "seconds",
    "gpu_seconds",
    "error",
    "href",
)


def _asset(name: str) -> str:
    return resources.files("hvbatch.report").joinpath(name).read_text(encoding="utf-8")


def _script_json(payload: Any) -> str:
    """JSON that cannot end its <script> element or open a comment in it (`<`, `>`, `&` escaped)."""
    text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _utc(moment: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(moment))


def _number(value: float | None, unit: str = "") -> str:
    return "–" if value is None else f"{value:,.1f}{unit}"


def _summary_html(data: ReportData) -> str:
    s = data.summary()
    counts = ", ".join(f"{n} {name}" for name, n in s["counts"].items())
    exits = ", ".join(f"{n} {reason}" for reason, n in sorted(s["exit_reasons"].items())) or "none yet"
    rows = [
        ("videos", f"{s['videos']}: {counts}"),
        ("throughput", _number(s["videos_per_hour"], " videos/hour")),
        ("shards", f"{data.num_shards}; {s['attempts']} job attempts ({exits})"),
        ("GPU-seconds", f"{_number(s['gpu_seconds_total'])} in all job attempts"),
        (
            "per done video",
            f"{_number(s['gpu_seconds_per_done_video'])} GPU-seconds mean, "
            f"{_number(s['gpu_seconds_median'])} median",
        ),
        ("slow", f"seconds ≥ {_number(s['slow_threshold'])} (90th percentile of done videos)"),
    ]
    body = "".join(f"<tr><th>{escape(k)}</th><td>{escape(v)}</td></tr>" for k, v in rows)
    return f'<table class="summary">{body}</table>'


MAX_JOB_ROWS = 200
ENDED_WELL = ("running", "completed")


def _failed_jobs_html(data: ReportData, any_video_failed: bool) -> str:
    """The job attempts that ended otherwise than completed, with their reasons as text."""
    ended = [a for a in data.attempts if a["exit_reason"] not in ENDED_WELL]
    if not ended:
        return ""
    exits = sorted(data.summary()["exit_reasons"].items())
    reasons = ", ".join(f"{n} {reason}" for reason, n in exits if reason not in ENDED_WELL)
    lead = "" if any_video_failed else "No video failed, but "
    attempts = f"{len(ended)} job attempt{'s' if len(ended) != 1 else ''}"
    head = f"{lead}{attempts} ended without completing ({reasons}):"
    rows = "".join(
        f"<tr><td>{a['shard']}</td><td>{escape(str(a['job_id']))}</td><td>{a['attempt']}</td>"
        f"<td>{escape(str(a['exit_reason']))}</td>"
        f'<td class="err">{escape(str(a["exit_detail"] or ""))}</td></tr>'
        for a in ended[:MAX_JOB_ROWS]
    )
    more = len(ended) - MAX_JOB_ROWS
    note = f'<p class="sub">{more} more: `hvbatch status --json` lists them all.</p>' if more > 0 else ""
    return (
        f'<p class="jobs-failed">{escape(head[0].upper() + head[1:])}</p><table class="failures jobs">'
        f"<tr><th>shard</th><th>job</th><th>attempt</th><th>reason</th><th>detail</th></tr>{rows}</table>{note}"
    )


def _failures_html(data: ReportData) -> str:
    failed = [v for v in data.videos if v["status"] == "failed"]
    jobs = _failed_jobs_html(data, bool(failed))
    if not failed:
        return jobs or '<p class="sub">No video failed.</p>'
    rows = "".join(
        f"<tr><td>{escape(v['id'])}</td><td>{v['shard']}</td><td>{v['attempts']}</td>"
        f'<td class="err">{escape(v["error"] or "")}</td><td>{escape(v["prompt"])}</td></tr>'
        for v in failed[:MAX_FAILURE_ROWS]
    )
    more = len(failed) - MAX_FAILURE_ROWS
    note = f'<p class="sub">{more} more: use the "failed" filter above.</p>' if more > 0 else ""
    return (
        f'<table class="failures"><tr><th>video</th><th>shard</th><th>tries</th><th>error</th>'
        f"<th>prompt</th></tr>{rows}</table>{note}{jobs}"
    )


def _end_time(data: ReportData) -> float:
    """The plots' right edge: the last attempt's end, or now while one is still running."""
    ends = [a["finished_at"] or data.generated_at for a in data.attempts] + data.done_times()
    return max(ends, default=data.generated_at)


def _b64(data: bytes | None) -> str | None:
    return base64.b64encode(data).decode("ascii") if data else None


def render_html(data: ReportData) -> str:
    end = _end_time(data)
    videos = [
        {key: v[key] for key in VIDEO_KEYS}
        | {"thumb": base64.b64encode(v["thumb"]).decode("ascii") if v["thumb"] else None}
        | {"image_source": v.get("image_source"), "input_thumb": _b64(v.get("input_thumb"))}
        for v in data.videos
    ]
    reasons = sorted({a["exit_reason"] for a in data.attempts})
    slots = {
        "title": escape(data.root),
        "subtitle": escape(f"submitted {_utc(data.created_at)}, report made {_utc(data.generated_at)}"),
        "css": _asset("report.css"),
        "summary": _summary_html(data),
        "throughput": throughput_svg(data.done_times(), data.created_at, end),
        "failures": _failures_html(data),
        "legend": legend_html(reasons),
        "timeline": timeline_svg(data.attempts, data.num_shards, data.created_at, end),
        "data": _script_json({"videos": videos, "slow_threshold": data.slow_threshold()}),
        "js": _asset("report.js"),
    }
    return SLOT.sub(lambda match: slots[match.group(1)], _asset("template.html"))


def write_report(run: RunDir, out: Path, thumbnails: bool = True) -> ReportData:
    """Read the run, make the thumbnails (cached in the run) and write the page to `out` atomically."""
    out = named_by_user(out)  # a link at `out` itself is replaced, never followed
    data = collect(run, out)
    if thumbnails:
        add_thumbnails(run, data.videos)
        add_input_thumbnails(run, data.videos)
    write_text_atomic(out, render_html(data))
    return data
