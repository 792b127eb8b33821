"""The import structure of kmim, read from the source with ``ast`` (imports inside functions included).

- no import cycle between kmim modules;
- ``kmim.files`` (the ground floor) imports nothing of kmim;
- ``kmim.datasets`` (the dataset contract) imports nothing from ``kmim.tokenizers``, ``kmim.pipeline``,
  ``kmim.trainer``;
- ``kmim.pipeline`` and ``kmim.trainer`` never import each other;
- ``kmim.report`` (the HTML report) imports neither ``kmim.pipeline`` nor ``kmim.trainer``;
- ``kmim.serve`` imports neither ``kmim.tokenizers``, ``kmim.pipeline`` nor ``kmim.trainer``; only the CLI imports
  it;
- no function in kmim is longer than a screen (60 lines).

An edge ``a -> b`` is an ``import`` / ``from ... import`` statement in module ``a`` naming module ``b`` (or a name
defined in ``b``); the parent packages Python imports on the way are not edges. ``importlib`` calls are not seen.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _modules() -> dict[str, Path]:
    """``{dotted module name: source file}`` of every module and package under kmim/."""
    found = {}
    for path in sorted((ROOT / "kmim").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imported(node: ast.Import | ast.ImportFrom, package: str) -> list[str]:
    """The dotted names an import statement in ``package`` names: modules, or names inside modules."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:  # relative: ``from ..x import y`` inside package a.b.c is a.b.x.y
        anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
        base = ".".join([*anchor, *([base] if base else [])])
    return [f"{base}.{alias.name}" for alias in node.names]


def _module_of(name: str, modules: dict[str, Path]) -> str | None:
    """The kmim module that dotted ``name`` is or lies in, or None outside kmim."""
    while name not in modules:
        if "." not in name:
            return None
        name = name.rpartition(".")[0]
    return name


def import_graph() -> dict[str, set[str]]:
    """``{module: the kmim modules it imports}`` for every module under kmim/."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import | ast.ImportFrom):
                edges.update(m for n in _imported(node, package) if (m := _module_of(n, modules)) not in (None, name))
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm), each sorted."""
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
    return found


def _in(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _edges(graph: dict[str, set[str]], source: str, targets: tuple[str, ...]) -> list[str]:
    """``a -> b`` for every import from a module in package ``source`` of a module in any of ``targets``."""
    return [f"{a} -> {b}" for a in sorted(graph) if _in(a, source)
            for b in sorted(graph[a]) if any(_in(b, t) for t in targets)]


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph()


def test_the_graph_is_read(graph: dict[str, set[str]]) -> None:
    """Guards the checks below against passing on an empty or misread graph."""
    assert {"kmim.files", "kmim.storage", "kmim.datasets.manifest", "kmim.cli"} <= set(graph)
    assert {"kmim.storage", "kmim.files"} <= graph["kmim.datasets.manifest"]
    assert "kmim" in graph["kmim.datasets.manifest"]  # from kmim import __version__


def test_no_import_cycles(graph: dict[str, set[str]]) -> None:
    found = cycles(graph)
    detail = "\n".join(f"  cycle among {', '.join(c)}:\n    " + "\n    ".join(
        f"{a} -> {b}" for a in c for b in sorted(graph[a]) if b in c) for c in found)
    assert not found, f"import cycles between kmim modules:\n{detail}"


def test_files_is_the_ground_floor(graph: dict[str, set[str]]) -> None:
    edges = _edges(graph, "kmim.files", ("kmim",))
    assert not edges, "kmim.files must import nothing of kmim:\n  " + "\n  ".join(edges)


def test_datasets_do_not_import_the_upper_floors(graph: dict[str, set[str]]) -> None:
    edges = _edges(graph, "kmim.datasets", ("kmim.tokenizers", "kmim.pipeline", "kmim.trainer"))
    assert not edges, ("kmim.datasets (the dataset contract) must not import kmim.tokenizers, kmim.pipeline or "
                       "kmim.trainer:\n  " + "\n  ".join(edges))


def test_pipeline_and_trainer_are_independent(graph: dict[str, set[str]]) -> None:
    edges = _edges(graph, "kmim.pipeline", ("kmim.trainer",)) + _edges(graph, "kmim.trainer", ("kmim.pipeline",))
    assert not edges, "kmim.pipeline and kmim.trainer must not import each other:\n  " + "\n  ".join(edges)


def test_serve_is_a_leaf(graph: dict[str, set[str]]) -> None:
    edges = _edges(graph, "kmim.serve", ("kmim.tokenizers", "kmim.pipeline", "kmim.trainer"))
    edges += [f"{a} -> {b}" for a in sorted(graph) if not (_in(a, "kmim.serve") or a == "kmim.cli")
              for b in sorted(graph[a]) if _in(b, "kmim.serve")]
    assert not edges, ("kmim.serve (the HTTP server) must not import kmim.tokenizers, kmim.pipeline or kmim.trainer, "
                       "and only kmim.cli may import it:\n  " + "\n  ".join(edges))


def test_report_reads_only_the_contract_and_the_tokenizers(graph: dict[str, set[str]]) -> None:
    edges = _edges(graph, "kmim.report", ("kmim.pipeline", "kmim.trainer"))
    assert not edges, ("kmim.report may import the dataset contract and the tokenizers, not kmim.pipeline or "
                       "kmim.trainer:\n  " + "\n  ".join(edges))


MAX_FUNCTION_LINES = 60


def test_functions_fit_on_a_screen() -> None:
    long = []
    for name, path in sorted(_modules().items()):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{name}.{node.name}: {lines} lines")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines (split them into named steps):\n  " + "\n  ".join(long)
