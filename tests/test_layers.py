"""The package is in layers and its imports point down only: no cycle (imports inside functions
included, where a cycle would hide), no command module importing another, and no layer importing one
above it. Read from the source with ast, so nothing is imported to check it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "amnesia_sd"
# Bottom to top; a module may import its own layer or those below, except commands, which never
# import each other. The package's __init__ (the Python API) and cli.py sit on top.
LAYERS = ("core", "model", "data", "method", "commands", "studies")
TOP = len(LAYERS)


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, root: Path, modules: set[str]) -> set[str]:
    """Every module of the package that `path` imports, anywhere in the file, including the lazy
    API table of the package's __init__ (`API = {name: module}`)."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # `from package import submodule` imports the submodule; `from module import name`, the module
            targets = [f"{module}.{alias.name}" if f"{module}.{alias.name}" in modules else module
                       for alias in node.names]
        elif (isinstance(node, ast.Assign) and path.name == "__init__.py" and isinstance(node.value, ast.Dict)
              and any(isinstance(t, ast.Name) and t.id == "API" for t in node.targets)):
            targets = [v.value for v in node.value.values if isinstance(v, ast.Constant)]
        else:
            continue
        found |= {t for t in targets if t in modules and t != name}
    return found


def graph(root: Path) -> dict[str, set[str]]:
    files = [p for p in root.rglob("*.py") if "digits_model" not in p.parts]
    modules = {module_name(p, root) for p in files}
    return {module_name(p, root): imports(p, root, modules) for p in files}


def layer(module: str) -> int:
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in LAYERS:
        return LAYERS.index(parts[1])
    return TOP  # the package itself (its API) and cli.py


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each strongly connected part that has one (Tarjan's algorithm)."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            part = []
            while True:
                w = stack.pop()
                on.discard(w)
                part.append(w)
                if w == v:
                    break
            if len(part) > 1:
                found.append(sorted(part))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def problems(root: Path) -> list[str]:
    edges = graph(root)
    said = [f"import cycle: {' <-> '.join(part)}" for part in cycles(edges)]
    for source, targets in sorted(edges.items()):
        for target in sorted(targets):
            a, b = layer(source), layer(target)
            if b > a:
                said.append(f"{source} imports {target}, a layer above it")
            elif a == b == LAYERS.index("commands"):
                said.append(f"command {source} imports command {target}: move what they share down a layer")
    return said


def test_the_package_imports_point_down_only():
    assert problems(PACKAGE) == []


def test_every_module_is_in_a_layer_or_on_top():
    on_top = {m for m in graph(PACKAGE) if layer(m) == TOP}
    assert on_top == {"amnesia_sd", "amnesia_sd.cli"}


def test_the_api_names_what_the_cli_calls():
    import amnesia_sd

    for name in amnesia_sd.__all__:
        assert getattr(amnesia_sd, name) is not None, name
    assert sorted(set(dir(amnesia_sd))) == dir(amnesia_sd)  # each name once, loaded or not
    for name in ("forget", "ForgetConfig", "evaluate", "EvalConfig", "attack", "AttackConfig", "export",
                 "ExportConfig", "sample", "SampleConfig", "compute_fim", "FimConfig", "make_image_set", "SetConfig",
                 "demo", "DemoConfig"):
        assert name in amnesia_sd.__all__, name


def write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / "pkg" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "pkg"


@pytest.mark.parametrize("files, expected", [
    # a cycle hidden in a function body is still a cycle
    ({"__init__.py": "", "core/__init__.py": "", "core/a.py": "def f():\n    from pkg.core import b\n",
      "core/b.py": "from pkg.core.a import f\n"}, "import cycle: pkg.core.a <-> pkg.core.b"),
    ({"__init__.py": "", "commands/__init__.py": "", "commands/x.py": "from .y import run\n",
      "commands/y.py": "def run(): pass\n"}, "command pkg.commands.x imports command pkg.commands.y"),
    ({"__init__.py": "", "core/__init__.py": "", "model/__init__.py": "", "model/m.py": "X = 1\n",
      "core/c.py": "from ..model import m\n"}, "pkg.core.c imports pkg.model.m, a layer above it"),
    ({"__init__.py": "API = {'f': 'pkg.commands.x'}\n", "commands/__init__.py": "",
      "commands/x.py": "import pkg\n"}, "import cycle: pkg <-> pkg.commands.x"),
])
def test_the_check_finds_cycles_command_imports_and_upward_imports(tmp_path, files, expected):
    root = write(tmp_path, files)
    assert any(expected in p for p in problems(root)), problems(root)
