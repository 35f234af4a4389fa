"""The package's layout rules: the library never imports the application (pycomm.bench), and modules stay short."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "pycomm"
APP = PACKAGE / "bench"
MAX_LINES = 500

def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported_modules(path: Path) -> set[str]:
    """Absolute names of every module ``path`` imports, at any depth (function bodies included)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    return _imports_in(path.read_text(encoding="utf-8"), package)


def _imports_in(source: str, package: str) -> set[str]:
    """Absolute names of every module ``source`` imports; ``package`` resolves its relative imports."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)  # `from pycomm import bench`
    return names


def _is_app(name: str) -> bool:
    return name == "pycomm.bench" or name.startswith("pycomm.bench.")


def test_library_modules_do_not_import_the_application():
    library = [p for p in _modules() if APP not in p.parents]
    assert len(library) > 10 and any(p.name == "registry.py" for p in library)  # the walk sees the library
    offenders = {str(p.relative_to(PACKAGE)): sorted(n for n in _imported_modules(p) if _is_app(n))
                 for p in library}
    # `python -m pycomm` is the `pycomm` command: its entry point (never imported by `import pycomm`) may start
    # the application's command line, and nothing else of it
    entry_point = offenders.pop("__main__.py")
    assert entry_point == ["pycomm.bench.cli", "pycomm.bench.cli.main"]
    assert {k: v for k, v in offenders.items() if v} == {}


def test_import_checker_sees_every_import_form():
    """The checker above must catch each way of importing the app, or its test could not fail."""
    forms = ["import pycomm.bench.e2e", "from pycomm.bench import cli", "from pycomm import bench",
             "from .bench.e2e import run_e2e", "from . import bench", "import pycomm.bench as app",
             "def f():\n    from pycomm.bench.report import format_table"]
    for source in forms:
        assert any(_is_app(n) for n in _imports_in(source, "pycomm")), source
    assert not any(_is_app(n) for n in _imports_in("from pycomm import benchmarks\nimport pycomm.ops", "pycomm"))


def test_import_pycomm_does_not_load_the_application():
    root = str(PACKAGE.parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    script = ("import sys, pycomm; "
              "assert pycomm.__file__.startswith(sys.argv[1]), pycomm.__file__; "
              "print(sorted(m for m in sys.modules if m == 'pycomm.bench' or m.startswith('pycomm.bench.')))")
    done = subprocess.run([sys.executable, "-c", script, root], capture_output=True, text=True, env=env,
                          cwd=root, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
    # the same probe does see the application once something imports it
    script_app = script.replace("import sys, pycomm; ", "import sys, pycomm, pycomm.bench.cli; ")
    done = subprocess.run([sys.executable, "-c", script_app, root], capture_output=True, text=True, env=env,
                          cwd=root, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "'pycomm.bench.cli'" in done.stdout


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_module_is_short(path):
    with open(path, encoding="utf-8") as fh:
        lines = sum(1 for _ in fh)
    assert lines < MAX_LINES, f"{path.relative_to(PACKAGE)} has {lines} lines; split it below {MAX_LINES}"
