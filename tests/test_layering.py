"""The layering of the code, read from its source: every import points down the table below, no
module-level import cycle, and no private name of one module used by another."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Bottom to top. A unit is a package or module under granite_cli/ (commands/ installs as
# granite_cli.commands). A unit imports only from units in rows below its own.
LAYERS = [
    {"errors", "redact", "ggml"},                  # exit-code errors; secrets out of outputs; GGUF/ggml constants
    # architectures, files, output paths, host memory, tables, sizes, Hub ids, IBM's claims as numbers
    {"arch", "fsutil", "paths", "hostmem", "render", "html", "sizes", "hub", "ibm"},
    {"config", "measure"},
    {"checkpoint", "ops", "params"},
    {"model", "env", "flops", "profile_info"},
    {"granite_cli"},                               # the package's own __init__ (lazy entry points)
    {"memory", "convert", "serve"},                # serve: OpenAI-compatible servers as bench subjects
    {"energy"},                                    # GPU power: NVML here, or a server host's DCGM exporter
    {"bench"},                                     # reads memory's predictions for its verdicts
    {"commands"},                                  # the CLI: parses options, calls one library function
    {"app"},
    {"__main__"},
]
RANK = {unit: i for i, row in enumerate(LAYERS) for unit in row}
OURS = ("granite_cli", "commands")


def _modules() -> dict[str, Path]:
    out = {}
    for top, name in (("granite_cli", "granite_cli"), ("commands", "granite_cli.commands")):
        for p in (ROOT / top).rglob("*.py"):
            parts = list(p.relative_to(ROOT / top).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([name, *parts])] = p
    return out


MODULES = _modules()


def _canon(name: str) -> str:
    return "granite_cli." + name if name.split(".")[0] == "commands" else name


def _unit(module: str) -> str:
    parts = _canon(module).split(".")
    return parts[1] if len(parts) > 1 else "granite_cli"


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST, top_level_only: bool):
    """(imported module, names, node) for each import of our code, skipping `if TYPE_CHECKING:`
    blocks; with top_level_only, also skipping imports inside functions (run on first call)."""
    def walk(node):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                continue
            if top_level_only and isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            if isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                if child.module.split(".")[0] in OURS:
                    yield _canon(child.module), [a.name for a in child.names], child
            elif isinstance(child, ast.Import):
                for a in child.names:
                    if a.name.split(".")[0] in OURS:
                        yield _canon(a.name), [], child
            yield from walk(child)
    yield from walk(tree)


def _targets(module: str, names: list[str], modules=None) -> list[str]:
    """The modules an import reads from: each imported name that is a submodule, and the module
    itself for any other name (a package's __init__ that only holds submodules is not a dependency)."""
    modules = MODULES if modules is None else modules
    subs = [f"{module}.{n}" for n in names if f"{module}.{n}" in modules]
    return subs + ([module] if len(subs) < len(names) or not names else [])


TREES = {m: ast.parse(p.read_text(), str(p)) for m, p in MODULES.items()}


def test_every_unit_has_a_row():
    assert {_unit(m) for m in MODULES} <= set(RANK), {_unit(m) for m in MODULES} - set(RANK)


def test_imports_point_down_the_layers():
    upward = []
    for m, tree in TREES.items():
        for target, names, node in _imports(tree, top_level_only=False):
            for t in _targets(target, names):
                a, b = _unit(m), _unit(t)
                if a != b and RANK[b] >= RANK[a]:
                    upward.append(f"{m}:{node.lineno} imports {t} ({a} is not above {b})")
    assert not upward, "\n".join(upward)


def _cycles(trees: dict[str, ast.AST], modules) -> list[str]:
    """Import cycles between our modules, counting imports inside functions too (they run on first
    call, and a cycle through one is a cycle in the design however late it runs)."""
    graph = {m: set() for m in trees}
    for m, tree in trees.items():
        for target, names, _ in _imports(tree, top_level_only=False):
            graph[m].update(t for t in _targets(target, names, modules) if t in graph and t != m)
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    found = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                found.append(" -> ".join(path[path.index(n):] + [n]))
            elif n not in state:
                visit(n, path + [n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    return found


def test_no_import_cycle_even_through_functions():
    cycles = _cycles(TREES, MODULES)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_cycle_check_sees_a_cycle_inside_a_function():
    fake = {"granite_cli.a": ast.parse("def f():\n    from granite_cli.b import g\n"),
            "granite_cli.b": ast.parse("from granite_cli.a import f\n")}
    assert _cycles(fake, set(fake)) == ["granite_cli.a -> granite_cli.b -> granite_cli.a"]


def _private_defs(tree: ast.AST) -> set[str]:
    """Private names a module defines: functions, classes, module names and attributes it assigns."""
    out = set()
    for n in ast.walk(tree):
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.add(n.name)
        elif isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store):
            out.add(n.id)
        elif isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Store):
            out.add(n.attr)
        elif isinstance(n, ast.arg):
            out.add(n.arg)
    return {x for x in out if x.startswith("_") and not x.startswith("__")}


def test_no_private_name_crosses_a_module():
    defs = {m: _private_defs(t) for m, t in TREES.items()}
    ours = set().union(*defs.values())
    found = []
    for m, tree in TREES.items():
        for target, names, node in _imports(tree, top_level_only=False):
            hidden = [n for n in names if n.startswith("_") and not n.startswith("__")]
            hidden += [part for part in target.split(".") if part.startswith("_") and not part.startswith("__")]
            found += [f"{m}:{node.lineno} imports {n} from {target}" for n in hidden]
        for n in ast.walk(tree):
            # obj._x where _x is private to another of our modules (torch's own privates are not ours)
            if (isinstance(n, ast.Attribute) and n.attr.startswith("_") and not n.attr.startswith("__")
                    and n.attr in ours and n.attr not in defs[m]):
                found.append(f"{m}:{n.lineno} uses .{n.attr}, private to another module")
    assert not found, "\n".join(found)


def test_the_checks_see_what_they_claim():
    # the scan reads every package, and each rule flags a violation built for it
    assert {"config", "checkpoint", "model", "convert", "bench", "memory", "commands"} <= {_unit(m) for m in MODULES}
    up = ast.parse("from granite_cli.bench.runner import Runner\n")
    assert [t for t, _, _ in _imports(up, False)] == ["granite_cli.bench.runner"]
    assert RANK[_unit("granite_cli.bench.runner")] > RANK[_unit("granite_cli.config.model")]
    assert RANK[_unit("granite_cli.commands.common")] > RANK[_unit("granite_cli.bench")]
    hidden = ast.parse("if TYPE_CHECKING:\n    from granite_cli.config import ModelConfig\n")
    assert list(_imports(hidden, False)) == []
    assert "_x" in _private_defs(ast.parse("class A:\n    def f(self):\n        self._x = 1\n"))


def test_functions_and_modules_stay_readable():
    long_functions = [f"{m}:{n.lineno} {n.name} is {n.end_lineno - n.lineno + 1} lines"
                      for m, tree in TREES.items() for n in ast.walk(tree)
                      if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno >= 80]
    long_modules = [f"{m} is {n} lines" for m, p in MODULES.items() if (n := len(p.read_text().splitlines())) > 450]
    assert not long_functions + long_modules, "\n".join(long_functions + long_modules)
