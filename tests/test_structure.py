"""The package's shape: imports point one way (entry points -> ddpm modules -> math), no circle,
every module importable on its own, and the entry scripts stay thin."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "ddpm"
MODULES = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")
# the math: knows no training, no files, no other part of the project but the schedule
MATH = {"schedule": set(), "unet": set(), "samplers": {"schedule"}, "likelihood": {"schedule"}}
# what `train.py`, `sample.py` and `eval.py` run: nothing in the package depends on them
ENTRY_LOGIC = {"training", "sampling", "evaluation"}


def project_imports(path: Path) -> tuple[set[str], list[str]]:
    """The ddpm modules a file imports, and those it imports inside a function or class
    (which would hide a circle from an import-time check)."""
    tree = ast.parse(path.read_text())
    found, nested = set(), []
    top_level = {id(node) for node in tree.body}
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ddpm"):
            names = [node.module] if node.module != "ddpm" else [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.startswith("ddpm.")]
        for name in names:
            module = name.removeprefix("ddpm.").split(".")[0]
            found.add(module)
            if id(node) not in top_level:
                nested.append(f"{path.name}:{node.lineno} imports ddpm.{module}")
    return found, nested


GRAPH = {name: project_imports(PACKAGE / f"{name}.py")[0] for name in MODULES}


def find_circle(graph: dict[str, set[str]]) -> list[str] | None:
    """A path of imports that comes back to where it started, or None (depth-first search: a
    module met again while still on the current path closes a circle)."""
    state: dict[str, str] = {}

    def visit(name: str, path: list[str]) -> list[str] | None:
        state[name] = "open"
        for dep in sorted(graph.get(name, ())):
            if state.get(dep) == "open":
                return [*path, name, dep]
            if dep not in state and (circle := visit(dep, [*path, name])):
                return circle
        state[name] = "done"
        return None

    for name in sorted(graph):
        if name not in state and (circle := visit(name, [])):
            return circle
    return None


def test_no_import_circle_and_imports_at_the_top():
    nested = [line for name in MODULES for line in project_imports(PACKAGE / f"{name}.py")[1]]
    assert not nested, f"imports inside functions (hoist them): {nested}"
    circle = find_circle(GRAPH)
    assert circle is None, "import circle: " + " -> ".join(circle or [])


def test_imports_point_one_way():
    for name, allowed in MATH.items():
        assert GRAPH[name] <= allowed, f"ddpm.{name} is math; it imports {GRAPH[name] - allowed}"
    for name in MODULES:
        used = GRAPH[name] & ENTRY_LOGIC
        assert not used, f"ddpm.{name} imports the entry-point logic {used}"
    for script in ("train.py", "sample.py", "eval.py"):
        source = (ROOT / script).read_text()
        assert len(source.splitlines()) <= 120, f"{script} is no longer thin"
        assert "sys.path" not in source


def test_tests_import_the_package_not_the_scripts():
    for path in (ROOT / "tests").glob("*.py"):
        tree = ast.parse(path.read_text())
        modules = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        modules |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        calls = [ast.unparse(n) for n in ast.walk(tree) if isinstance(n, ast.Call)]
        assert not modules & {"train", "sample", "eval"}, path.name
        assert not {m for m in modules if m and m.startswith("test_")}, path.name
        assert not [c for c in calls if c.startswith("sys.path.insert")], path.name
        assert not [c for c in calls if "import_module" in c], path.name


# run in a fresh interpreter: forks one child per ddpm module, none imported before
IMPORT_EACH_ALONE = """
import importlib, multiprocessing as mp, sys
import hydra, lightning, torch, torchmetrics, torchvision  # third-party only, preloaded
assert not [m for m in sys.modules if m.split(".")[0] == "ddpm"]

def alone(name):
    try:
        importlib.import_module("ddpm." + name)
    except Exception as e:  # an import circle: ImportError of a partially initialised module
        return f"{type(e).__name__}: {e}"

names = sys.argv[1:]
with mp.get_context("fork").Pool(2) as pool:
    print({n: e for n, e in zip(names, pool.map(alone, names)) if e})
"""


def test_every_module_imports_on_its_own():
    """Each module imported first in a process of its own. The processes fork from one that
    has loaded the third-party libraries (which cannot hide a circle inside the package) and
    no ddpm module, so the check takes seconds, not the minute of 20 cold interpreters."""
    proc = subprocess.run(
        [sys.executable, "-c", IMPORT_EACH_ALONE, *MODULES],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "{}", proc.stdout


def test_the_checks_can_fail(tmp_path: Path):
    """A circle is found in a graph, a nested import is reported, and a circular pair of
    modules fails the fresh-interpreter import as the package's own would."""
    assert find_circle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_circle({"a": {"b"}, "b": set()}) is None
    source = tmp_path / "m.py"
    source.write_text("from ddpm.render import to_uint8\n\ndef f():\n    import ddpm.module\n")
    assert project_imports(source) == ({"render", "module"}, ["m.py:4 imports ddpm.module"])

    package = tmp_path / "ddpm"  # a stand-in package of the same name, first on the path
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from ddpm.b import g\n\ndef f():\n    return 1\n")
    (package / "b.py").write_text("from ddpm.a import f\n\ndef g():\n    return 2\n")
    proc = subprocess.run(
        [sys.executable, "-c", IMPORT_EACH_ALONE, "a"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
    )
    assert "partially initialized module 'ddpm.a'" in proc.stdout, proc.stdout + proc.stderr
