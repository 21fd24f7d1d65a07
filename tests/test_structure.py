"""The package's shape: rooms by concept (data/, metrics/, run/, cli/ around the model and the
math), imports pointing one way between them, no circle, no module over 500 lines or function
over 80, every module importable on its own, and the entry scripts thin."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "ddpm"


def _dotted(path: Path) -> str:
    """ddpm/data/folder.py -> "data.folder"; ddpm/data/__init__.py -> "data"."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


FILES = {_dotted(p): p for p in sorted(PACKAGE.rglob("*.py")) if _dotted(p)}
MODULES = sorted(FILES)
ROOMS = ("data", "metrics", "run", "cli")  # the folders; everything else is the top
# the math: knows no training, no files, no other part of the project but these
MATH = {
    "schedule": set(),
    "unet": set(),
    "adm": set(),
    "sampler_base": set(),
    "grids": set(),
    "edm": {"schedule", "sampler_base"},
    "abm": {"schedule", "sampler_base", "grids"},
    "samplers": {"schedule", "sampler_base", "grids", "edm", "abm"},
    "likelihood": {"schedule"},
    "objectives": {"schedule", "likelihood"},
    "resample": set(),
    "distill": {"schedule", "sampler_base", "samplers", "grids"},
}
# `python -m ddpm.results` is kept at its name: an entry point, allowed to import cli/
ENTRY_SHIMS = {"results"}
# (ddpm/__init__.py, the package itself, is not among them: it loads `load_module` when first
# asked for (PEP 562), so that importing ddpm.schedule needs no Lightning)


def room(module: str) -> str:
    """The folder a module lives in ("data", "cli" ...), or "top"."""
    first = module.split(".")[0]
    return first if first in ROOMS else "top"


def _target(name: str) -> str:
    """The project module an import names: "data.folder", or the package "data" itself."""
    name = name.removeprefix("ddpm").removeprefix(".")
    while name and name not in FILES:
        name = name.rpartition(".")[0]
    return name


def project_imports(path: Path) -> tuple[set[str], list[str]]:
    """The ddpm modules a file imports (dotted below ddpm: "schedule", "data.folder"), and
    those it imports inside a function or class (which would hide a circle from an
    import-time check)."""
    tree = ast.parse(path.read_text())
    found, nested = set(), []
    top_level = {id(node) for node in tree.body}
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ddpm"):
            # `from ddpm.run import callbacks` imports the module ddpm.run.callbacks
            names = [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.startswith("ddpm.")]
        for name in names:
            module = _target(name)
            if not module:
                continue
            found.add(module)
            if id(node) not in top_level:
                nested.append(f"{path.name}:{node.lineno} imports ddpm.{module}")
    return found, nested


GRAPH = {name: project_imports(FILES[name])[0] - {name} for name in MODULES}


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
    nested = [line for name in MODULES for line in project_imports(FILES[name])[1]]
    assert not nested, f"imports inside functions (hoist them): {nested}"
    circle = find_circle(GRAPH)
    assert circle is None, "import circle: " + " -> ".join(circle or [])


def layer_problems(graph: dict[str, set[str]]) -> list[str]:
    """What breaks the layers: the math imports beyond its own; the model and the math (the
    top) import a room; data/ and metrics/ import each other; run/ imports cli/; anything but
    an entry shim imports cli/."""
    problems = []
    for name, deps in sorted(graph.items()):
        if name in MATH and not deps <= MATH[name]:
            problems.append(f"ddpm.{name} is math; it imports {sorted(deps - MATH[name])}")
        rooms = {room(d) for d in deps if d}
        where = room(name)
        if where == "top" and name not in ENTRY_SHIMS and rooms - {"top"}:
            problems.append(f"ddpm.{name} is the model/math; it imports {sorted(rooms - {'top'})}")
        if {where, *rooms} >= {"data", "metrics"} and where in ("data", "metrics"):
            problems.append(f"ddpm.{name} ({where}/) imports the other of data/ and metrics/")
        if where == "run" and "cli" in rooms:
            problems.append(f"ddpm.{name} (run/) imports cli/")
        if where != "cli" and name not in ENTRY_SHIMS and "cli" in rooms:
            problems.append(f"ddpm.{name} imports cli/, which nothing in the package may")
    return problems


def test_imports_point_one_way():
    assert layer_problems(GRAPH) == []
    assert set(ROOMS) <= set(FILES), "a room lost its package"
    for script in ("train.py", "sample.py", "eval.py"):
        source = (ROOT / script).read_text()
        assert len(source.splitlines()) <= 120, f"{script} is no longer thin"
        assert "sys.path" not in source
        assert {room(m) for m in project_imports(ROOT / script)[0]} <= {"cli", "run"}


def test_size_limits():
    """No module over 500 lines and no function over 80: one concept per file."""
    long = []
    for path in FILES.values():
        text = path.read_text()
        if len(text.splitlines()) > 500:
            long.append(f"{path.relative_to(ROOT)}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                size = node.end_lineno - node.lineno + 1
                if size > 80:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {size}")
    assert not long, long


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
    source.write_text("from ddpm.images import to_uint8\n\ndef f():\n    import ddpm.module\n")
    assert project_imports(source) == ({"images", "module"}, ["m.py:4 imports ddpm.module"])
    source.write_text("from ddpm.run import callbacks\nfrom ddpm.data.folder import x\n")
    assert project_imports(source)[0] == {"run.callbacks", "data.folder"}
    assert layer_problems({"samplers": {"schedule", "module"}}) == [
        "ddpm.samplers is math; it imports ['module']"
    ]
    assert layer_problems({"module": {"run.stopping"}}) == [
        "ddpm.module is the model/math; it imports ['run']"
    ]
    assert layer_problems({"data.latents": {"metrics.fid"}}) == [
        "ddpm.data.latents (data/) imports the other of data/ and metrics/"
    ]
    assert layer_problems({"run.callbacks": {"cli.sample"}}) == [
        "ddpm.run.callbacks (run/) imports cli/",
        "ddpm.run.callbacks imports cli/, which nothing in the package may",
    ]
    assert layer_problems({"results": {"cli.results"}, "cli.eval": {"run.tracking"}}) == []

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
