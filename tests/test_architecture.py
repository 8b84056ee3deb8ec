"""Dependencies point one way: protocol <- modules <- agent, hub; simulator -> agent; hub and agent never meet."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["protocol", "modules", "agent", "hub", "simulator", "edgefleet"]
ALLOWED = {
    "protocol": set(),
    "modules": {"protocol"},
    "agent": {"protocol", "modules"},
    "hub": {"protocol", "modules"},
    "simulator": {"protocol", "modules", "agent"},
    "edgefleet": {"protocol", "modules", "agent", "hub", "simulator"},
}


def imported_packages(package: str) -> dict[str, set[str]]:
    """Map each first-party package imported anywhere in ``package`` to the files that import it."""
    found: dict[str, set[str]] = {}
    for path in (ROOT / package).rglob("*.py"):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                if top in PACKAGES and top != package:
                    found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return found


@pytest.mark.parametrize("package", PACKAGES)
def test_import_direction(package):
    assert (ROOT / package).is_dir(), f"package {package}/ is missing"
    bad = {dep: files for dep, files in imported_packages(package).items() if dep not in ALLOWED[package]}
    assert not bad, f"{package} must not import {sorted(bad)}: {bad}"


def test_checker_sees_a_forbidden_import(tmp_path, monkeypatch):
    """The direction test would catch a hub -> agent import (guards against a checker that finds nothing)."""
    pkg = tmp_path / "hub"
    pkg.mkdir()
    (pkg / "x.py").write_text("from agent.core import Agent\nimport protocol.topics\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert set(imported_packages("hub")) == {"agent", "protocol"}


def test_import_protocol_pulls_in_no_io_library():
    code = (
        "import sys, protocol, protocol.messages, protocol.signing, protocol.manifest, protocol.verify, "
        "protocol.topics, protocol.broker_url, protocol.encoding, protocol.trust, protocol.policy\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'paho','fastapi','starlette','uvicorn','httpx','requests','sqlite3','sqlite_utils','psycopg','aiohttp','http','onnxruntime','numpy'})\n"
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"import protocol pulled in I/O libraries: {out.stdout.strip()}"


def test_agent_daemon_loads_neither_numpy_nor_pydantic():
    """The daemon's idle memory (issue #4): NumPy lives in the module workers, pydantic on the hub only,
    and /proc replaces psutil (with the ctypes it loads).

    The same subprocess then imports the synthetic workload, which does load NumPy: the check can see it.
    """
    heavy = "{'numpy', 'pydantic', 'onnxruntime', 'psutil', 'ctypes'}"
    code = (
        "import sys, agent, agent.daemon, agent.core\n"
        f"print(','.join(sorted(m for m in sys.modules if m.split('.')[0] in {heavy})))\n"
        "import agent.workload\n"
        "print('numpy' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    loaded, seen = out.stdout.splitlines()
    assert loaded == "", f"importing the agent daemon loaded {loaded}"
    assert seen == "True"


# --- inside the hub: capability packages over one store, the API on top (docs/architecture.md) ---------------

HUB = ROOT / "hub"
DB_DRIVERS = {"sqlite3", "sqlite_utils", "psycopg", "psycopg2", "psycopg_pool"}
API_WIRING = {"hub/__init__.py", "hub/server.py"}  # they start the app; nothing else below the API imports it


def module_imports(path: Path) -> set[str]:
    """Absolute module names a file imports (``from hub import api`` counts as ``hub.api``)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


def hub_files(root: Path) -> dict[str, set[str]]:
    return {str(p.relative_to(root.parent)): module_imports(p) for p in sorted(root.rglob("*.py"))}


def store_violations(root: Path) -> list[str]:
    return [f for f, mods in hub_files(root).items()
            if not f.startswith("hub/store/") and any(m.split(".")[0] in DB_DRIVERS for m in mods)]


def api_violations(root: Path) -> list[str]:
    return [f for f, mods in hub_files(root).items()
            if not f.startswith("hub/api/") and f not in API_WIRING
            and any(m == "hub.api" or m.startswith("hub.api.") for m in mods)]


def route_dependency_violations(root: Path) -> list[str]:
    """Route modules whose ``Depends(x)`` names an ``x`` not imported from hub.api.deps, or that read app.state."""
    bad = []
    for path in sorted((root / "api" / "routes").glob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        from_deps = {a.asname or a.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                     and node.module == "hub.api.deps" for a in node.names}
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Depends" and node.args:
                target = node.args[0]
                name = target.func if isinstance(target, ast.Call) else target  # Depends(require("admin"))
                if getattr(name, "id", None) not in from_deps:
                    bad.append(f"{path.name}:{node.lineno} Depends({ast.unparse(target)})")
            if isinstance(node, ast.Attribute) and node.attr == "state" and ast.unparse(node.value).endswith(".app"):
                bad.append(f"{path.name}:{node.lineno} reads {ast.unparse(node)} (use a dependency from deps.py)")
    return bad


def test_only_the_store_imports_a_database_driver():
    assert store_violations(HUB) == []


def test_nothing_below_the_api_imports_it():
    assert api_violations(HUB) == []


def test_routes_take_their_dependencies_from_deps():
    assert route_dependency_violations(HUB) == []


def test_every_hub_package_says_what_it_owns():
    missing = [str(p.relative_to(ROOT)) for p in HUB.rglob("__init__.py")
               if ast.get_docstring(ast.parse(p.read_text())) is None]
    assert missing == []


def test_the_hub_checks_see_violations(tmp_path):
    """Each rule above finds a planted violation (guards against checks that find nothing)."""
    hub = tmp_path / "hub"
    (hub / "fleet").mkdir(parents=True)
    (hub / "api" / "routes").mkdir(parents=True)
    (hub / "store").mkdir()
    (hub / "store" / "db.py").write_text("import sqlite3\n")
    (hub / "fleet" / "x.py").write_text("import sqlite3\nfrom hub.api.deps import get_hub\n")
    (hub / "fleet" / "y.py").write_text("from hub import api\n")
    (hub / "api" / "routes" / "r.py").write_text(
        "from fastapi import Depends\nfrom hub.api.deps import require\nfrom elsewhere import get_thing\n"
        "def a(x=Depends(require('admin')), y=Depends(get_thing)):\n    return request.app.state.hub\n")
    assert store_violations(hub) == ["hub/fleet/x.py"]
    assert api_violations(hub) == ["hub/fleet/x.py", "hub/fleet/y.py"]
    assert route_dependency_violations(hub) == ["r.py:4 Depends(get_thing)", "r.py:5 reads request.app.state (use a "
                                                "dependency from deps.py)"]


# --- inside the agent ------------------------------------------------------------------------------

AGENT_MAX_LINES = 420
# The reconciler decides; it does no I/O. These would let it (or wait on it): asyncio, the MQTT client, the
# filesystem, databases, sockets, processes, threads, the clock.
IO_MODULES = {"asyncio", "paho", "os", "pathlib", "shutil", "sqlite3", "sqlite_utils", "socket", "subprocess",
              "threading", "time", "select", "selectors", "http", "urllib"}


def agent_module_imports(path: Path, package_root: Path) -> set[str]:
    """Every module ``path`` imports, anywhere in the file (also under TYPE_CHECKING and inside functions)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            # ``from pkg import sub``: sub may be a module of its own
            names.update(f"{node.module}.{a.name}" for a in node.names
                         if (package_root / node.module.replace(".", "/") / f"{a.name}.py").exists())
    return names


def import_graph(package: str, root: Path) -> dict[str, set[str]]:
    """``package``'s modules -> the modules of ``package`` each imports."""
    modules = {".".join(p.relative_to(root).with_suffix("").parts).removesuffix(".__init__"): p
               for p in (root / package).rglob("*.py")}
    return {name: {m for m in agent_module_imports(path, root) if m in modules and m != name}
            for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (``[a, b, ..., a]``), or None. The package's own ``__init__`` is left out: importing
    any submodule runs it first, so its imports are not edges back."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)) is not None:
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)) is not None:
            return found
    return None


def test_agent_modules_import_each_other_one_way():
    graph = import_graph("agent", ROOT)
    graph.pop("agent", None)
    assert "agent.core" in graph and "agent.reconcile" in graph["agent.executor"]  # the checker sees imports
    cycle = find_cycle(graph)
    assert cycle is None, f"import cycle in agent/: {' -> '.join(cycle)}"


def test_cycle_checker_sees_a_cycle(tmp_path):
    pkg = tmp_path / "agent"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from agent.b import x\n")
    (pkg / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from agent import a\n")
    (pkg / "c.py").write_text("import agent.a\n")
    graph = import_graph("agent", tmp_path)
    assert graph["agent.c"] == {"agent.a"}
    assert find_cycle(graph) == ["agent.a", "agent.b", "agent.a"]


def test_the_reconciler_does_no_io():
    """``agent/reconcile.py`` imports only pure modules: no I/O library, and of ours only ``protocol``
    (which ``test_import_protocol_pulls_in_no_io_library`` keeps pure in turn)."""
    imported = agent_module_imports(ROOT / "agent" / "reconcile.py", ROOT)
    tops = {name.split(".")[0] for name in imported}
    assert not tops & IO_MODULES, f"agent/reconcile.py imports {sorted(tops & IO_MODULES)}"
    assert tops <= {"__future__", "collections", "dataclasses", "typing", "protocol"}, sorted(tops)
    assert "time.time" not in (ROOT / "agent" / "reconcile.py").read_text()  # time comes in as ``now``


@pytest.mark.parametrize("path", sorted((ROOT / "agent").glob("*.py")), ids=lambda p: p.name)
def test_agent_files_stay_small(path):
    lines = len(path.read_text().splitlines())
    assert lines <= AGENT_MAX_LINES, f"agent/{path.name} has {lines} lines (> {AGENT_MAX_LINES}): split it by responsibility"
