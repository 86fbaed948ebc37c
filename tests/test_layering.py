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


PACKAGE_DIR = MODELS_DIR.parent
CLI_MODULES = {"hvbatch.cli", "hvbatch.plan_cli", "hvbatch.generate", "hvbatch.__main__"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph() -> dict[str, set[str]]:
    """hvbatch module -> the hvbatch modules it imports, at the top or inside functions."""
    modules = {_module_name(p): p for p in PACKAGE_DIR.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            else:
                continue
            graph[name] |= {t for t in targets if t in modules and t != name}
    return graph


def test_no_import_cycles() -> None:
    graph = _import_graph()
    assert len(graph) > 40
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for child in sorted(graph[node]):
            if state.get(child) == 1:
                cycles.append([*stack[stack.index(child) :], child])
            elif child not in state:
                visit(child, [*stack, child])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, cycles


def test_library_code_never_imports_a_cli_module() -> None:
    graph = _import_graph()
    offenders = {
        name: sorted(targets & CLI_MODULES)
        for name, targets in graph.items()
        if name not in CLI_MODULES and name != "hvbatch.batch.control.commands" and targets & CLI_MODULES
    }
    assert not offenders, offenders


def test_batch_folders_say_where_code_runs() -> None:
    """control/ runs on the login node and never imports the runtime (which runs inside a job)."""
    graph = _import_graph()
    control = [name for name in graph if name.startswith("hvbatch.batch.control")]
    runtime = {name for name in graph if name.startswith("hvbatch.batch.runtime")}
    assert control and runtime
    offenders = {name: sorted(graph[name] & runtime) for name in control}
    assert not any(offenders.values()), offenders


def test_every_package_folder_ships_in_a_regular_install() -> None:
    """A regular (non-editable) install takes only the packages pyproject.toml lists."""
    import tomllib

    root = Path(__file__).parents[1]
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {
        p.parent.relative_to(root).as_posix().replace("/", ".") for p in (root / "hvbatch").rglob("*.py")
    }
    assert folders <= listed, f"add to [tool.setuptools] packages: {sorted(folders - listed)}"


def test_the_command_line_parser_does_not_import_torch() -> None:
    """`hvbatch --help` (and every argument error) answers without waiting seconds for torch."""
    import subprocess
    import sys

    code = "import sys; from hvbatch.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
