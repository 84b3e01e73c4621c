"""The package's layering, read from its source: no import cycle (imports inside functions
included), and no optimizer update outside the one train step."""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "ir_lora")


def _modules() -> dict[str, str]:
    """`{dotted module name: path}` of every module of the package."""
    out = {}
    for folder, _, files in os.walk(PACKAGE):
        for file in files:
            if file.endswith(".py"):
                path = os.path.join(folder, file)
                rel = os.path.relpath(path, ROOT)[: -len(".py")].split(os.sep)
                if rel[-1] == "__init__":
                    rel = rel[:-1]
                out[".".join(rel)] = path
    return out


def _imports(path: str, name: str, modules) -> set[str]:
    """Modules of the package that `path` imports anywhere (functions included)."""
    with open(path) as f:
        tree = ast.parse(f.read())
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            submodules = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules]
            # `from pkg import name` needs pkg's __init__ to have run for a name that is not
            # a submodule; `from pkg import submodule` only needs the submodule.
            attributes = len(submodules) < len(node.names)
            targets = submodules + ([base] if attributes else [])
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def test_no_import_cycle():
    modules = _modules()
    graph = {name: _imports(path, name, modules) for name, path in modules.items()}
    # Importing a submodule runs its packages' __init__ first: an edge to a submodule is one to
    # each of its packages too, but for the importer's own packages, whose __init__ has always
    # started before the importer runs.
    for name in modules:
        for target in list(graph[name]):
            parent = target.rpartition(".")[0]
            while parent:
                if parent in modules and not (name + ".").startswith(parent + "."):
                    graph[name].add(parent)
                parent = parent.rpartition(".")[0]
        graph[name] = {t for t in graph[name] if not (name + ".").startswith(t + ".")}
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                cycle = stack[stack.index(target) :] + [target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_only_the_train_step_updates_parameters():
    offenders = []
    for name, path in _modules().items():
        with open(path) as f:
            source = f.read()
        if name != "ir_lora.train_lib" and ("apply_updates" in source or ".update(grads" in source):
            offenders.append(name)
    assert not offenders, f"optimizer updates outside ir_lora.train_lib: {offenders}"
