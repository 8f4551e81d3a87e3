"""The map of the code is true: every room of lapo_ray imports only rooms below it, and
docs/architecture.md's table of rooms names exactly what each room imports."""

from __future__ import annotations

import ast
import re
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
    {"experiment", "sweep", "benchmarks"},
]
LAYER = {room: i for i, rooms in enumerate(LAYERS) for room in rooms}


def room_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "lapo_ray" and len(parts) > 1 else None


def imports_by_room() -> dict[str, dict[str, set[str]]]:
    """room -> imported room -> the files that import it (imports inside functions count too)."""
    found: dict[str, dict[str, set[str]]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(REPO)
        own = rel.parts[1].removesuffix(".py")
        if own == "__init__":
            continue
        deps = found.setdefault(own, {})
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = ([f"lapo_ray.{a.name}" for a in node.names] if node.module == "lapo_ray"
                         else [node.module])
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                room = room_of(name)
                if room and room != own:
                    deps.setdefault(room, set()).add(str(rel))
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
