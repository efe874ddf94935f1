"""The house's floors (DESIGN.md, Layout and rules 1, 3, 4): read every module's imports.

Ground floor: abi.py (imports nothing of ours), then errors.py, wire.py, netfile.py, filekind.py
(what a file is), process.py and timeline.py (--trace's events). The two wings, fabric/ and
guest/, stand on it and never import each other or anything above them.
Above them: lab.py and the rooms it uses; on top, the faces (cli.py, shell.py, testing.py,
bench/report.py), which nothing of lgnet imports but another face (bench's run, its API, is no
face)."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "lgnet"
GROUND = {"lgnet.abi", "lgnet.errors", "lgnet.wire", "lgnet.netfile", "lgnet.filekind",
          "lgnet.process", "lgnet.timeline"}
FACES = {"lgnet.cli", "lgnet.shell", "lgnet.testing", "lgnet.__main__", "lgnet.bench.report"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def ours(path: Path) -> set[str]:
    """Every lgnet module this file imports, wherever in the file the import is."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "lgnet"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                and node.module.split(".")[0] == "lgnet":
            # `from lgnet import abi` imports lgnet.abi; `from lgnet.x import name`, lgnet.x
            for alias in node.names:
                candidate = "%s.%s" % (node.module, alias.name)
                module = PACKAGE.parent / (candidate.replace(".", "/") + ".py")
                package = PACKAGE.parent / candidate.replace(".", "/") / "__init__.py"
                found.add(candidate if module.exists() or package.exists() else node.module)
    return found


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def wing(name: str) -> str | None:
    for w in ("lgnet.fabric", "lgnet.guest"):
        if name == w or name.startswith(w + "."):
            return w
    return None


def test_the_modules_were_found():
    assert {"lgnet.abi", "lgnet.fabric.dma", "lgnet.guest.launcher", "lgnet.lab"} <= set(MODULES)


def test_abi_imports_nothing_of_ours():
    assert ours(MODULES["lgnet.abi"]) == set()


@pytest.mark.parametrize("name", sorted(n for n in MODULES if n in GROUND))
def test_the_ground_floor_imports_only_the_ground_floor(name):
    assert ours(MODULES[name]) - GROUND - {"lgnet"} == set()


@pytest.mark.parametrize("name", sorted(n for n in MODULES if wing(n)))
def test_a_wing_imports_only_itself_and_the_ground_floor(name):
    mine = wing(name)
    stray = {m for m in ours(MODULES[name]) if m not in GROUND and wing(m) != mine}
    assert stray == set(), "%s imports %s" % (name, ", ".join(sorted(stray)))


@pytest.mark.parametrize("name", sorted(n for n in MODULES if n not in FACES))
def test_nothing_imports_a_face(name):
    assert ours(MODULES[name]) & FACES == set()
