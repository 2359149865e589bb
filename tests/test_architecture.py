"""The import arrows between dipgo's files point one way: down the floors of docs/ARCHITECTURE.md.

Every module of the package is parsed with ``ast`` (top-level and function-local imports alike:
a lazy import hides a circle from the interpreter, not from a reader), ``dipgo.<pkg>...`` is
resolved to a file through pyproject's ``[tool.setuptools.package-dir]``, and the test fails on
any circle between files and on any arrow from a lower floor to a higher one. The checker itself
is tested on tiny fake graphs, so a broken checker cannot pass silently.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Lowest first; a module may import its own floor (without a circle) and the floors below it.
# A file entry ("search/run.py") outranks its folder's entry ("search/").
FLOORS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("ground", ("dipgo/errors.py", "dipgo/files.py", "configs/")),
    ("measure", ("measure/",)),
    ("models+kernels", ("models/", "kernels/")),
    ("supernets+losses", ("supernets/", "losses/")),
    ("postprocess", ("postprocess/",)),
    ("search", ("search/",)),
    ("report", ("report/",)),
    ("drive", ("search/run.py", "search/sweep.py")),
    ("cli", ("dipgo/cli.py", "dipgo/commands.py", "dipgo/__main__.py")),
    ("facade", ("dipgo/__init__.py",)),  # lazy re-exports only (dipgo.enable, ...)
)


def package_dirs(root: Path) -> dict[str, str]:
    """``{"dipgo.search": "search", ...}`` from pyproject's ``[tool.setuptools.package-dir]``."""
    text = (root / "pyproject.toml").read_text()
    section = re.search(r"\[tool\.setuptools\.package-dir\](.*?)(?:\n\[|\Z)", text, re.S)
    assert section, "pyproject.toml has no [tool.setuptools.package-dir]"
    return dict(re.findall(r'^\s*"([\w.]+)"\s*=\s*"([^"]+)"', section.group(1), re.M))


def module_file(module: str, dirs: Mapping[str, str], root: Path) -> str | None:
    """The file (relative, posix) that ``module`` names, or ``None`` when it is not a dipgo file."""
    parts = module.split(".")
    for i in range(len(parts), 0, -1):
        head = ".".join(parts[:i])
        if head in dirs:
            base = root / dirs[head] / Path(*parts[i:]) if parts[i:] else root / dirs[head]
            for cand in (base.with_suffix(".py"), base / "__init__.py"):
                if cand.is_file():
                    return cand.relative_to(root).as_posix()
            return None
    return None


def imported_files(tree: ast.AST, dirs: Mapping[str, str], root: Path) -> set[str]:
    """Files a module imports anywhere in its body. ``from pkg import name`` points at the
    module ``pkg.name`` when there is one, else at ``pkg`` (its ``__init__``)."""
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [module_file(a.name, dirs, root) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            targets = [module_file(f"{node.module}.{a.name}", dirs, root) or module_file(node.module, dirs, root)
                       for a in node.names]
        else:
            continue
        out.update(t for t in targets if t is not None)
    return out


def import_graph(root: Path) -> dict[str, set[str]]:
    """``{file: files it imports}`` over every module of the package."""
    dirs = package_dirs(root)
    graph: dict[str, set[str]] = {}
    for folder in sorted(set(dirs.values())):
        for path in sorted((root / folder).rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            graph[rel] = imported_files(ast.parse(path.read_text(), rel), dirs, root) - {rel}
    return graph


def cycles(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one file (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def floor_of(path: str, floors: tuple[tuple[str, tuple[str, ...]], ...] = FLOORS) -> int | None:
    """Index of the floor a file is on: an exact file entry first, else its longest folder entry."""
    best: tuple[int, int] | None = None  # (specificity, floor)
    for i, (_, entries) in enumerate(floors):
        for entry in entries:
            if entry == path:
                return i
            if entry.endswith("/") and path.startswith(entry) and (best is None or len(entry) > best[0]):
                best = (len(entry), i)
    return None if best is None else best[1]


def upward_arrows(graph: Mapping[str, Iterable[str]],
                  floors: tuple[tuple[str, tuple[str, ...]], ...] = FLOORS) -> list[str]:
    """Every ``a -> b`` where ``b`` sits on a higher floor than ``a``."""
    bad = []
    for a, targets in sorted(graph.items()):
        for b in sorted(targets):
            fa, fb = floor_of(a, floors), floor_of(b, floors)
            if fa is not None and fb is not None and fb > fa:
                bad.append(f"{a} ({floors[fa][0]}) -> {b} ({floors[fb][0]})")
    return bad


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph(ROOT)


def test_the_graph_sees_the_package(graph: dict[str, set[str]]) -> None:
    assert "search/run.py" in graph and "measure/macs.py" in graph
    assert "measure/macs.py" in graph["supernets/reuse.py"]  # a top-level import
    assert "search/reuse_task.py" in graph["search/tasks.py"]  # a function-local one


def test_every_module_is_on_a_floor(graph: dict[str, set[str]]) -> None:
    assert [f for f in graph if floor_of(f) is None] == []


def test_no_import_circles_between_files(graph: dict[str, set[str]]) -> None:
    assert cycles(graph) == []


def test_imports_follow_the_floor_order(graph: dict[str, set[str]]) -> None:
    assert upward_arrows(graph) == []


def test_only_the_entry_points_import_the_report(graph: dict[str, set[str]]) -> None:
    importers = {a for a, targets in graph.items() for b in targets if b.startswith("report/")}
    assert importers - {f for f in importers if f.startswith("report/")} <= {
        "search/run.py", "dipgo/commands.py", "dipgo/cli.py"}


def test_checker_finds_a_circle() -> None:
    fake = {"a.py": {"b.py"}, "b.py": {"c.py"}, "c.py": {"a.py"}, "d.py": {"a.py"}}
    assert cycles(fake) == [["a.py", "b.py", "c.py"]]
    assert cycles({"a.py": {"b.py"}, "b.py": set()}) == []


def test_checker_finds_an_upward_arrow() -> None:
    floors = (("low", ("low/",)), ("high", ("high/", "low/special.py")))
    fake = {"low/x.py": {"high/y.py", "low/z.py"}, "high/y.py": {"low/z.py"}, "low/special.py": {"high/y.py"}}
    assert upward_arrows(fake, floors) == ["low/x.py (low) -> high/y.py (high)"]


def test_parser_sees_function_local_and_package_imports(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text('[tool.setuptools.package-dir]\n"dipgo" = "pkg"\n"dipgo.sub" = "sub"\n')
    (tmp_path / "pkg").mkdir()
    (tmp_path / "sub").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "sub" / "__init__.py").write_text("VALUE = 1\n")
    (tmp_path / "sub" / "leaf.py").write_text("def f():\n    from dipgo.sub import VALUE\n    return VALUE\n")
    (tmp_path / "pkg" / "top.py").write_text(
        "import dipgo.sub.leaf\n\ndef g():\n    from dipgo.sub import leaf\n    import os\n    return leaf, os\n")
    g = import_graph(tmp_path)
    assert g["pkg/top.py"] == {"sub/leaf.py"}
    assert g["sub/leaf.py"] == {"sub/__init__.py"}
