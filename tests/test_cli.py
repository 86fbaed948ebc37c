"""The command line and the README's Python snippets."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hvbatch.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"


def test_config_command_prints_resolved_config(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "model=tiny", "sampling.seed=4"]) == 0
    out = capsys.readouterr().out
    assert "name: tiny" in out and "seed: 4" in out and "num_heads: 12" in out


def test_config_command_reports_bad_input(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "model=nope"]) == 2
    assert "unknown model preset 'nope'" in capsys.readouterr().err


def test_the_bundled_example_configs_are_found_by_name_from_anywhere(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # no configs/ folder here: the copy shipped in the package is used
    assert main(["config", "--config", "tiny-batch"]) == 0
    out = capsys.readouterr().out
    assert "name: tiny" in out and "min_shards: 2" in out and "num_frames: 9" in out
    assert main(["config", "--config", "tiny-cpu.yaml"]) == 0 and "name: tiny" in capsys.readouterr().out
    assert main(["config", "--config", "tiny-batchh"]) == 2
    error = capsys.readouterr().err
    assert "config file tiny-batchh does not exist; give a YAML file's path or the name of a bundled" in error
    assert "tiny-batch, tiny-cpu" in error
    (tmp_path / "tiny-batch").write_text("sampling: {seed: 5}\n")  # a file of that name wins
    assert main(["config", "--config", "tiny-batch"]) == 0 and "seed: 5" in capsys.readouterr().out


def test_console_script_runs() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "hvbatch", "--version"], capture_output=True, text=True, check=True
    )
    assert result.stdout.startswith("hvbatch ")


def test_readme_sampling_snippet_runs() -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    snippet = next(b for b in blocks if "sample(model" in b)
    namespace: dict[str, object] = {}
    exec(compile(snippet, str(README), "exec"), namespace)
    latents = namespace["latents"]
    assert isinstance(latents, torch.Tensor) and tuple(latents.shape) == (1, 16, 2, 8, 8)
    assert torch.isfinite(latents).all()


def test_readme_generate_command_runs_word_for_word(tmp_path: Path) -> None:
    import shlex
    import shutil

    line = next(
        line
        for line in README.read_text().splitlines()
        if line.startswith("hvbatch generate --config configs/")
    )
    shutil.copytree(README.parent / "configs", tmp_path / "configs")  # the command's relative paths
    argv = shlex.split(line)
    assert argv[0] == "hvbatch"
    result = subprocess.run(
        [sys.executable, "-m", "hvbatch", *argv[1:]], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    out = tmp_path / argv[argv.index("--out") + 1]
    assert out.is_file() and out.stat().st_size > 0
    assert "wrote" in result.stdout
