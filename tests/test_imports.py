"""Static checks of the package layout: no import cycle, small modules, imports at the top.

The import graph is read from the source with ``ast`` (nothing is imported): one node per module
of ``quasar_jax`` and ``pallas_kernels``, one edge per ``import`` / ``from ... import`` statement
naming a project module, wherever it stands (module level or inside a function; a lazy import is
a dependency too). ``from pkg import name`` points at ``pkg.name`` when that is a module, else at
``pkg``. The implicit import of a parent package (``import a.b`` runs ``a/__init__``) is not an
edge: it is always under way already when a submodule loads, so it cannot form a cycle.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("quasar_jax", "pallas_kernels")
MAX_LINES = 450
# Heavy optional dependencies that a quasar_jax module may import inside a function.
LAZY_OK = ("torch", "transformers", "matplotlib", "orbax", "huggingface_hub",
           "pallas_kernels.int8_matmul.gpu", "pallas_kernels.int8_matmul.tpu")
# Command-line entry modules: they parse (and answer --help) without JAX, so the runtime they
# drive is imported inside their ``run`` function -- the one place a project import may be deferred.
CLI_MODULES = ("quasar_jax.decode", "quasar_jax.convert", "quasar_jax.bench.cli", "quasar_jax.fidelity.cli",
               "quasar_jax.serve", "quasar_jax.train_heads")
CLI_COMMANDS = ("quasar_jax.decode", "quasar_jax.convert", "quasar_jax.bench", "quasar_jax.fidelity",
                "quasar_jax.serve", "quasar_jax.train_heads")


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return mods


MODULES = _modules()


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST, in_function: bool = False):
    """``(import node, inside a function or class)`` for every import that runs (not TYPE_CHECKING)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node, in_function
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            yield from _imports(ast.Module(body=node.orelse, type_ignores=[]), in_function)
        else:
            nested = isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef))
            yield from _imports(node, in_function or nested)


def _loaded_modules(node, module: str) -> list[str]:
    """Absolute dotted names of the modules one import statement in ``module`` loads."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:
        is_pkg = MODULES[module].name == "__init__.py"
        base = module.split(".") if is_pkg else module.split(".")[:-1]
        base = base[:len(base) - (node.level - 1)]
        prefix = ".".join(base + ([node.module] if node.module else []))
    else:
        prefix = node.module
    return [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in MODULES else prefix for a in node.names]


def _resolve(name: str) -> str | None:
    """``name`` when it is a project module, None when it is external (fails on a missing one)."""
    if name.split(".")[0] not in PACKAGES:
        return None
    assert name in MODULES, f"{name!r} is no module of {' or '.join(PACKAGES)}"
    return name


def _trees() -> dict[str, ast.Module]:
    return {m: ast.parse(p.read_text(), str(p)) for m, p in MODULES.items()}


def import_graph() -> dict[str, set[str]]:
    graph = {}
    for module, tree in _trees().items():
        targets = graph.setdefault(module, set())
        for node, _ in _imports(tree):
            for name in _loaded_modules(node, module):
                try:
                    target = _resolve(name)
                except AssertionError as err:
                    raise AssertionError(f"{module}, line {node.lineno}: {err}") from None
                if target:
                    targets.add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as ``[a, b, ..., a]``, or None when it has none."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def _run_function_imports(tree: ast.Module) -> set[int]:
    """Line numbers of the imports inside a top-level ``def run`` (a CLI's deferred runtime)."""
    return {n.lineno for f in tree.body if isinstance(f, ast.FunctionDef) and f.name == "run"
            for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}


def _lazy_imports(prefixes: tuple[str, ...]) -> list[str]:
    """``module:line name`` of each import inside a function of those modules, but ``LAZY_OK``
    and a CLI module's ``run``."""
    bad = []
    for module, tree in _trees().items():
        if not module.startswith(prefixes):
            continue
        deferred = _run_function_imports(tree) if module in CLI_MODULES else set()
        for node, in_function in _imports(tree):
            if node.lineno in deferred:
                continue
            for name in _loaded_modules(node, module) if in_function else []:
                if not any(name == ok or name.startswith(ok + ".") for ok in LAZY_OK):
                    bad.append(f"{module}:{node.lineno} {name}")
    return list(dict.fromkeys(bad))


def test_find_cycle_reports_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"a"}}) == ["a", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_relative_imports_resolve():
    def loaded(src, module):
        return _loaded_modules(ast.parse(src).body[0], module)

    assert loaded("from .metrics import summarize", "quasar_jax.bench.run") == ["quasar_jax.bench.metrics"]
    assert loaded("from . import modes", "quasar_jax.bench") == ["quasar_jax.bench.modes"]
    assert loaded("from .. import serving, Engine", "quasar_jax.bench.run") == [
        "quasar_jax.serving", "quasar_jax"]
    assert loaded("from ..speculative import engine", "quasar_jax.bench.run") == ["quasar_jax.speculative.engine"]


def test_graph_sees_function_level_imports():
    graph = import_graph()
    assert "quasar_jax.speculative.engine" in graph["quasar_jax.fidelity.cli"]  # inside run()
    assert "quasar_jax.fidelity.metrics" in graph["quasar_jax.bench.metrics"]
    assert "pallas_kernels.int8_matmul.gpu" in graph["pallas_kernels.int8_matmul.wrapper"]  # lazy


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_fidelity_does_not_import_bench():
    graph = import_graph()
    assert not any(t.startswith("quasar_jax.bench") for m, ts in graph.items()
                   if m.startswith("quasar_jax.fidelity") for t in ts)


def test_modules_are_small():
    big = {m: n for m, p in MODULES.items() if m.startswith("quasar_jax")
           and (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not big, f"modules over {MAX_LINES} lines: {big}"


def test_quasar_jax_imports_at_top():
    bad = _lazy_imports(("quasar_jax",))
    assert not bad, "imports inside functions (only " + ", ".join(LAZY_OK) + " may be): " + "; ".join(bad)


@pytest.mark.parametrize("command", CLI_COMMANDS)
def test_help_does_not_start_jax(command):
    """``python -m quasar_jax.X --help`` answers without importing JAX (fast)."""
    probe = ("import runpy, sys\nsys.argv = ['prog', '--help']\ntry:\n"
             f"    runpy.run_module({command!r}, run_name='__main__', alter_sys=True)\n"
             "except SystemExit as e:\n    assert e.code in (0, None), e.code\n"
             "print('JAX' if 'jax' in sys.modules else 'NOJAX')")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "NOJAX" and "usage:" in proc.stdout


def test_every_package_is_installed():
    """Each directory with an ``__init__.py`` is listed in pyproject.toml's packages (a package
    left out installs nowhere: the command then fails only after ``pip install .``)."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {m for m, p in MODULES.items() if p.name == "__init__.py"}
    assert found <= listed, f"packages missing from pyproject.toml: {sorted(found - listed)}"
