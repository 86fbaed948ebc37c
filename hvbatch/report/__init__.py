"""`hvbatch report`: one self-contained HTML page showing a run (videos, failures, throughput, jobs)."""

from hvbatch.report.data import ReportData, collect
from hvbatch.report.page import render_html, write_report

__all__ = ["ReportData", "collect", "render_html", "write_report"]
