"""The import graph of streammerge/ has no circles (issue #20).

Every module is parsed with `ast`, not imported: imports inside functions and under
TYPE_CHECKING count, because a lazy import is still a dependency in both directions.
Relative imports are resolved, and `from pkg import name` counts as an import of
`pkg.name` when that is a submodule (otherwise of `pkg`). Importing `pkg.mod` also runs
`pkg/__init__.py`, so it counts as importing `pkg` too, unless the importer lives in `pkg`
(its package is already being imported): a package that imports its modules, one of which
is imported back from below, is a circle Python would trip over.
"""

from __future__ import annotations

import ast
from pathlib import Path

import streammerge

ROOT = Path(streammerge.__file__).resolve().parent
PACKAGE = "streammerge"


def module_names(root: Path = ROOT) -> dict[str, Path]:
    """{dotted module name: file} for every .py file below the package root."""
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def _absolute(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute name `from ... import` refers to, relative levels resolved."""
    if node.level == 0:
        return node.module or ""
    anchor = module.split(".")
    if not is_package:
        anchor.pop()
    anchor = anchor[: len(anchor) - (node.level - 1)]
    return ".".join(anchor + ([node.module] if node.module else []))


def imports_of(module: str, path: Path, known: set[str]) -> set[str]:
    """The streammerge modules `module` imports anywhere in its file."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            source = _absolute(module, is_package, node)
            targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in known else source for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import a.b.c` of a name inside a module
                target = target.rpartition(".")[0]
            if target.startswith(PACKAGE + ".") and target != module:
                found.add(target)
                found.update(_packages_entered(module, target))
    return found


def _packages_entered(module: str, target: str) -> list[str]:
    """The packages above `target` that importing it runs, `module`'s own excluded."""
    parts = target.split(".")
    packages = [".".join(parts[:i]) for i in range(2, len(parts))]
    return [p for p in packages if not (module == p or module.startswith(p + "."))]


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    names = module_names(root)
    known = set(names)
    return {m: imports_of(m, p, known) for m, p in names.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def test_no_import_circles():
    found = cycles(import_graph())
    assert not found, "import circles among streammerge modules:\n" + "\n".join(" <-> ".join(c) for c in found)


# Arrows that must point one way (issue #20): shared rules below both backends, formats below
# the jobs that write them. {layer: the streammerge modules it must not import (prefixes)}.
FORBIDDEN = {
    "streammerge.ops": ["streammerge.kernels", "streammerge.encodings", "streammerge.methods.", "streammerge.analysis"],
    "streammerge.kernels": ["streammerge.methods"],
    "streammerge.encodings": ["streammerge.kernels", "streammerge.methods."],
}
ALLOWED = {"streammerge.methods.base"}  # the method contract: imports nothing of streammerge


def test_layers_point_one_way():
    graph = import_graph()
    wrong = sorted(
        f"{m} imports {t}"
        for layer, banned in FORBIDDEN.items()
        for m, targets in graph.items()
        if m == layer or m.startswith(layer + ".")
        for t in targets
        if t not in ALLOWED and any(t == b or t.startswith(b if b.endswith(".") else b + ".") for b in banned)
    )
    assert not wrong, "\n".join(wrong)
    assert not [t for t in graph["streammerge.methods.base"]], "methods/base.py must import nothing of streammerge"


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / PACKAGE


def test_check_finds_lazy_relative_and_submodule_imports(tmp_path):
    """The checker itself: each kind of import it promises to see closes a circle."""
    pkg = _write(
        tmp_path,
        {
            "streammerge/__init__.py": "",
            "streammerge/a/__init__.py": "",
            "streammerge/a/x.py": "def f():\n    from ..b import y\n",  # lazy + relative + submodule
            "streammerge/b/__init__.py": "",
            "streammerge/b/y.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import streammerge.a.x\n",
            "streammerge/c.py": "from streammerge.d import thing\n",  # a name inside a module
            "streammerge/d.py": "from . import c\nthing = 1\n",
            "streammerge/e.py": "import streammerge.c\n",  # one-way: no circle
        },
    )
    assert cycles(import_graph(pkg)) == [["streammerge.a.x", "streammerge.b.y"], ["streammerge.c", "streammerge.d"]]


def test_check_counts_the_package_an_import_enters(tmp_path):
    """Importing a.z from below runs a/__init__.py, which imports a.x: a circle through a."""
    pkg = _write(
        tmp_path,
        {
            "streammerge/__init__.py": "",
            "streammerge/a/__init__.py": "from . import x\n",
            "streammerge/a/x.py": "from ..b import y\n",
            "streammerge/a/z.py": "",
            "streammerge/b/__init__.py": "",
            "streammerge/b/y.py": "from ..a.z import thing\n",
        },
    )
    assert cycles(import_graph(pkg)) == [["streammerge.a", "streammerge.a.x", "streammerge.b.y"]]


def test_check_passes_a_tree_without_circles(tmp_path):
    pkg = _write(
        tmp_path,
        {
            "streammerge/__init__.py": "",
            "streammerge/low.py": "import math\n",
            "streammerge/high.py": "from .low import math\nfrom . import low\n",
        },
    )
    assert cycles(import_graph(pkg)) == []
