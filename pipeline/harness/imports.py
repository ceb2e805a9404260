"""The project's import graph, read from the source (AST), function-local imports included: what a stage's code is.

dvc.yaml's code deps are computed from it (pipeline.harness.dvcfile), and the tests hold the package to
its layers with it. Python's `modulefinder` and `importlib` would run or resolve the code; this reads it,
so it sees imports inside functions (most heavy ones are) and never imports torch to do so.

The rules, each what Python does:
- `import a.b` imports a.b and its parents; `from a.b import c` imports a.b.c when that is a module,
  else a.b. Relative imports resolve against the importing module's package.
- Imports under `if TYPE_CHECKING:` never run: they are left out (annotations only).
- A package whose `__init__` imports `f"{__name__}.{...}"` dynamically (pipeline.alignment.methods: its
  modules are found by name) is taken to import every module it holds.
- In the process of `python -m stages.<name>`, the registry imports every other stage module for its
  declaration, but only that stage's `run` and `check` execute: of another stage module, only the
  imports at its top level count.
"""
from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator
from functools import cache
from pathlib import Path

from pipeline.paths import CODE_DIRS, PROJECT_ROOT

# The layers, lowest first: a module imports only from its own layer or those below (annotations aside).
LAYERS: tuple[tuple[str, ...], ...] = (
    ("pipeline", "pipeline.paths", "pipeline.io", "pipeline.dist", "pipeline.registry", "pipeline.config"),
    ("pipeline.model", "pipeline.data"),
    ("pipeline.inference", "pipeline.interop"),
    ("pipeline.evaluation",),
    ("pipeline.training",),
    ("pipeline.alignment",),
    ("pipeline.harness",),
    ("stages",),
    ("pipeline.__main__", "pipeline.cli", "pipeline.harness.dvcfile",  # commands: they build the chain,
     "pipeline.serving"),                                              # or serve its checkpoints
)


def module_file(name: str, root: Path = PROJECT_ROOT) -> Path | None:
    """The file of project module `name` (a package's __init__.py), or None if it is not the project's."""
    if name.split(".")[0] not in CODE_DIRS:
        return None
    base = root.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def module_name(path: Path, root: Path = PROJECT_ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules(root: Path = PROJECT_ROOT) -> list[str]:
    return sorted(module_name(p, root) for top in CODE_DIRS for p in (root / top).rglob("*.py")
                  if "__pycache__" not in p.parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.AST, functions: bool) -> Iterator[ast.Import | ast.ImportFrom]:
    """The import statements that run: not under `if TYPE_CHECKING:`, and not in function bodies unless asked."""
    stack = list(ast.iter_child_nodes(tree))
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if not functions and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _loads_submodules_by_name(tree: ast.AST) -> bool:
    """Whether the module calls importlib.import_module(f"{__name__}.{...}")."""
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module" and node.args
                and isinstance(node.args[0], ast.JoinedStr)):
            first = node.args[0].values[0] if node.args[0].values else None
            if isinstance(first, ast.FormattedValue) and getattr(first.value, "id", None) == "__name__":
                return True
    return False


@cache
def imports(name: str, functions: bool = True, root: Path = PROJECT_ROOT) -> frozenset[str]:
    """The project modules module `name` imports (see the module doc for the rules)."""
    path = module_file(name, root)
    if path is None:
        return frozenset()
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in _import_nodes(tree, functions):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
            continue
        base = node.module or ""
        if node.level:
            anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
            base = ".".join([*anchor, *([node.module] if node.module else [])])
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            found.add(sub if module_file(sub, root) else base)
    if path.name == "__init__.py" and _loads_submodules_by_name(tree):
        found.update(m for m in project_modules(root) if m.rpartition(".")[0] == name)
    return frozenset(m for m in found if module_file(m, root))


def ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _is_stage_module(name: str) -> bool:
    return name.startswith("stages.") and name.count(".") == 1 and name != "stages.__main__"


def stage_closure(stage: str, root: Path = PROJECT_ROOT) -> set[str]:
    """Every project module the process of `python -m stages.<stage>` may import."""
    start = f"stages.{stage}"
    seen: set[str] = set()
    todo = [start]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        declaration_only = _is_stage_module(name) and name != start
        todo.extend(imports(name, functions=not declaration_only, root=root))
        todo.extend(ancestors(name))
    return seen


def files(modules: Iterable[str], root: Path = PROJECT_ROOT) -> set[Path]:
    return {p.relative_to(root) for p in (module_file(m, root) for m in modules) if p is not None}


def layer(name: str) -> int:
    """The index in LAYERS of module `name` (its longest matching prefix)."""
    best, rank = -1, -1
    for i, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best:
                best, rank = len(prefix), i
    return rank


def graph(root: Path = PROJECT_ROOT) -> dict[str, frozenset[str]]:
    """module -> the project modules it imports (function bodies included), without imports of its own
    ancestor packages (those are initialised before the module runs, so they add no dependency)."""
    return {m: frozenset(i for i in imports(m, root=root) if i not in ancestors(m) and i != m)
            for m in project_modules(root)}


def cycles(edges: dict[str, frozenset[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each a cycle of imports."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
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

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found
