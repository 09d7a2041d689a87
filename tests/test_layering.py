"""The library's layering: `vrft_jax` is the bottom layer and imports none of the packages built on it, its own
import graph has no cycle, and the evaluators never reach up into the trainer.

`model_port` (weight conversion), `launch` and `benchmarks` import `vrft_jax`; an import back would be
a cycle (the one review M3 / issue 10 broke ran `vrft_jax/checkpoint.py` -> `model_port.flax_to_hf`).
Inside the package, configs are leaves owned by the module that consumes them (review-3 M8: the type-level
circle train_step <-> scoring <-> optimizer), and `evaluate/` uses the sampler, the data and `distributed`,
never `train`, `run`, `grpo_loop` or `recipe` (its command, `evaluate/__main__.py`, reads recipes).
Sources are parsed, not imported, so lazy imports inside functions and `TYPE_CHECKING` imports count too.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
UPPER_LAYERS = ("model_port", "launch", "benchmarks")


def from_module(node: ast.ImportFrom, package: str) -> str:
    """The absolute module of `from MODULE import ...`, a relative one resolved in `package`."""
    base = node.module or ""
    if not node.level:
        return base
    parent = package.split(".")[:len(package.split(".")) - node.level + 1]
    return ".".join(parent + ([base] if base else []))


def imported_modules(tree: ast.AST, package: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import statement; relative imports resolved in `package`."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((node.lineno, from_module(node, package)))
    return found


def test_vrft_jax_imports_nothing_from_the_layers_above_it():
    sources = sorted((ROOT / "vrft_jax").rglob("*.py"))
    assert len(sources) > 20  # the walk really found the package
    offending = []
    for path in sources:
        relative = path.relative_to(ROOT)
        package = ".".join(relative.parent.parts)
        for line, module in imported_modules(ast.parse(path.read_text(encoding="utf-8")), package):
            if module.split(".")[0] in UPPER_LAYERS:
                offending.append(f"{relative}:{line} imports {module}")
    assert not offending, "vrft_jax must not import model_port, launch or benchmarks:\n" + "\n".join(offending)


def test_the_check_sees_lazy_and_relative_imports():
    source = ("def f():\n    from model_port.flax_to_hf import save_hf\n"
              "import launch.aot_report\nfrom . import sharding\n")
    modules = sorted(m for _, m in imported_modules(ast.parse(source), "vrft_jax.data"))
    assert modules == ["launch.aot_report", "model_port.flax_to_hf", "vrft_jax.data"]


def package_modules() -> dict[str, pathlib.Path]:
    """{dotted module name: source} of every module of `vrft_jax` (a package by its own name)."""
    modules = {}
    for path in sorted((ROOT / "vrft_jax").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def import_graph() -> dict[str, set[str]]:
    """{module: the package's modules it imports}, every import statement counted (module level,
    `TYPE_CHECKING` blocks, inside functions): `from a import b` is an edge to `a.b` when that is a module,
    else to `a`. A module's imports of its own parent packages are not edges (importing it runs them anyway)."""
    modules = package_modules()

    def owner(name: str) -> str:  # the innermost module a dotted name lies in ("" outside the package)
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name

    graph = {}
    for name, path in modules.items():
        package = ".".join(path.relative_to(ROOT).parent.parts)
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets |= {owner(alias.name) for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = from_module(node, package)
                targets |= {owner(f"{base}.{alias.name}") for alias in node.names}
        graph[name] = {t for t in targets if t and t != name and not name.startswith(t + ".")}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module, or a module importing itself (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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
            if len(component) > 1 or v in graph[v]:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_package_import_graph_has_no_cycle():
    graph = import_graph()
    assert len(graph) > 40 and "vrft_jax.train_step" in graph["vrft_jax.run"]  # the walk found real edges
    assert cycles(graph) == []


@pytest.mark.parametrize("source, expected", [
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c"]]),
    ({"a": {"b"}, "b": set()}, []),
])
def test_the_cycle_finder_finds_cycles(source, expected):
    assert cycles(source) == expected


def test_a_type_checking_import_is_an_edge(tmp_path, monkeypatch):
    """A circle closed only under `TYPE_CHECKING` (as train_step <-> scoring <-> optimizer was) is a circle."""
    package = tmp_path / "vrft_jax"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from vrft_jax import b\n")
    (package / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from vrft_jax.a import X\n")
    (package / "c.py").write_text("def f():\n    from . import a\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    graph = import_graph()
    assert graph["vrft_jax.c"] == {"vrft_jax.a"}
    assert cycles(graph) == [["vrft_jax.a", "vrft_jax.b"]]


def test_the_evaluators_never_import_the_trainer():
    forbidden = {"vrft_jax.train", "vrft_jax.run", "vrft_jax.grpo_loop", "vrft_jax.recipe"}
    offending = []
    for name, targets in import_graph().items():
        if not name.startswith("vrft_jax.evaluate"):
            continue
        allowed = {"vrft_jax.recipe"} if name == "vrft_jax.evaluate.__main__" else set()
        offending += [f"{name} imports {t}" for t in sorted(targets & (forbidden - allowed))]
    assert not offending, "\n".join(offending)
