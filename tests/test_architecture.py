"""The house rules, read from the source tree (ast, no imports executed).

* the command line (``kdkit.cli``) imports the library; nothing in the library imports it;
* no import circles: module-level and function-level imports are arrows alike (a package
  ``__init__`` that re-exports its submodules is the one exception: importing a name from
  a package is an arrow to the package, not to every module it re-exports);
* no module imports a ``_private`` name from another module, and a ``_private`` module is
  imported only from within its parent package (``kdkit._validation`` is kdkit's own,
  ``kdkit.cache._format`` the cache package's);
* no source file over ``MAX_LINES`` lines (files over it today are listed, with the reason,
  in ``OVER_LIMIT``; the list may only shrink).
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"


def _modules() -> dict[str, tuple[Path, bool]]:
    """``{dotted name: (path, is_package)}`` of every module under ``src/kdkit``."""
    found = {}
    for path in sorted((SRC / "kdkit").rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        found[".".join(parts)] = (path, is_package)
    return found


def _imports(module: str, path: Path, is_package: bool) -> list[tuple[str, str | None]]:
    """``(module imported from, name or None)`` for every kdkit import of a module,
    including those inside functions."""
    out: list[tuple[str, str | None]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(a.name, None) for a in node.names if a.name.split(".")[0] == "kdkit"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")[: None if is_package else -1]
                base = base[: len(base) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source.split(".")[0] == "kdkit":
                out += [(source, a.name) for a in node.names]
    return out


MODULES = _modules()

MAX_LINES = 650

OVER_LIMIT: dict[str, str] = {
    "kdkit/losses/linear.py": "868 lines, to be split (issue #23 item 3)",
}


def _arrows() -> dict[str, set[str]]:
    """``{module: modules it imports}`` (a name imported from a package that is itself a
    module of it, ``from kdkit.cache import dump``, is an arrow to that module)."""
    graph: dict[str, set[str]] = {}
    for module, (path, is_package) in MODULES.items():
        targets = set()
        for source, name in _imports(module, path, is_package):
            target = f"{source}.{name}" if name and f"{source}.{name}" in MODULES else source
            if target in MODULES and target != module:
                targets.add(target)
        graph[module] = targets
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles():
    assert _cycles(_arrows()) == []


def _private_module_owner(target: str) -> str | None:
    """The package a ``_private`` module of ``target``'s path belongs to, or None."""
    parts = target.split(".")
    for i, part in enumerate(parts):
        if part.startswith("_") and not part.startswith("__"):
            return ".".join(parts[:i])
    return None


def test_no_private_names_cross_modules():
    offenders = []
    for module, (path, is_package) in MODULES.items():
        for source, name in _imports(module, path, is_package):
            target = f"{source}.{name}" if name and f"{source}.{name}" in MODULES else source
            if (
                name
                and target == source
                and source != module
                and name.startswith("_")
                and not name.startswith("__")
            ):
                offenders.append(f"{module} imports {name} from {source}")
            owner = _private_module_owner(target)
            if owner is not None and not (module == owner or module.startswith(owner + ".")):
                offenders.append(f"{module} imports the private module {target}")
    assert offenders == []


def test_no_file_over_the_line_limit():
    sizes = {
        str(path.relative_to(SRC)): len(path.read_text(encoding="utf-8").splitlines())
        for path, _ in MODULES.values()
    }
    over = {name for name, lines in sizes.items() if lines > MAX_LINES}
    assert over <= set(OVER_LIMIT), sorted(over - set(OVER_LIMIT))
    assert set(OVER_LIMIT) <= over, "shrunk below the limit: remove from OVER_LIMIT"


def test_the_module_walk_sees_the_package():
    assert "kdkit.cli.main" in MODULES and "kdkit.losses.kd" in MODULES
    imported = {src for src, _ in _imports("kdkit.cli.main", *MODULES["kdkit.cli.main"])}
    assert "kdkit.cli.common" in imported


def test_the_library_never_imports_the_command_line():
    offenders = [
        f"{module} imports {source}"
        for module, (path, is_package) in MODULES.items()
        if not (module == "kdkit.cli" or module.startswith("kdkit.cli."))
        and module != "kdkit.__main__"
        for source, name in _imports(module, path, is_package)
        if source == "kdkit.cli"
        or source.startswith("kdkit.cli.")
        or (source == "kdkit" and name == "cli")
    ]
    assert offenders == []
