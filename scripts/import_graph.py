"""The import structure of the hvbatch package: files, import edges, cycles, edges between folders.

    python3 scripts/import_graph.py [--json] [PACKAGE_DIR]

An edge is one hvbatch module importing another (at the top of a file or inside a function, as
`tests/test_layering.py` counts them); a module is a `.py` file (`__init__.py` is its package).
`import a.b.c` and `from a.b import c` both count as an edge to the deepest hvbatch module named.
Prints the counts, every cycle (there should be none) and the edges between top-level folders.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from collections import Counter
from pathlib import Path

DEFAULT_PACKAGE = Path(__file__).resolve().parents[1] / "hvbatch"


def module_name(path: Path, package_dir: Path) -> str:
    parts = path.relative_to(package_dir.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(package_dir: Path) -> dict[str, set[str]]:
    """module -> the hvbatch modules it imports (statically; relative imports are not used here)."""
    modules = {module_name(p, package_dir): p for p in sorted(package_dir.rglob("*.py"))}
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


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    state: dict[str, int] = {}
    found: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for child in sorted(graph[node]):
            if state.get(child) == 1:
                found.append([*stack[stack.index(child) :], child])
            elif child not in state:
                visit(child, [*stack, child])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def folder(module: str) -> str:
    """`hvbatch.models.hunyuan_video.vae` -> `models/hunyuan_video`; top-level modules -> `hvbatch`."""
    parts = module.split(".")[1:-1] if module.count(".") > 1 else []
    return "/".join(parts) or "hvbatch"


def summary(package_dir: Path) -> dict[str, object]:
    graph = import_graph(package_dir)
    files = sorted(package_dir.rglob("*.py"))
    lines = [len(p.read_text().splitlines()) for p in files]
    between = Counter(
        (folder(a), folder(b)) for a, targets in graph.items() for b in targets if folder(a) != folder(b)
    )
    return {
        "files": len(files),
        "lines": sum(lines),
        "largest_file_lines": max(lines),
        "folders": len({folder(m) for m in graph}),
        "import_edges": sum(len(t) for t in graph.values()),
        "cycles": cycles(graph),
        "edges_between_folders": {f"{a} -> {b}": n for (a, b), n in sorted(between.items())},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("package_dir", nargs="?", type=Path, default=DEFAULT_PACKAGE)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    data = summary(args.package_dir)
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    print(
        f"{data['files']} files ({data['lines']} lines, largest {data['largest_file_lines']}), "
        f"{data['folders']} folders, {data['import_edges']} import edges, {len(data['cycles'])} cycles"  # type: ignore[arg-type]
    )
    for cycle in data["cycles"]:  # type: ignore[attr-defined]
        print("cycle: " + " -> ".join(cycle))
    for edge, count in data["edges_between_folders"].items():  # type: ignore[attr-defined]
        print(f"  {edge}: {count}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
