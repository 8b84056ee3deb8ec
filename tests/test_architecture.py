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
        "{'paho','fastapi','starlette','uvicorn','httpx','requests','sqlite3','sqlite_utils','aiohttp','http','onnxruntime','numpy'})\n"
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
