"""Layering rules: the model files hold no distributed code."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path
from types import ModuleType

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


def _import_graph_script() -> ModuleType:
    """`scripts/import_graph.py`, the one reading of the package's imports (it prints the README's
    import-structure figures; these tests assert on the same graph)."""
    path = PACKAGE_DIR.parent / "scripts" / "import_graph.py"
    spec = importlib.util.spec_from_file_location("hvbatch_import_graph", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _import_graph() -> dict[str, set[str]]:
    """hvbatch module -> the hvbatch modules it imports, at the top or inside functions."""
    return _import_graph_script().import_graph(PACKAGE_DIR)


def test_no_import_cycles() -> None:
    graph = _import_graph()
    assert len(graph) > 40
    cycles = _import_graph_script().cycles(graph)
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


# ------------------------------------------------------------------ model families stay in their folders
#
# "Names a family" means, for a module of hvbatch outside every family folder (a package directly
# under hvbatch/models/, e.g. hvbatch/models/hunyuan_video/; folders of families still being
# built, not registered yet, are family folders too and are not scanned):
#   1. it imports a module of a registered family's folder (`import` / `from ... import`, at the
#      top or inside a function; the registry finds family modules itself, without a static import), or
#   2. its text (code, strings, comments, docstrings) holds, as a whole word, one of a registered
#      family's names: its registered name and declared markers (`ModelFamily.markers`: preset names,
#      checkpoint folder and file names, encoder names), the name of a class its folder defines, or
#      its folder's package name. "Whole word": a marker or class name is neither preceded nor
#      followed by a letter or digit (so `mp_rank_00` matches in `mp_rank_00_model_states.pt`,
#      `CLIP` does not match in `np.clip`, and `HunyuanVideoTransformer` does not match in
#      `HunyuanVideoTransformer3DModel`, which is a marker of its own); the package name is a whole
#      identifier (`hunyuan_video` does not match in `hunyuan_video_15`, another family's folder).


def _family_folders(package: Path = PACKAGE_DIR) -> list[Path]:
    return sorted(p.parent for p in (package / "models").glob("*/__init__.py"))


def family_names() -> dict[str, set[str]]:
    """Registered family's folder package name -> every name that identifies it (rule 2 above)."""
    import importlib

    from hvbatch.models.family import families

    names: dict[str, set[str]] = {}
    for family in families():
        module = importlib.import_module(family.load.__module__)
        folder = Path(str(module.__file__)).parent
        classes = {
            node.name
            for path in folder.rglob("*.py")
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.ClassDef)
        }
        names[folder.name] = {family.name, *family.markers, *classes}
    return names


def family_naming_violations(package: Path = PACKAGE_DIR) -> list[str]:
    """Every place outside the family folders that names a family (see the rules above)."""
    import re

    folders = _family_folders(package)
    names = family_names()
    folder_modules = {f"hvbatch.models.{name}" for name in names}

    def pattern(package_name: str, found: set[str]) -> re.Pattern[str]:
        words = [rf"(?<![A-Za-z0-9]){re.escape(n)}(?![A-Za-z0-9])" for n in sorted(found)]
        return re.compile("|".join([*words, rf"(?<![A-Za-z0-9_]){re.escape(package_name)}(?![A-Za-z0-9_])"]))

    patterns = {family: pattern(family, found) for family, found in names.items()}
    found: list[str] = []
    for path in sorted(package.rglob("*.py")):
        if any(folder in path.parents for folder in folders):
            continue
        where = path.relative_to(package.parent)
        text = path.read_text()
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                targets = [node.module]
            else:
                continue
            for target in targets:
                if any(target == m or target.startswith(m + ".") for m in folder_modules):
                    found.append(f"{where}:{node.lineno}: imports {target}")
        for lineno, line in enumerate(text.splitlines(), 1):
            for family, pattern in patterns.items():
                for match in pattern.finditer(line):
                    found.append(f"{where}:{lineno}: names {match.group()!r} of family folder {family}")
    return found


def test_nothing_outside_the_family_folders_names_a_family() -> None:
    names = family_names()
    assert "hunyuan_video" in names and {"HunyuanVideoTransformer", "mp_rank_00"} <= names["hunyuan_video"]
    violations = family_naming_violations()
    assert not violations, "\n".join(violations)


def test_the_family_naming_check_catches_a_violation(tmp_path: Path) -> None:
    """The check itself: a copy of the package with one deliberate violation of each kind fails."""
    import shutil

    copy = tmp_path / "hvbatch"
    shutil.copytree(PACKAGE_DIR, copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert family_naming_violations(copy) == []
    (copy / "sampling" / "leak.py").write_text(
        "from hvbatch.models.hunyuan_video.transformer import HunyuanVideoTransformer  # noqa\n"
        "def load(root):\n"
        "    import hvbatch.models.hunyuan_video.layout\n"
        '    return root / "transformers" / "mp_rank_00_model_states.pt"  # LLaVA weights\n'
    )
    violations = family_naming_violations(copy)
    joined = "\n".join(violations)
    assert "leak.py:1: imports hvbatch.models.hunyuan_video.transformer" in joined
    assert "leak.py:3: imports hvbatch.models.hunyuan_video.layout" in joined
    assert "leak.py:1: names 'HunyuanVideoTransformer'" in joined
    assert "leak.py:4: names 'mp_rank_00'" in joined and "leak.py:4: names 'LLaVA'" in joined


def test_the_control_plane_asks_the_family_without_torch() -> None:
    """Presets, config sections, geometry, token counts, memory and cost figures, plan: no torch."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from hvbatch.config import load_config\n"
        "from hvbatch.models.family import families, family_of\n"
        "from hvbatch.parallel.plan import plan_for_config\n"
        "from hvbatch.sampling.estimates import speedup_line\n"
        "config = load_config(overrides=['sampling.cfg_scale=6'])\n"
        "family = family_of(config.model)\n"
        "assert family.geometry.checked_image_tokens(720, 1280, 129) == 118800\n"
        "assert family.memory(config.model).num_params > 1e10 and family.seconds_per_token_step > 0\n"
        "assert plan_for_config(config).memory.total_gib > 0 and families()\n"
        "speedup_line('teacache', 0.1, family.step_cache)\n"
        "family.detect(__import__('pathlib').Path('.'))\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
