"""Layering rules: the model files hold no distributed code."""

from __future__ import annotations

import ast
from pathlib import Path

MODELS_DIR = Path(__file__).resolve().parents[1] / "hvbatch" / "models"


def test_models_never_import_torch_distributed() -> None:
    offenders = []
    for path in sorted(MODELS_DIR.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr == "distributed":
                offenders.append(f"{path.name}:{node.lineno}: uses torch.distributed")
                continue
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [f"{node.module}.{alias.name}" for alias in node.names]
            else:
                continue
            offenders += [f"{path.name}: imports {n}" for n in names if "distributed" in n]
    assert len(list(MODELS_DIR.rglob("*.py"))) >= 5
    assert not offenders, offenders
