"""Run the ``edgefleet`` CLI as a user does: a subprocess against a test's hub."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def cli(server: Any, *args: str, ok: bool = True, timeout: float = 180,
        columns: int | None = None) -> subprocess.CompletedProcess[str]:
    """``edgefleet --hub URL --token T ARGS…``; with ``ok`` the command must exit 0; ``columns``: a terminal that wide."""
    env = {**os.environ, **({"COLUMNS": str(columns)} if columns else {})}
    proc = subprocess.run([sys.executable, "-m", "edgefleet", "--hub", server.url, "--token", server.admin_token, *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    if ok:
        assert proc.returncode == 0, f"{args} failed: {proc.stdout}\n{proc.stderr}"
    return proc


def as_json(proc: subprocess.CompletedProcess[str]) -> Any:
    return json.loads(proc.stdout)
