"""Headless Debian Chromium for the tests: installed with apt-get when missing (CI runs as root)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = "chromium"
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--enable-logging=stderr", "--v=0",
]  # fmt: skip
# Every console.log / console.error / uncaught exception / CSP refusal of the page, one per line:
# `[pid:tid:time:INFO:CONSOLE:12] "Uncaught ReferenceError: ...", source: file:///... (12)`
CONSOLE_LINE = re.compile(r":CONSOLE[:(]\d*\)?\] (.*)")


def chromium() -> str:
    """The chromium binary; installs Debian's package when it is missing, or fails saying how to."""
    found = shutil.which(PACKAGE)
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.fail(f"the report tests need Debian's {PACKAGE}: run `apt-get install {PACKAGE}` as root")
    env = os.environ | {"DEBIAN_FRONTEND": "noninteractive"}
    for command in (
        ["apt-get", "update", "-qq"],
        [
            "apt-get",
            "install",
            "-y",
            "-qq",
            "-o",
            "DPkg::Lock::Timeout=300",
            "--no-install-recommends",
            PACKAGE,
        ],
    ):
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900, check=False)
        if done.returncode != 0:
            pytest.fail(f"`{' '.join(command)}` failed ({done.returncode}): {done.stderr[-2000:]}")
    return shutil.which(PACKAGE) or pytest.fail(f"{PACKAGE} is not on PATH after apt-get install")


@dataclass
class PageLoad:
    dom: str  # the DOM after the page's scripts ran
    console: list[str]  # the page's console messages (the test pages write none)
    screenshot: Path


def load_page(page: Path, work: Path, width: int = 1280, height: int = 900) -> PageLoad:
    """Open `page` headless: its rendered DOM, its console messages and a screenshot PNG."""
    work.mkdir(parents=True, exist_ok=True)
    shot = work / f"{page.stem}.png"
    command = [
        chromium(), *FLAGS, f"--user-data-dir={work / 'profile'}", "--dump-dom",
        f"--screenshot={shot}", f"--window-size={width},{height}", page.resolve().as_uri(),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    console = [m.group(1) for line in done.stderr.splitlines() if (m := CONSOLE_LINE.search(line))]
    return PageLoad(done.stdout, console, shot)
