"""The library's layering: `vrft_jax` is the bottom layer and imports none of the packages built on it.

`model_port` (weight conversion), `launch` and `benchmarks` import `vrft_jax`; an import back would be
a cycle (the one review M3 / issue 10 broke ran `vrft_jax/checkpoint.py` -> `model_port.flax_to_hf`).
Sources are parsed, not imported, so lazy imports inside functions are caught too.
"""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
UPPER_LAYERS = ("model_port", "launch", "benchmarks")


def imported_modules(tree: ast.AST, package: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import statement; relative imports resolved in `package`."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            found.append((node.lineno, base))
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
