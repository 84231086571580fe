"""The package's shape, enforced: rooms import downward only, no module over 400 lines, a short top level,
no Airflow in lesion_tasks, the README's tree names every module, and bench never imports the tests."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "lesion_tasks"
# bottom to top: a module may import its own room and the rooms before it
ROOMS = ["core", "ingest", "model", "data", "versions", "sites", "training", "assessment", "scoring", "review", "ops"]
TOP = len(ROOMS)  # cli.py, demo.py: may import everything
MAX_LINES = 400
MAX_TOP_MODULES = 12


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "migrations" not in p.relative_to(PACKAGE).parts)


def _rank(parts: tuple[str, ...]) -> int:
    """The room of a module path inside the package (('core', 'db.py')) or of a dotted name's parts."""
    return ROOMS.index(parts[0]) if parts and parts[0] in ROOMS else TOP


def _imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "lesion_tasks":
                found += [(node.lineno, f"lesion_tasks.{a.name}") for a in node.names]
            else:
                found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
    return found


def test_rooms_import_downward_only():
    wrong = []
    for path in _modules():
        own = _rank(path.relative_to(PACKAGE).parts)
        for line, name in _imports(path):
            parts = name.split(".")
            if parts[0] == "airflow":
                wrong.append(f"{path.relative_to(REPO)}:{line} imports Airflow")
            if parts[0] != "lesion_tasks" or len(parts) < 2:
                continue
            top_module = (PACKAGE / f"{parts[1]}.py").exists()
            target = _rank(tuple(parts[1:])) if parts[1] in ROOMS or top_module else 0  # 0: the package's __version__
            if target > own:
                wrong.append(f"{path.relative_to(REPO)}:{line} imports {name} (a room above its own)")
    assert not wrong, "\n".join(wrong)


def test_every_room_says_what_it_holds_and_what_it_may_import():
    for room in ROOMS:
        doc = ast.get_docstring(ast.parse((PACKAGE / room / "__init__.py").read_text()))
        assert doc and "May import" in doc, room


def test_modules_are_small_and_the_top_level_short():
    long = {p.relative_to(REPO).as_posix(): n for p in _modules() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long
    top = [p.name for p in PACKAGE.glob("*.py")]
    assert len(top) <= MAX_TOP_MODULES, top
    assert {p.name for p in PACKAGE.iterdir() if p.is_dir() and not p.name.startswith("__")} >= set(ROOMS)


def test_the_readme_tree_names_every_module():
    readme = (REPO / "README.md").read_text()
    tree = readme.split("## What's where", 1)[1].split("```", 2)[1].split("\nlesion_tasks/", 1)[1]
    tree = tree.split("\n", 1)[1]
    tree = tree[: re.search(r"^\S", tree, re.M).start()]  # up to the next top-level folder
    named: set[str] = set()
    room = None
    for line in tree.splitlines():
        m = re.match(r"^  (\w+)/(\s|$)", line)
        if m:
            room = m.group(1)
            continue
        m = re.match(r"^    (\w+\.py(?:, \w+\.py)*)(\s|$)", line)
        if m and room:
            named |= {f"{room}/{n.strip()}" for n in m.group(1).split(",")}
        m = re.match(r"^  (\w+\.py(?:, \w+\.py)*)(\s|$)", line)
        if m:
            room = None
            named |= {n.strip() for n in m.group(1).split(",")}
    actual = {p.relative_to(PACKAGE).as_posix() for p in _modules() if p.name != "__init__.py"}
    assert actual - named == set(), f"modules missing from the README tree: {sorted(actual - named)}"
    assert named - actual == set(), f"the README tree names modules that do not exist: {sorted(named - actual)}"


def test_bench_and_tools_never_import_the_tests():
    wrong = [f"{p.relative_to(REPO)}:{line}" for folder in ("bench", "tools") for p in (REPO / folder).rglob("*.py")
             for line, name in _imports(p) if name == "tests" or name.startswith("tests.")]
    assert not wrong, wrong
