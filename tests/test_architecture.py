"""The house rules, read from the source tree (ast, no imports executed).

* the command line (``kdkit.cli``) imports the library; nothing in the library imports it;
* no import circles: module-level and function-level imports are arrows alike (a package
  ``__init__`` that re-exports its submodules is the one exception: importing a name from
  a package is an arrow to the package, not to every module it re-exports);
* no module imports a ``_private`` name from another module, and a ``_private`` module is
  imported only from within its parent package (``kdkit._validation`` is kdkit's own,
  ``kdkit.cache._format`` the cache package's);
* no source file over ``MAX_LINES`` lines; lower floors never import higher ones; no
  function over 80 code lines outside the short allow-list (each with its reason).
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


def _is_private(part: str) -> bool:
    return part.startswith("_") and not (part.startswith("__") and part.endswith("__"))


def _parent(module: str) -> str:
    return module.rsplit(".", 1)[0]


def test_no_module_imports_a_private_name_from_another_module():
    """A ``_name`` is private to its module; a ``_private`` module is private to its
    parent package (``kdkit._validation`` is usable across ``kdkit``, ``kdkit.cache._format``
    only inside ``kdkit.cache``)."""
    offenders = []
    for module, (path, is_package) in MODULES.items():
        own_package = module if is_package else _parent(module)
        for source, name in _imports(module, path, is_package):
            if source == module:
                continue
            parts = source.split(".")
            for i, part in enumerate(parts):
                if _is_private(part):
                    parent = ".".join(parts[:i])
                    if not (own_package == parent or own_package.startswith(parent + ".")):
                        offenders.append(f"{module} imports private module {source}")
                    break
            if name is not None and _is_private(name):
                submodule = f"{source}.{name}"
                if submodule in MODULES:
                    if own_package != source and not own_package.startswith(source + "."):
                        offenders.append(f"{module} imports private module {submodule}")
                else:
                    offenders.append(f"{module} imports {name} from {source}")
    assert offenders == []


def _arrows() -> dict[str, set[str]]:
    """``{module: modules it imports}`` among kdkit modules, module-level, function-level
    and ``TYPE_CHECKING`` imports alike; ``from package import submodule`` is an arrow to
    the submodule.  Importing ``a.b.c`` is not counted as an arrow to the package ``a.b``:
    a package ``__init__`` re-exporting its submodules is the one accepted circle."""
    arrows: dict[str, set[str]] = {}
    for module, (path, is_package) in MODULES.items():
        targets = set()
        for source, name in _imports(module, path, is_package):
            sub = f"{source}.{name}"
            target = sub if name is not None and sub in MODULES else source
            if target in MODULES and target != module:
                targets.add(target)
        arrows[module] = targets
    return arrows


def _circles(arrows: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in arrows:
        if root in index:
            continue
        work = [(root, iter(sorted(arrows[root])))]
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
                    work.append((child, iter(sorted(arrows[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    top = stack.pop()
                    on_stack.discard(top)
                    component.append(top)
                    if top == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_circle_finder_finds_a_circle():
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _circles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles_among_kdkit_modules():
    """No module reaches itself through imports (function-level ones included)."""
    assert _circles(_arrows()) == []


MAX_LINES = 650


def test_no_file_over_650_lines():
    """Put new code in a new, well-named module rather than growing a big file."""
    offenders = [
        f"{path.relative_to(SRC)}: {n} lines"
        for path, _ in MODULES.values()
        if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    ]
    assert offenders == []


FLOORS = ("core", "losses", "cache", "train", "hf", "demo", "cli")
"""The layers, lowest first.  ``core`` is every top-level module of ``kdkit`` (``_validation``,
``_io``, ``errors``, ``sparse``, ``models``, ...); the others are the subpackages of that name."""

FACADES = {"kdkit", "kdkit.__main__", "kdkit.distributed"}
"""Above every floor: the package's re-exports, ``python -m kdkit`` and the 0.1.0
compatibility module ``kdkit.distributed``.  Nothing in kdkit imports them."""


def _floor(module: str) -> int:
    if module in FACADES:
        return len(FLOORS)
    top = module.split(".")[1]
    return FLOORS.index(top) if top in FLOORS else 0


def test_lower_floors_never_import_higher_ones():
    """losses/_validation/core -> cache -> train -> hf -> demo -> cli, never upwards."""
    offenders = [
        f"{module} ({FLOORS[_floor(module)]}) imports {target}"
        for module, targets in _arrows().items()
        if module not in FACADES
        for target in sorted(targets)
        if _floor(target) > _floor(module)
    ]
    assert offenders == []
    assert _floor("kdkit._validation.losses") == 0 and _floor("kdkit.cli.main") == 6


def test_nothing_in_kdkit_imports_a_facade():
    offenders = [
        f"{module} imports {target}"
        for module, targets in _arrows().items()
        for target in targets
        if target in FACADES and target != "kdkit"
    ]
    assert offenders == []


MAX_FUNCTION_LINES = 80

LONG_FUNCTIONS: dict[str, str] = {
    "kdkit.cli.dump_teacher:add_dump_parser": "an argparse table",
    "kdkit.losses.kernels.triton_kernel:_row_pass_kernel": "a Triton kernel (one launch)",
}
"""``{"module:function": reason}``: argparse tables and kernels allowed over the limit."""


def _code_lines(node: ast.FunctionDef | ast.AsyncFunctionDef, lines: list[str]) -> int:
    """Code lines of a function: its lines less blank, comment-only and docstring lines."""
    skip: set[int] = set()
    body = node.body
    if (
        body
        and isinstance(body[0], ast.Expr)
        and isinstance(body[0].value, ast.Constant)
        and isinstance(body[0].value.value, str)
    ):
        skip.update(range(body[0].lineno, (body[0].end_lineno or body[0].lineno) + 1))
    first = min([node.lineno] + [d.lineno for d in node.decorator_list])
    return sum(
        1
        for n in range(first, (node.end_lineno or node.lineno) + 1)
        if n not in skip and lines[n - 1].strip() and not lines[n - 1].strip().startswith("#")
    )


def _long_functions() -> list[str]:
    found = []
    for module, (path, _) in MODULES.items():
        text = path.read_text(encoding="utf-8")
        lines = text.splitlines()
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = _code_lines(node, lines)
                if n > MAX_FUNCTION_LINES and f"{module}:{node.name}" not in LONG_FUNCTIONS:
                    found.append(f"{module}:{node.name} ({n} lines)")
    return found


def test_the_line_counter_skips_docstrings_and_comments():
    src = 'def f():\n    """Doc.\n\n    More."""\n    # a comment\n\n    return 1\n'
    node = ast.parse(src).body[0]
    assert isinstance(node, ast.FunctionDef)
    assert _code_lines(node, src.splitlines()) == 2


def test_no_function_over_80_code_lines():
    assert _long_functions() == []
