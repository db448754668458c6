"""The package's imports run strictly downward, with no cycles.

Every import is counted, function-local ones too (they hide cycles from Python, not from
a reader). The layers, lowest first:

0. ``core`` - the model, the artifact format, graph helpers, errors, metrics;
1. ``devices``, ``isa``, ``target`` - device descriptions, targets and their CPU feature classes;
2. ``frontend``, ``lower``, ``optimize.int8_graph`` - import, lowering, the graph rewrite the importer needs;
3. ``optimize``, ``binary``, ``kernels``, ``zoo``'s data and model modules - compression passes, kernels, data;
4. ``build``, ``run``, ``tune``, ``deploy``, ``bench``, ``zoo``'s exporters;
5. the command line (``cli`` modules, ``demo``, ``__main__``).

A module may import its own layer or lower ones, never a higher one.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "tvmedge"

LAYER_BY_PREFIX = [  # most specific first
    ("tvmedge.core", 0),
    ("tvmedge.devices", 1), ("tvmedge.isa", 1), ("tvmedge.target", 1),
    ("tvmedge.optimize.int8_graph", 2), ("tvmedge.frontend", 2), ("tvmedge.lower", 2),
    ("tvmedge.zoo.digits", 3), ("tvmedge.zoo.shapes", 3), ("tvmedge.zoo.models", 3),
    ("tvmedge.optimize", 3), ("tvmedge.binary", 3), ("tvmedge.kernels", 3),
    ("tvmedge.vta.board", 4), ("tvmedge.vta", 3),
    ("tvmedge.build", 4), ("tvmedge.run", 4), ("tvmedge.tune", 4), ("tvmedge.deploy", 4),
    ("tvmedge.bench", 4), ("tvmedge.zoo", 4), ("tvmedge.app", 4), ("tvmedge.export", 4),
    ("tvmedge.demo", 5), ("tvmedge.__main__", 5), ("tvmedge.cli", 5),
]


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def _imports() -> dict[str, set[str]]:
    """module -> the tvmedge modules it imports anywhere in its body."""
    mods = _modules()
    edges: dict[str, set[str]] = defaultdict(set)
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                candidates = [target] + [f"{target}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                candidates = [a.name for a in node.names]
            else:
                continue
            for c in candidates:
                # importing a submodule runs its package's __init__ too, but ours are docstrings
                # only; the dependency that matters is on the module named.
                if c in mods and c != name:
                    edges[name].add(c)
    return edges


def layer(module: str) -> int:
    if module.endswith(".cli"):
        return 5
    for prefix, n in LAYER_BY_PREFIX:
        if module == prefix or module.startswith(prefix + "."):
            return n
    raise AssertionError(f"{module} has no layer: add it to LAYER_BY_PREFIX in {__file__}")


def test_every_module_has_a_layer() -> None:
    for module in _modules():
        if module != "tvmedge":
            layer(module)


def test_imports_run_downward() -> None:
    upward = [f"{m} (layer {layer(m)}) imports {d} (layer {layer(d)})"
              for m, deps in sorted(_imports().items()) if m != "tvmedge"
              for d in sorted(deps) if d != "tvmedge" and layer(d) > layer(m)]
    assert not upward, "imports that run upward:\n" + "\n".join(upward)


def test_no_import_cycles() -> None:
    edges = _imports()
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for d in sorted(edges.get(m, ())):
            if state.get(d) == 1:
                cycles.append(path[path.index(d):] + [d])
            elif d not in state:
                visit(d)
        path.pop()
        state[m] = 2

    for m in sorted(_modules()):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_checker_sees_function_local_imports() -> None:
    """The walker must count imports inside functions, or it would miss the cycles they hide."""
    edges = _imports()
    # frontend folds QDQ models at import time with a module-level import of int8_graph,
    # and cli imports the frontend inside its command functions.
    assert "tvmedge.optimize.int8_graph" in edges["tvmedge.frontend"]
    assert "tvmedge.frontend" in edges["tvmedge.cli"]
