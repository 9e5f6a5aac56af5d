"""Package layout: every module imports, fedmem's module-level imports form no cycle, and no
module grows past 400 lines without saying why."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

PACKAGES = ("fedmem", "strategies", "simulations")
MAX_LINES = 400
LONG_REASON = "longer than 400 lines because"
# Modules over MAX_LINES whose docstring this layout does not own, with the reason.
LONG_ALLOWED: dict[str, str] = {}  # module -> reason (prefer the docstring phrase)


def _module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the installed packages."""
    out = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


MODULES = _module_files()


def test_every_module_imports():
    """Each module imports in a fresh interpreter (``__main__`` modules would run their CLI)."""
    names = [m for m in MODULES if not m.endswith("__main__")]
    code = (
        "import importlib, sys\n"
        "bad = []\n"
        f"for name in {names!r}:\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception as e:\n"
        "        bad.append(f'{name}: {type(e).__name__}: {e}')\n"
        "print('\\n'.join(bad))\n"
        "sys.exit(1 if bad else 0)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _top_level_imports(body: list[ast.stmt]) -> list[ast.Import | ast.ImportFrom]:
    """Import statements that run when the module is imported: module level, including inside
    top-level ``try`` / ``if`` blocks, but not in functions, classes or ``if TYPE_CHECKING:``."""
    out: list[ast.Import | ast.ImportFrom] = []
    for node in body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            out.append(node)
        elif isinstance(node, ast.If):
            if not _is_type_checking(node):
                out += _top_level_imports(node.body)
            out += _top_level_imports(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody):
                out += _top_level_imports(block)
            for handler in node.handlers:
                out += _top_level_imports(handler.body)
        elif isinstance(node, ast.With):
            out += _top_level_imports(node.body)
    return out


def import_graph() -> dict[str, set[str]]:
    """fedmem module -> the fedmem modules it imports at module level.

    ``from pkg import name`` counts as importing ``pkg.name`` when that is a module, else
    ``pkg``; relative imports are resolved against the module's package.
    """
    fedmem = {m: p for m, p in MODULES.items() if m.split(".")[0] == "fedmem"}
    graph: dict[str, set[str]] = {}
    for name, path in fedmem.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps: set[str] = set()
        for node in _top_level_imports(ast.parse(path.read_text()).body):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join([*anchor, *([base] if base else [])])
                targets = [
                    f"{base}.{a.name}" if f"{base}.{a.name}" in fedmem else base for a in node.names
                ]
            deps |= {t for t in targets if t in fedmem and t != name}
        graph[name] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return stack[stack.index(dep) :] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle():
    graph = import_graph()
    assert graph["fedmem.runs.central"] >= {"fedmem.models.factory", "fedmem.privacy.epsilon"}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_cycle_checker_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_leaf_modules_stay_leaves():
    """``stats``, ``reporting.tables`` and ``privacy.epsilon`` import nothing from fedmem but
    its errors and config."""
    graph = import_graph()
    for leaf in ("fedmem.stats", "fedmem.reporting.tables", "fedmem.privacy.epsilon"):
        assert graph[leaf] <= {"fedmem.errors", "fedmem.config"}, (leaf, graph[leaf])


def test_modules_are_short_or_say_why():
    long = []
    for name, path in MODULES.items():
        if name.split(".")[0] != "fedmem" or name in LONG_ALLOWED:
            continue
        text = path.read_text()
        lines = len(text.splitlines())
        doc = ast.get_docstring(ast.parse(text)) or ""
        if lines > MAX_LINES and LONG_REASON not in " ".join(doc.split()):
            long.append(f"{name}: {lines} lines")
    assert not long, f"modules over {MAX_LINES} lines without '{LONG_REASON} ...': {long}"
