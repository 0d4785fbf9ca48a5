"""hpckd's import graph: no cycles, and no import from a lower layer to a higher one (docs/architecture.md).

Every module of the package is parsed with :mod:`ast` (nothing is imported), and every import in it counts, wherever
it stands -- at module level, inside a function or a class, under ``if``/``try`` or ``TYPE_CHECKING``:

* ``import hpckd.a.b`` and ``from hpckd.a import b`` (an edge to the submodule ``hpckd.a.b`` when it exists, else
  to the package ``hpckd.a``, whose ``__init__`` defines the name), relative imports (``from .x import y``,
  ``from .. import z``);
* ``importlib.import_module("hpckd.a")`` / ``__import__("hpckd.a")`` with a literal name;
* in a module that also calls ``import_module`` / ``__import__`` with a computed name (a PEP 562 lazy table),
  every string literal in it that names an hpckd module.

Importing ``hpckd.a.b`` also runs the ``__init__`` of ``hpckd`` and ``hpckd.a``; those implicit parent edges are
not counted (they would make every package that re-exports its submodules a cycle).

The walker is tested on a small synthetic package first, so a green result on hpckd means something.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from tests.helpers import REPO

# The one copy of the layer table (lowest first). A module may import from its own layer or a lower one. An entry
# names a module or a package (all its submodules); the root package name matches only the root __init__.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("hpckd.errors",),
    ("hpckd.io", "hpckd.config"),
    ("hpckd.dist", "hpckd.precision", "hpckd.checkpoint", "hpckd.runlock"),
    ("hpckd.data", "hpckd.models"),
    ("hpckd.teachers",),
    ("hpckd.losses",),
    ("hpckd.metrics",),
    ("hpckd.train",),
    ("hpckd.bench", "hpckd.report"),
    ("hpckd.sweep",),
    ("hpckd.cli", "hpckd.__main__", "hpckd"),
)

DYNAMIC_IMPORTERS = ("import_module", "__import__")


@dataclass(frozen=True)
class Import:
    """One import statement's target inside the package (which may not exist), ``line`` in the importing file."""

    target: str
    line: int


# ------------------------------------------------------------------------------------------------ the walker


def package_modules(root: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` under ``root/package`` (a package is its ``__init__.py``)."""
    modules = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if "__pycache__" in parts:
            continue
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _absolute(module: str, is_package: bool, level: int, name: str | None) -> str:
    """The absolute name of a relative import ``from <level dots><name> import ...`` written in ``module``."""
    base = module.split(".")
    if not is_package:
        base.pop()  # a plain module's relative imports start at its package
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join([*base, name] if name else base)


def _literal(node: ast.AST | None) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def _call_name(call: ast.Call) -> str | None:
    func = call.func
    if isinstance(func, ast.Attribute):
        return func.attr
    return func.id if isinstance(func, ast.Name) else None


def imports_of(module: str, path: Path, modules: dict[str, Path], package: str) -> list[Import]:
    """Every import of a module of ``package`` that ``module`` makes (see the module docstring for what counts)."""
    is_package = path.name == "__init__.py"
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[Import] = []

    def add(name: str, line: int) -> None:
        if name == package or name.startswith(package + "."):
            found.append(Import(name, line))

    dynamic = False
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(module, is_package, node.level, node.module) if node.level else node.module or ""
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                add(sub if sub in modules else base, node.lineno)  # a submodule, or a name defined in `base`
        elif isinstance(node, ast.Call) and _call_name(node) in DYNAMIC_IMPORTERS and node.args:
            name = _literal(node.args[0])
            if name is None:
                dynamic = True
                continue
            if name.startswith("."):  # import_module(".x", "hpckd.a")
                anchor = _literal(node.args[1]) if len(node.args) > 1 else None
                anchor = anchor or next((_literal(k.value) for k in node.keywords if k.arg == "package"), None)
                if anchor is None:
                    continue
                level = len(name) - len(name.lstrip("."))
                name = _absolute(anchor, True, level, name.lstrip(".") or None)
            add(name, node.lineno)
    if dynamic:  # names handed to import_module through a table: every string literal naming a submodule
        for node in ast.walk(tree):  # (not the bare package name, which is also every logger's name)
            name = _literal(node)
            if name is not None and name in modules and name != package:
                add(name, node.lineno)
    return [i for i in found if i.target != module]


def import_graph(root: Path, package: str) -> tuple[dict[str, Path], dict[str, list[Import]]]:
    modules = package_modules(root, package)
    return modules, {name: imports_of(name, path, modules, package) for name, path in modules.items()}


def layer_of(module: str, layers: tuple[tuple[str, ...], ...], package: str) -> int | None:
    """Index of the layer whose longest entry is ``module`` or a package holding it; None when no entry does."""
    best: tuple[int, int] | None = None  # (entry length, layer)
    for index, entries in enumerate(layers):
        for entry in entries:
            covers = module == entry or (entry != package and module.startswith(entry + "."))
            if covers and (best is None or len(entry) > best[0]):
                best = (len(entry), index)
    return None if best is None else best[1]


def _where(modules: dict[str, Path], module: str, root: Path, lines: list[int]) -> str:
    rel = modules[module].relative_to(root).as_posix()
    return f"{rel}:{','.join(str(n) for n in sorted(set(lines)))}"


def layer_violations(root: Path, package: str, layers: tuple[tuple[str, ...], ...]) -> list[str]:
    """One line per offending (importer, imported) pair: ``a.b imports c.d (L5 -> L7) at a/b.py:12``; also
    modules in no layer and imports of modules that do not exist."""
    modules, graph = import_graph(root, package)
    problems = [f"{m} is in no layer of the table ({modules[m].relative_to(root).as_posix()})"
                for m in modules if layer_of(m, layers, package) is None]
    for module, found in graph.items():
        pairs: dict[str, list[int]] = defaultdict(list)
        for imp in found:
            pairs[imp.target].append(imp.line)
        for target, lines in sorted(pairs.items()):
            where = _where(modules, module, root, lines)
            if target not in modules:
                problems.append(f"{module} imports {target} (no such module) at {where}")
                continue
            low, high = layer_of(module, layers, package), layer_of(target, layers, package)
            if low is not None and high is not None and high > low:
                problems.append(f"{module} imports {target} (L{low} -> L{high}) at {where}")
    return problems


def import_knots(root: Path, package: str) -> list[tuple[list[str], list[str]]]:
    """``(cycle, component)`` per strongly connected component of the import graph with more than one module:
    the component's modules, sorted, and a shortest cycle ``[a, b, ..., a]`` through its first one."""
    modules, graph = import_graph(root, package)
    edges = {m: sorted({i.target for i in found if i.target in modules}) for m, found in graph.items()}
    return [(_shortest_cycle(c, edges), c) for c in strongly_connected(edges)]


def import_cycles(root: Path, package: str) -> list[list[str]]:
    """One cycle per strongly connected component (see :func:`import_knots`)."""
    return [cycle for cycle, _ in import_knots(root, package)]


def strongly_connected(edges: dict[str, list[str]]) -> list[list[str]]:
    """The components of more than one node, each sorted (Tarjan's algorithm, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, 0)]
        while work:
            node, i = work.pop()
            if i == 0:
                index[node] = low[node] = len(index)
                stack.append(node)
                on_stack.add(node)
            if i < len(edges[node]):
                work.append((node, i + 1))
                nxt = edges[node][i]
                if nxt not in index:
                    work.append((nxt, 0))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
    return sorted(components)


def _shortest_cycle(component: list[str], edges: dict[str, list[str]]) -> list[str]:
    """Breadth-first from the component's first module back to itself, inside the component."""
    inside, first = set(component), component[0]
    parents: dict[str, str] = {}
    frontier = [first]
    while frontier:
        following = []
        for node in frontier:
            for nxt in edges[node]:
                if nxt == first:
                    path = [node]  # node, its parent, ..., first
                    while path[-1] != first:
                        path.append(parents[path[-1]])
                    return [*reversed(path), first]
                if nxt in inside and nxt not in parents:
                    parents[nxt] = node
                    following.append(nxt)
        frontier = following
    raise AssertionError(f"no cycle through {first} in its own component {component}")


def layer_table_markdown(layers: tuple[tuple[str, ...], ...] = LAYERS) -> str:
    """The layer table as it stands in docs/architecture.md (lowest layer first)."""
    rows = ["| Layer | Modules (a module imports only from its own layer and lower-numbered ones) |",
            "|-------|----------------------------------------------------------------------------|"]
    rows += [f"| L{k} | {', '.join(f'`{e}`' for e in entries)} |" for k, entries in enumerate(layers)]
    return "\n".join(rows)


# ------------------------------------------------------------------------------------------------ on hpckd


def test_hpckd_has_no_import_cycles():
    knots = import_knots(REPO, "hpckd")
    lines = [" -> ".join(cycle) + (f"  (one of the cycles among {', '.join(component)})"
                                   if len(component) + 1 > len(cycle) else "") for cycle, component in knots]
    assert not knots, "import cycles (module level and function level):\n" + "\n".join(lines)


def test_hpckd_imports_only_from_its_own_layer_or_lower():
    problems = layer_violations(REPO, "hpckd", LAYERS)
    assert not problems, (f"{len(problems)} import(s) against the layer order (tests/test_architecture.py LAYERS):\n"
                          + "\n".join(problems))


def test_docs_show_the_layer_table_of_this_test():
    docs = REPO / "docs" / "architecture.md"
    table = layer_table_markdown()
    text = docs.read_text() if docs.is_file() else ""
    assert table in text, f"docs/architecture.md must show the layer order of this test, as:\n\n{table}\n"


# ------------------------------------------------------------------------------ the walker on a known package


def write_package(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


SYNTH_LAYERS = (("pkg.low",), ("pkg.mid",), ("pkg.high", "pkg"))


def synthetic_package(tmp_path: Path) -> Path:
    """pkg.low (L0) < pkg.mid (L1) < pkg.high, pkg (L2), with, written down by hand:

    * legal: high -> low (relative ``from . import``), high -> mid.util (``import pkg.mid.util``), mid.util -> low
      (``from ..low import``), mid.lazy -> low (through a PEP 562 table; its logger name 'pkg' is no import),
      pkg -> high (``from pkg.high import``);
    * upward: low -> high (inside a function), mid -> high (``importlib.import_module`` with a literal);
    * a cycle low -> high -> low;
    * pkg.stray, in no layer; pkg.mid.util imports pkg.gone, which does not exist.
    """
    write_package(tmp_path, {
        "pkg/__init__.py": "from pkg.high import answer\n",
        "pkg/low.py": "import os\n\n\ndef late():\n    from pkg import high\n    return high\n",
        "pkg/high.py": "import json\nimport pkg.mid.util\nfrom . import low\n\nanswer = 42\n",
        "pkg/mid/__init__.py": "import importlib\n\nHIGH = importlib.import_module('pkg.high')\n",
        "pkg/mid/util.py": "from ..low import late\n\ntry:\n    from pkg.gone import thing\nexcept ImportError:\n"
                           "    thing = None\n",
        "pkg/mid/lazy.py": "import importlib\n\n_LAZY = {'late': 'pkg.low'}\nLOGGER = 'pkg'\n\n\n"
                           "def __getattr__(name):\n    return getattr(importlib.import_module(_LAZY[name]), name)\n",
        "pkg/stray.py": "VALUE = 'pkg.low is mentioned here but never imported'\n",
    })
    return tmp_path


def test_walker_finds_every_kind_of_import_in_a_known_package(tmp_path):
    root = synthetic_package(tmp_path)
    modules, graph = import_graph(root, "pkg")
    assert sorted(modules) == ["pkg", "pkg.high", "pkg.low", "pkg.mid", "pkg.mid.lazy", "pkg.mid.util", "pkg.stray"]
    edges = {m: sorted({(i.target, i.line) for i in found}) for m, found in graph.items()}
    assert edges == {
        "pkg": [("pkg.high", 1)],
        "pkg.low": [("pkg.high", 5)],
        "pkg.high": [("pkg.low", 3), ("pkg.mid.util", 2)],
        "pkg.mid": [("pkg.high", 3)],
        "pkg.mid.util": [("pkg.gone", 4), ("pkg.low", 1)],
        "pkg.mid.lazy": [("pkg.low", 3)],
        "pkg.stray": [],
    }


def test_walker_reports_upward_imports_unknown_modules_and_missing_targets(tmp_path):
    root = synthetic_package(tmp_path)
    assert layer_violations(root, "pkg", SYNTH_LAYERS) == [
        "pkg.stray is in no layer of the table (pkg/stray.py)",
        "pkg.low imports pkg.high (L0 -> L2) at pkg/low.py:5",
        "pkg.mid imports pkg.high (L1 -> L2) at pkg/mid/__init__.py:3",
        "pkg.mid.util imports pkg.gone (no such module) at pkg/mid/util.py:4",
    ]


def test_walker_reports_the_cycle_and_accepts_a_legal_package(tmp_path):
    root = synthetic_package(tmp_path)
    assert import_cycles(root, "pkg") == [["pkg.high", "pkg.low", "pkg.high"]]
    # The same package with the two upward imports and the strays removed: nothing to report.
    write_package(root, {"pkg/low.py": "import os\n", "pkg/mid/__init__.py": "import importlib\n",
                         "pkg/mid/util.py": "from ..low import os\n"})
    (root / "pkg" / "stray.py").unlink()
    assert import_cycles(root, "pkg") == []
    assert layer_violations(root, "pkg", SYNTH_LAYERS) == []


def test_layer_lookup_takes_the_longest_entry_and_matches_the_root_only_exactly():
    layers = (("pkg.a",), ("pkg.a.top",), ("pkg",))
    assert layer_of("pkg.a.x", layers, "pkg") == 0
    assert layer_of("pkg.a.top.y", layers, "pkg") == 1
    assert layer_of("pkg", layers, "pkg") == 2
    assert layer_of("pkg.ab", layers, "pkg") is None  # a prefix of the name is not a package holding it
    assert layer_of("pkg.other", layers, "pkg") is None
