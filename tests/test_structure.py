"""The code's shape, as the next engineer meets it: short functions, no import cycles, no imports of
another module's private names."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "python" / "crl"
MAX_FUNCTION_LINES = 80


def _modules() -> dict[str, ast.Module]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    return out


def _is_triton_kernel(node: ast.AST) -> bool:
    return any("jit" in ast.unparse(d) for d in getattr(node, "decorator_list", []))


def test_no_function_over_80_lines():
    long = []
    for name, tree in _modules().items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not _is_triton_kernel(node):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{name}.{node.name}: {lines} lines")
    assert not long, "functions over 80 lines:\n" + "\n".join(long)


def _type_checking_nodes(tree: ast.Module) -> set[int]:
    """ids of the nodes inside `if TYPE_CHECKING:` blocks (imports for annotations, never executed)."""
    inside = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            inside.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return inside


def _imports(name: str, tree: ast.Module, modules: set[str]) -> list[tuple[str, list[str]]]:
    """(imported module, names) for every executed import in `tree` that targets crl, resolved to a
    module (the imports of `if TYPE_CHECKING:` blocks are left out)."""
    out = []
    annotations_only = _type_checking_nodes(tree)
    for node in ast.walk(tree):
        if id(node) in annotations_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("crl"):
            names = [a.name for a in node.names]
            # `from crl.x import y` where y is itself a module: an import of crl.x.y
            sub = [n for n in names if f"{node.module}.{n}" in modules]
            out.extend((f"{node.module}.{n}", []) for n in sub)
            out.append((node.module, [n for n in names if n not in sub]))
        elif isinstance(node, ast.Import):
            out.extend((a.name, []) for a in node.names if a.name.startswith("crl"))
    return out


def test_no_import_cycles_between_modules():
    """Also through imports inside functions: two modules that need each other are one purpose split
    in two (or two purposes tangled)."""
    modules = _modules()
    names = set(modules)
    graph = {}
    for name, tree in modules.items():
        deps = {target for target, _ in _imports(name, tree, names) if target in names and target != name}
        # a package's __init__ importing its own submodules is how packages re-export, not a cycle
        graph[name] = {d for d in deps if not d.startswith(name + ".")}
    cycles = []
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycles.append(path[path.index(dep):] + [dep] if dep in path else path + [dep])
            elif dep not in state:
                visit(dep, path + [dep])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_no_imports_of_private_names_from_other_modules():
    modules = _modules()
    names = set(modules)
    private = []
    for name, tree in modules.items():
        for target, imported in _imports(name, tree, names):
            if target == "crl._native" or target == name:
                continue
            private.extend(f"{name} imports {target}.{n}" for n in imported
                           if n.startswith("_") and n not in ("__version__", "_native"))
    assert not private, "\n".join(private)
