"""The map of the code is true: every room of lapo_ray imports only rooms below it,
docs/architecture.md's table of rooms names exactly what each room imports, and no two files of
lapo_ray import each other, directly or through a loop. And the code stays readable: no
function of the library is longer than a screen."""

from __future__ import annotations

import ast
import re
from collections import deque
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "lapo_ray"

# Bottom to top. A room may import rooms of lower layers only (and itself).
LAYERS = [
    {"config", "storage", "progress", "telemetry", "runtime"},
    {"envs"},
    {"models"},
    {"data"},
    {"evaluation"},
    {"train"},
    {"rl"},
    {"pipelines", "benchmarks"},
]
LAYER = {room: i for i, rooms in enumerate(LAYERS) for room in rooms}


def room_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "lapo_ray" and len(parts) > 1 else None


def package_modules(package: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every file of ``package`` (a package is its __init__.py)."""
    modules = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imported_names(node: ast.AST, home: str, modules: dict[str, Path]) -> list[str]:
    """What one import statement names, in a module whose package is ``home``: ``from p import n``
    names the submodule p.n where there is one, else p; relative imports are resolved."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module or ""
    if node.level:
        up = home.split(".")[: len(home.split(".")) - node.level + 1]
        base = ".".join([*up, base] if base else up)
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]


def import_graph(package: Path) -> dict[str, set[str]]:
    """module -> the modules of ``package`` its code imports, at module level or inside functions.

    Only written imports count. Python runs a package's __init__ before any submodule of it, but
    that implicit import is no edge here: a package that re-exports its submodules is not a cycle
    with them. A submodule that itself imports its package, whose __init__ imports it, is."""
    modules = package_modules(package)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        home = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = graph.setdefault(name, set())
        for node in ast.walk(ast.parse(path.read_text())):
            for target in imported_names(node, home, modules):
                while target not in modules and "." in target:  # ``import p.m.attr`` imports p.m
                    target = target.rpartition(".")[0]
                if target in modules and target != name:
                    deps.add(target)
    return graph


def shortest_loop(graph: dict[str, set[str]], start: str) -> list[str] | None:
    """The shortest chain of imports from ``start`` back to itself, or None."""
    came: dict[str, str] = {}
    queue = deque([start])
    while queue:
        module = queue.popleft()
        for dep in sorted(graph[module]):
            if dep == start:
                chain = [module]
                while chain[-1] != start:
                    chain.append(came[chain[-1]])
                return [*reversed(chain), start]
            if dep not in came:
                came[dep] = module
                queue.append(dep)
    return None


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One loop per set of modules that import each other, as ``a, b, ..., a``."""
    loops, seen = [], set()
    for module in sorted(graph):
        loop = shortest_loop(graph, module)
        if loop and frozenset(loop) not in seen:
            seen.add(frozenset(loop))
            loops.append(loop)
    return loops


def imports_by_room() -> dict[str, dict[str, set[str]]]:
    """room -> imported room -> the files that import it (imports inside functions count too)."""
    modules = package_modules(PACKAGE)
    found: dict[str, dict[str, set[str]]] = {}
    for module, deps in import_graph(PACKAGE).items():
        own = room_of(module)
        if own is None:
            continue
        rooms = found.setdefault(own, {})
        for dep in deps:
            room = room_of(dep)
            if room and room != own:
                rooms.setdefault(room, set()).add(str(modules[module].relative_to(REPO)))
    return found


def test_every_room_has_a_layer():
    rooms = {p.name.removesuffix(".py") for p in PACKAGE.iterdir()
             if (p.is_dir() and any(p.glob("*.py"))) or (p.suffix == ".py" and p.name != "__init__.py")}
    assert rooms == set(LAYER), f"rooms without a layer: {rooms - set(LAYER)}; layers without a room: {set(LAYER) - rooms}"


def test_imports_point_down_only():
    upward = [f"{f} ({room}) imports {dep} (a layer above)"
              for room, deps in imports_by_room().items()
              for dep, files in deps.items() if LAYER[dep] >= LAYER[room]
              for f in sorted(files)]
    assert not upward, "\n".join(upward)


def test_no_two_files_of_lapo_ray_import_each_other():
    loops = import_cycles(import_graph(PACKAGE))
    assert not loops, "import cycles:\n" + "\n".join(" -> ".join(loop) for loop in loops)


def test_the_cycle_check_finds_loops_through_functions_submodules_and_packages(tmp_path):
    files = {
        "__init__.py": "from pkg.a import f\n",  # a re-export: no cycle with pkg.a
        "a.py": "import os\n\ndef f():\n    from pkg import b\n",  # b is a submodule: pkg.b
        "b.py": "import pkg.c.thing\n",
        "c.py": "from pkg.a import f\n",
        "r.py": "from . import s\n",
        "s.py": "from .r import z\n",
        "sub/__init__.py": "from pkg.sub.x import h\n",
        "sub/x.py": "from pkg.sub import y\n",  # the submodule pkg.sub.y, not the package
        "sub/y.py": "",
        "d/__init__.py": "from pkg.d.e import k\n",
        "d/e.py": "from pkg.d import other\n",  # a name of its own package's __init__
    }
    for rel, text in files.items():
        (tmp_path / "pkg" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "pkg" / rel).write_text(text)
    graph = import_graph(tmp_path / "pkg")
    assert graph["pkg.a"] == {"pkg.b"} and graph["pkg.sub.x"] == {"pkg.sub.y"} and graph["pkg"] == {"pkg.a"}
    assert import_cycles(graph) == [["pkg.a", "pkg.b", "pkg.c", "pkg.a"], ["pkg.d", "pkg.d.e", "pkg.d"],
                                    ["pkg.r", "pkg.s", "pkg.r"]]


def documented_imports() -> dict[str, set[str]]:
    table = (REPO / "docs" / "architecture.md").read_text().split("## Rooms", 1)[1].split("\n## ", 1)[0]
    documented = {}
    for line in table.splitlines():
        m = re.match(r"\| `lapo_ray/(\w+)(?:/|\.py)` \|.*\| ([^|]*) \|$", line)
        if m:
            cell = m.group(2).strip()
            documented[m.group(1)] = set() if cell == "nothing" else {
                re.sub(r"\s*\(.*\)$", "", x).strip() for x in cell.split(",")}
    return documented


def test_the_architecture_table_names_what_each_room_imports():
    actual = {room: set(deps) for room, deps in imports_by_room().items()}
    documented = documented_imports()
    assert set(documented) == set(actual), f"table rooms {sorted(documented)} vs code rooms {sorted(actual)}"
    wrong = {room: {"table": sorted(documented[room]), "code": sorted(actual[room])}
             for room in actual if documented[room] != actual[room]}
    assert not wrong, wrong


# Above the library: the entry points and the analysis scripts behind docs/results/. They may
# use any room, but only through its public names, so that a room can change its internals
# without breaking a script nobody runs in CI.
TOP_LAYER = sorted([*REPO.glob("jobs/*.py"), *REPO.glob("docs/results/*.py")])


def private_imports(path: Path) -> list[str]:
    """``file:line imports NAME`` for every private module or name of lapo_ray it imports."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "lapo_ray":
            names = [*node.module.split(".")[1:], *(a.name for a in node.names)]
        elif isinstance(node, ast.Import):
            names = [part for a in node.names if a.name.split(".")[0] == "lapo_ray" for part in a.name.split(".")]
        else:
            continue
        found += [f"{path.name}:{node.lineno} imports {n}" for n in names if n.startswith("_")]
    return found


def test_jobs_and_analysis_scripts_use_only_public_library_names():
    assert {p.parent.name for p in TOP_LAYER} == {"jobs", "results"}
    private = [line for path in TOP_LAYER for line in private_imports(path)]
    assert not private, "\n".join(private)


def test_the_private_import_check_finds_private_names_and_modules(tmp_path):
    script = tmp_path / "s.py"
    script.write_text("from lapo_ray.evaluation.plots import _plt, save_figure\nimport lapo_ray.data._x\n"
                      "from lapo_ray.data import corpus\nimport os._private\n")
    assert private_imports(script) == ["s.py:1 imports _plt", "s.py:2 imports _x"]


# A function longer than this reads as several steps without names: split it into named ones.
MAX_FUNCTION_LINES = 60


def long_functions(package: Path, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """``file:line name (N lines)`` for every function of ``package`` (methods and nested ones
    included) whose body, docstring included, spans more than ``limit`` lines."""
    found = []
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.body[0].lineno + 1
                if lines > limit:
                    found.append(f"{path.relative_to(package.parent)}:{node.lineno} {node.name} ({lines} lines)")
    return found


def test_no_library_function_is_longer_than_60_lines():
    found = long_functions(PACKAGE)
    assert not found, f"functions over {MAX_FUNCTION_LINES} lines (split them into named steps):\n" + "\n".join(found)


def test_the_length_check_names_long_functions_methods_and_coroutines(tmp_path):
    def body(lines: int, indent: str = "    ") -> list[str]:
        return [f"{indent}x{i} = {i}" for i in range(lines)]

    source = ["def short():", *body(60),  # lines 1-61: 60 lines of body, at the limit
              "def long():", '    """A docstring counts."""', *body(60),  # lines 62-123
              "class C:", "    async def method(self):", *body(61, "        ")]  # lines 124-186
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "m.py").write_text("\n".join(source) + "\n")
    assert long_functions(tmp_path / "pkg") == ["pkg/m.py:62 long (61 lines)", "pkg/m.py:125 method (61 lines)"]
