"""The package's shape: layers that import downwards only, no import cycle, imports at the top."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "dmdiff"

#: Layers, lowest first: a module may import its own layer's modules (without a cycle) and lower
#: layers' only. ``train`` and ``restore`` are siblings: neither imports the other.
LAYERS = [
    ("base", ("dmdiff.errors", "dmdiff.config", "dmdiff.outputs", "dmdiff.runinfo", "dmdiff.weights",
              "dmdiff.device", "dmdiff.imageio", "dmdiff.metrics", "dmdiff.perception", "dmdiff.viz",
              "dmdiff.overlap")),
    ("optics", ("dmdiff.optics",)),
    ("data", ("dmdiff.data",)),
    ("model", ("dmdiff.model",)),
    ("runs", ("dmdiff.runs",)),
    ("train", ("dmdiff.train",)),
    ("restore", ("dmdiff.restore",)),
    ("evaluation", ("dmdiff.evaluation",)),
    ("applications", ("dmdiff.widgets", "dmdiff.bench", "dmdiff.repro", "dmdiff.cli", "dmdiff.__main__",
                      "dmdiff.study")),
]
SIBLINGS = {("train", "restore"), ("restore", "train")}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, ast.Module]:
    return {module_name(p): ast.parse(p.read_text()) for p in sorted(PACKAGE.rglob("*.py"))}


def imported(tree: ast.Module, known: set[str]) -> dict[str, bool]:
    """``{dmdiff module: at the top?}`` of every import in ``tree`` (``from a import b`` counts ``a.b``
    when that is a module)."""
    out: dict[str, bool] = {}
    top = set(map(id, tree.body))
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dmdiff"):
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in known]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.startswith("dmdiff")]
        for name in names:
            if name in known:
                out[name] = out.get(name, False) or id(node) in top
    return out


def layer(name: str) -> int:
    for rank, (_, prefixes) in enumerate(LAYERS):
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            return rank
    if name == "dmdiff":
        return len(LAYERS)
    raise AssertionError(f"{name} is in no layer: add it to LAYERS")


@pytest.fixture(scope="module")
def graph():
    trees = modules()
    known = set(trees)
    return {name: imported(tree, known) for name, tree in trees.items()}


def test_every_module_has_a_layer(graph):
    for name in graph:
        layer(name)


def test_layers_import_downwards_only(graph):
    wrong = []
    for name, targets in graph.items():
        for target in targets:
            if target == "dmdiff" or target == name:
                continue
            here, there = layer(name), layer(target)
            pair = (LAYERS[here][0] if here < len(LAYERS) else "dmdiff", LAYERS[there][0])
            if there > here or pair in SIBLINGS:
                wrong.append(f"{name} ({pair[0]}) imports {target} ({pair[1]})")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle(graph):
    """Depth-first search over every import, at the top of a module or inside a function."""
    state: dict[str, int] = {}       # 1: on the current path, 2: done
    path: list[str] = []

    def visit(name: str) -> None:
        state[name] = 1
        path.append(name)
        for target in graph.get(name, {}):
            if target == name or target == "dmdiff":
                continue
            if state.get(target) == 1:
                cycle = path[path.index(target):] + [target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        path.pop()
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)


def test_dmdiff_imports_sit_at_the_top(graph):
    local = [f"{name} imports {target} inside a function" for name, targets in graph.items()
             for target, at_top in targets.items() if not at_top]
    assert not local, "\n".join(local)


def test_no_module_calls_another_modules_private_functions():
    """``from dmdiff.x import _y`` would reach into another module's internals."""
    reached = []
    for name, tree in modules().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dmdiff"):
                reached += [f"{name}: {node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
    assert not reached, "\n".join(reached)
