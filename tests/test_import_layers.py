"""The package's layering, checked on the source: no module imports from a layer above its own, and
no two modules import each other (directly or through others). Function-level imports count too:
a lazy import is still a dependency."""

import ast
import os

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "uniimage_jax")

# Layer of each subpackage (and top-level module); a module may import its own subpackage and any
# strictly lower layer. Equal layers are independent of each other.
LAYERS = {
    "errors": 0, "paths": 0, "platform_guard": 0,
    "storage": 1, "hub": 1,
    # the package's __init__ applies the platform guard and picks epath's gs:// backend
    "__init__": 2,
    "diffusion": 2, "data": 2, "processing": 2,
    "models": 3,
    "checkpoints": 4,
    "convert": 5, "sampling": 5,
    "train": 6,
    "eval": 7, "bench": 7, "app": 7, "rehearsal": 7,
    "cli": 8,
}


def _modules():
    for root, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                rel = os.path.relpath(path, os.path.dirname(PACKAGE))[:-3].replace(os.sep, ".")
                yield rel.removesuffix(".__init__"), path


def _imports(path: str, module: str) -> set[str]:
    out = set()
    package = module if path.endswith("__init__.py") else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            if base == "uniimage_jax":
                out |= {f"uniimage_jax.{a.name}" for a in node.names}
            elif base.startswith("uniimage_jax."):
                out.add(base)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("uniimage_jax.")}
    return out


def _layer_name(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


GRAPH = {m: _imports(p, m) for m, p in _modules()}


def test_every_part_of_the_package_has_a_layer():
    assert {_layer_name(m) for m in GRAPH} <= set(LAYERS), \
        f"give these a layer: {sorted({_layer_name(m) for m in GRAPH} - set(LAYERS))}"


def test_no_module_imports_from_a_layer_above_or_beside_it():
    bad = []
    for module, targets in GRAPH.items():
        a = _layer_name(module)
        for t in targets:
            b = _layer_name(t)
            if a != b and LAYERS[b] >= LAYERS.get(a, 0):
                bad.append(f"{module} -> {t}")
    assert not bad, "imports against the layering:\n" + "\n".join(sorted(bad))


@pytest.mark.parametrize("upper", ["convert", "train", "sampling", "cli", "checkpoints"])
def test_models_never_import_upper_layers(upper):
    bad = [f"{m} -> {t}" for m, ts in GRAPH.items() if _layer_name(m) == "models"
           for t in ts if _layer_name(t) == upper]
    assert not bad, bad


def test_data_never_imports_train():
    assert not [t for m, ts in GRAPH.items() if _layer_name(m) == "data" for t in ts
                if _layer_name(t) == "train"]


def test_no_import_cycle():
    modules = {m: {t for t in ts if t in GRAPH} for m, ts in GRAPH.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for t in sorted(modules[m]):
            if state.get(t) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(t):] + [t]))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(modules):
        if m not in state:
            visit(m)
