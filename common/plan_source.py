"""A training plan as text: extract it from a class (module or notebook cell), hash it, load it back.

The shipped source is: the plan's `init_dependencies()` lines, the module-level imports whose bound
names the class uses, then the class source. Its sha256 is the plan's identity, so the text must be
the same every time it is built from the same code.
"""

from __future__ import annotations

import ast
import builtins
import inspect
import linecache
import sys
import textwrap
import types
from collections.abc import Iterable
from pathlib import Path

from .errors import PlanSourceError
from .hashing import sha256_bytes

_HEADER = "# fedsilo training plan: {name}\n"
_CELL_MARKERS = ("ipykernel_", "<ipython-input-", "/tmp/xpython_")


def plan_hash(source: str) -> str:
    """The plan's identity: sha256 of the exact source text."""
    return sha256_bytes(source)


def plan_source(cls: type) -> str:
    """The self-contained source shipped to nodes for this training-plan class."""
    if not inspect.isclass(cls):
        raise PlanSourceError(f"expected a training-plan class, got {type(cls).__name__}")
    class_lines, module_trees, module_package = _locate(cls)
    class_src = textwrap.dedent("".join(class_lines)).rstrip() + "\n"
    try:
        class_tree = ast.parse(class_src)
    except SyntaxError as exc:
        raise PlanSourceError(f"the source found for {cls.__name__} does not parse: {exc}") from None

    dep_lines = _dependency_lines(cls)
    used = _used_names(class_tree)
    dep_bound = _bound_by_imports(ast.parse("\n".join(dep_lines)).body) if dep_lines else set()

    future: list[str] = []
    stars: list[str] = []
    bindings: dict[str, tuple[str, str, str | None]] = {}  # bound name -> (module, name, asname)
    for tree in module_trees:
        for stmt in _import_statements(tree):
            if isinstance(stmt, ast.ImportFrom) and stmt.module == "__future__":
                future.append(ast.unparse(stmt))
                continue
            kept = _keep_used(stmt, used, module_package)
            if kept is None:
                continue
            for alias in kept.names:
                if alias.name == "*":
                    stars.append(ast.unparse(kept))
                elif isinstance(kept, ast.Import) and not alias.asname:
                    # `import a.b` and `import a.c` both bind `a` and both are needed
                    bindings[f"{alias.name}."] = ("", alias.name, None)
                elif isinstance(kept, ast.Import):
                    bindings[alias.asname] = ("", alias.name, alias.asname)
                else:
                    bindings[alias.asname or alias.name] = (kept.module or "", alias.name, alias.asname)
    imports = _render_imports(bindings.values())
    import_bound = {key.split(".")[0] for key in bindings}

    module_globals = _module_globals(cls)
    missing = sorted(
        name
        for name in used - _locally_bound(class_tree) - import_bound - dep_bound - set(dir(builtins))
        if name in module_globals and name != cls.__name__
    )
    if missing:
        raise PlanSourceError(
            f"{cls.__name__} uses module-level names that are not imports: {', '.join(missing)}; "
            "nodes receive only the class and its imports, so move them into the class "
            "(as methods or class attributes) or import them from an installed package"
        )

    parts = [_HEADER.format(name=cls.__name__)]
    if future:
        parts.append("\n".join(_dedup(future)) + "\n")
    header_imports = _dedup([*dep_lines, *_dedup(stars), *imports])
    if header_imports:
        parts.append("\n".join(header_imports) + "\n")
    parts.append("\n\n" + class_src)
    return "".join(parts)


def load_plan_class(source: str, name: str) -> type:
    """Execute plan source in a fresh module and return its `TorchTrainingPlan` subclass `name`."""
    from .training_plan import TorchTrainingPlan  # late: keeps plan hashing free of torch imports

    digest = plan_hash(source)
    filename = f"<fedsilo-plan {name} {digest[:12]}>"
    try:
        code = compile(source, filename, "exec")
    except SyntaxError as exc:
        raise PlanSourceError(f"plan {name} ({digest[:12]}): line {exc.lineno}: {exc.msg}") from None
    # Registered so that tracebacks and `inspect.getsource` work on the loaded class.
    linecache.cache[filename] = (len(source), None, source.splitlines(keepends=True), filename)
    module = types.ModuleType(f"fedsilo_plan_{digest[:16]}")
    module.__file__ = filename
    sys.modules[module.__name__] = module
    try:
        exec(code, module.__dict__)
    except Exception as exc:
        sys.modules.pop(module.__name__, None)
        raise PlanSourceError(f"plan {name} ({digest[:12]}) failed while loading: {type(exc).__name__}: {exc}") from exc
    cls = module.__dict__.get(name)
    if cls is None:
        defined = sorted(
            k for k, v in module.__dict__.items() if inspect.isclass(v) and v.__module__ == module.__name__
        )
        raise PlanSourceError(
            f"plan source defines no class named {name!r} (classes defined: {', '.join(defined) or 'none'})"
        )
    if not (inspect.isclass(cls) and issubclass(cls, TorchTrainingPlan)):
        raise PlanSourceError(
            f"{name!r} in the plan source is not a subclass of fedsilo.common.training_plan.TorchTrainingPlan"
        )
    return cls


NODE_OWNED_METHODS = (
    "training_routine",
    "testing_routine",
    "_make_private",
    "_unwrap_private",
    "post_init",
    "model",
    "optimizer",
    "get_parameters",
    "set_parameters",
    "data_manager",
    "_plain_model",
)
"""Methods the node's trainer owns: the loop (which older plans defined as `training_routine`), DP, and how the
model, optimizer, parameters and data reach it. A plan that defines one is flagged and refused by default."""

CUSTOM_LOOP_WARNING = "overrides the training loop: node caps and DP cannot be enforced"


def node_owned_in_source(source: str, name: str) -> list[str]:
    """The node-owned methods plan `name` defines in `source`, read from the text without running it.

    For the review page and `fedsilo node plan show`. It looks at the class body and the bodies of its
    bases defined in the same source, at module-level `Plan.method = ...` assignments and at any
    `setattr(..., "method", ...)`; the train-time check (`node_owned_overrides`) inspects the loaded class.
    """
    tree = _parse_or_none(source)
    if tree is None:
        return []
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    found: set[str] = set()
    pending, seen = [name], set()
    while pending:
        current = classes.get(pending.pop())
        if current is None or current.name in seen:
            continue
        seen.add(current.name)
        for stmt in current.body:
            if isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef):
                found.add(stmt.name)
            elif isinstance(stmt, ast.Assign | ast.AnnAssign):
                targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
                found |= {t.id for t in targets if isinstance(t, ast.Name)}
        pending += [b.id for b in current.bases if isinstance(b, ast.Name)]
    for stmt in tree.body:  # `Plan.training_routine = f` after the class (self.x = ... in a method is harmless)
        if isinstance(stmt, ast.Assign):
            found |= {t.attr for t in stmt.targets if isinstance(t, ast.Attribute)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "setattr":
            found |= {a.value for a in node.args[1:2] if isinstance(a, ast.Constant) and isinstance(a.value, str)}
    return [m for m in NODE_OWNED_METHODS if m in found]


def node_owned_overrides(cls: type) -> list[str]:
    """The node-owned methods a loaded plan class (or any base other than TorchTrainingPlan) defines."""
    from .training_plan import TorchTrainingPlan

    owners = [k for k in cls.__mro__ if k not in (TorchTrainingPlan, object)]
    return [m for m in NODE_OWNED_METHODS if any(m in vars(k) for k in owners)]


# --------------------------------------------------------------------------------- finding the code
def _locate(cls: type) -> tuple[list[str], list[ast.Module], str | None]:
    """The class's source lines, the parsed module-level code to take imports from, and its package."""
    module = sys.modules.get(cls.__module__)
    package = getattr(module, "__package__", None) or None
    filename, lineno = _code_location(cls)
    if filename is not None:
        lines = linecache.getlines(filename)
        if lines:
            found = _find_class(lines, cls.__name__, lineno)
            if found is not None:
                tree, node = found
                trees = _notebook_trees(filename, tree) if _is_cell(filename, module) else [tree]
                return _node_lines(lines, node), trees, package
    # No method to follow (or its file is gone): ask inspect, then search notebook history.
    try:
        lines = inspect.getsource(cls).splitlines(keepends=True)
        source_file = inspect.getsourcefile(cls)
        module_lines = linecache.getlines(source_file) if source_file else []
        trees = [_parse_or_none("".join(module_lines))] if module_lines else []
        return lines, [t for t in trees if t is not None], package
    except (OSError, TypeError):
        pass
    for cell in reversed(_notebook_cells()):
        cell_lines = cell.splitlines(keepends=True)
        found = _find_class(cell_lines, cls.__name__, None)
        if found is not None:
            tree, node = found
            return _node_lines(cell_lines, node), _notebook_trees(None, tree), package
    raise PlanSourceError(
        f"cannot find the source of {cls.__qualname__}: define it in a .py module or a notebook cell "
        "(classes typed at a plain Python prompt or built with type() have no source)"
    )


def _code_location(cls: type) -> tuple[str | None, int | None]:
    """File and first line of a function defined in the class body (follows notebook cells)."""
    for value in vars(cls).values():
        func = value
        if isinstance(func, staticmethod | classmethod):
            func = func.__func__
        elif isinstance(func, property):
            func = func.fget
        code = getattr(func, "__code__", None)
        if code is not None and getattr(func, "__qualname__", "").startswith(cls.__qualname__ + "."):
            return code.co_filename, code.co_firstlineno
    first = getattr(cls, "__firstlineno__", None)  # Python 3.13+
    module = sys.modules.get(cls.__module__)
    file = getattr(module, "__file__", None)
    return (file, first) if file and first else (None, None)


def _find_class(lines: list[str], name: str, lineno: int | None) -> tuple[ast.Module, ast.ClassDef] | None:
    """The definition of class `name` enclosing `lineno`, else the last one in the text."""
    tree = _parse_or_none("".join(lines))
    if tree is None:
        return None
    candidates = [n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == name]
    if not candidates:
        return None
    if lineno is not None:
        enclosing = [n for n in candidates if _start(n) <= lineno <= (n.end_lineno or n.lineno)]
        if enclosing:
            return tree, max(enclosing, key=_start)  # innermost
    return tree, max(candidates, key=_start)


def _start(node: ast.ClassDef) -> int:
    return min([node.lineno, *(d.lineno for d in node.decorator_list)])


def _node_lines(lines: list[str], node: ast.ClassDef) -> list[str]:
    return lines[_start(node) - 1 : node.end_lineno]


def _parse_or_none(text: str) -> ast.Module | None:
    try:
        return ast.parse(text)
    except SyntaxError:
        return None


def _is_cell(filename: str, module: types.ModuleType | None) -> bool:
    if any(marker in filename for marker in _CELL_MARKERS):
        return True
    return getattr(module, "__name__", "") == "__main__" and not Path(filename).is_file()


def _notebook_cells() -> list[str]:
    """Executed cells in order: IPython's history when available, else cell entries in linecache."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None and hasattr(ipython, "get_ipython") else None
    if shell is not None:
        history = getattr(getattr(shell, "history_manager", None), "input_hist_parsed", None)
        if history:
            return [cell for cell in history if cell]
    return [
        "".join(entry[2])
        for key, entry in list(linecache.cache.items())
        if any(marker in key for marker in _CELL_MARKERS) and len(entry) == 4
    ]


def _notebook_trees(defining_file: str | None, defining_tree: ast.Module) -> list[ast.Module]:
    """Every executed cell (in order) whose imports may feed the plan, ending with the defining one."""
    trees = []
    for cell in _notebook_cells():
        tree = _parse_or_none(cell)
        if tree is not None and ast.dump(tree) != ast.dump(defining_tree):
            trees.append(tree)
    trees.append(defining_tree)
    return trees


def _module_globals(cls: type) -> dict[str, object]:
    module = sys.modules.get(cls.__module__)
    return dict(vars(module)) if module is not None else {}


# ------------------------------------------------------------------------------------ name analysis
def _dependency_lines(cls: type) -> list[str]:
    hook = getattr(cls, "init_dependencies", None)
    if hook is None:
        return []
    try:
        # No __init__: extracting the source must not build a model or touch data.
        deps = hook(object.__new__(cls))
    except Exception as exc:
        raise PlanSourceError(f"{cls.__name__}.init_dependencies() raised {type(exc).__name__}: {exc}") from exc
    if deps is None:
        return []
    if isinstance(deps, str) or not isinstance(deps, Iterable):
        raise PlanSourceError(f"{cls.__name__}.init_dependencies() must return a list of import lines")
    lines = []
    for dep in deps:
        text = str(dep).strip()
        tree = _parse_or_none(text)
        if tree is None or not tree.body or not all(isinstance(s, ast.Import | ast.ImportFrom) for s in tree.body):
            raise PlanSourceError(f"{cls.__name__}.init_dependencies(): {text!r} is not an import statement")
        lines.extend(ast.unparse(s) for s in tree.body)
    return _dedup(lines)


def _used_names(tree: ast.AST) -> set[str]:
    """Every plain name read anywhere in the class (attribute chains count by their root name)."""
    return {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}


def _locally_bound(tree: ast.AST) -> set[str]:
    """Names the class binds itself: assignments, arguments, defs, local imports, loop targets."""
    bound: set[str] = set()
    for n in ast.walk(tree):
        if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store | ast.Del):
            bound.add(n.id)
        elif isinstance(n, ast.arg):
            bound.add(n.arg)
        elif isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            bound.add(n.name)
        elif isinstance(n, ast.Import | ast.ImportFrom):
            bound |= _bound_by_imports([n])
        elif isinstance(n, ast.ExceptHandler) and n.name:
            bound.add(n.name)
    return bound


def _import_statements(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Module-level imports, including those under top-level `try`/`if` blocks."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(body: list[ast.stmt]) -> None:
        for stmt in body:
            if isinstance(stmt, ast.Import | ast.ImportFrom):
                found.append(stmt)
            elif isinstance(stmt, ast.Try):
                visit(stmt.body)
            elif isinstance(stmt, ast.If):
                visit(stmt.body)
                visit(stmt.orelse)

    visit(tree.body)
    return found


def _bound_by_imports(stmts: Iterable[ast.stmt]) -> set[str]:
    bound = set()
    for stmt in stmts:
        if isinstance(stmt, ast.Import | ast.ImportFrom):
            for alias in stmt.names:
                bound.add(alias.asname or alias.name.split(".")[0])
    return bound


def _keep_used(
    stmt: ast.Import | ast.ImportFrom, used: set[str], package: str | None
) -> ast.Import | ast.ImportFrom | None:
    """The statement reduced to the aliases the class uses (relative imports made absolute)."""
    if isinstance(stmt, ast.ImportFrom) and any(a.name == "*" for a in stmt.names):
        keep = list(stmt.names)  # cannot tell what a star import binds; ship it
    else:
        keep = [a for a in stmt.names if (a.asname or a.name.split(".")[0]) in used]
    if not keep:
        return None
    if isinstance(stmt, ast.Import):
        return ast.Import(names=keep)
    module, level = stmt.module, stmt.level
    if level:
        if not package:
            raise PlanSourceError(f"relative import {ast.unparse(stmt)!r} outside a package")
        base = package.split(".")
        if level > 1:
            base = base[: -(level - 1)]
        module = ".".join([*base, module] if module else base)
    return ast.ImportFrom(module=module, names=keep, level=0)


def _render_imports(bindings: Iterable[tuple[str, str, str | None]]) -> list[str]:
    """Sorted import lines (one `from` line per module): the same text whatever the cell order."""
    plain: set[str] = set()
    from_names: dict[str, set[str]] = {}
    for module, name, asname in bindings:
        alias = f"{name} as {asname}" if asname else name
        if module:
            from_names.setdefault(module, set()).add(alias)
        else:
            plain.add(f"import {alias}")
    lines = sorted(plain)
    lines += [f"from {m} import {', '.join(sorted(names))}" for m, names in sorted(from_names.items())]
    return lines


def _dedup(lines: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(lines))
