"""Load a model in its runtime in a short-lived child process and report its signature.

The hub checks every upload by loading it, but a huge or hostile model must not
bloat or crash the hub, nor read its keys: ``inspect_model`` runs ``python -m modules.loadcheck``
in the hub's sandbox (modules/sandbox.py) with a timeout and resource limits, and reads one
JSON line back.
The child prints ``{"inputs": [...], "outputs": [...]}`` or ``{"error": "..."}``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from modules.runners import ModelError
from modules.sandbox import Limits, Sandbox, exit_reason

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def describe(path: Path, runtime: str) -> dict[str, Any]:
    """In this process: load the model and return its signature as JSON-ready dicts."""
    from modules.runners import load_model_file

    runner = load_model_file(path, runtime)
    return {"inputs": [s.to_dict() for s in runner.inputs],
            "outputs": [s.to_dict() for s in runner.outputs]}


def inspect_model(path: Path, runtime: str, timeout_s: float = 120.0, memory_limit_mb: int = 0,
                  sandbox: Sandbox | None = None) -> dict[str, Any]:
    """Load ``path`` in a child process; return its signature or raise ModelError with the runtime's reason.

    With an active ``sandbox`` the child sees a copy of the model's directory (the file and its siblings,
    symlinks followed) and nothing of the hub's (modules/sandbox.py); a CPU-time cap backs the timeout.
    """
    sandbox = sandbox or Sandbox()
    path = Path(os.path.abspath(path))
    where = sandbox.stage(path.parent, follow_symlinks=True) if sandbox.active else path.parent
    env = None
    if not sandbox.active:  # the hub's environment, as before the sandbox; the child must import this code tree
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH", "")) if p)
    launch = sandbox.launch([sys.executable, "-m", "modules.loadcheck", runtime, str(where / path.name)],
                            read_only=[where], cwd=where, env={**(env or {}), "OMP_NUM_THREADS": "1"},
                            limits=Limits(memory_mb=memory_limit_mb, cpu_s=math.ceil(timeout_s) + 1))
    try:
        proc = subprocess.run(launch.argv, capture_output=True, timeout=timeout_s, stdin=subprocess.DEVNULL,
                              **launch.kwargs())
    except subprocess.TimeoutExpired:
        raise ModelError(f"loading {path.name} took longer than {timeout_s:g}s; refused") from None
    finally:
        launch.cleanup()
        if where != path.parent:
            shutil.rmtree(where, ignore_errors=True)
    lines = [line for line in proc.stdout.decode(errors="replace").splitlines() if line.startswith("{")]
    if lines:
        try:
            result = json.loads(lines[-1])
        except ValueError:
            result = None
        if isinstance(result, dict) and "error" in result:
            raise ModelError(str(result["error"]))
        if isinstance(result, dict) and proc.returncode == 0:
            return result
    tail = proc.stderr.decode(errors="replace").strip().splitlines()[-3:]
    why = exit_reason(sandbox, proc.returncode)
    raise ModelError(f"loading {path.name} crashed the checking process ({why}): {' | '.join(tail) or 'no output'}")


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m modules.loadcheck RUNTIME PATH", file=sys.stderr)
        return 2
    runtime, path = argv
    try:
        result: dict[str, Any] = describe(Path(path), runtime)
        code = 0
    except ModelError as exc:
        result, code = {"error": str(exc)}, 1
    except MemoryError:
        result, code = {"error": f"loading {Path(path).name} ran out of memory in the checking process"}, 1
    sys.stdout.write("\n" + json.dumps(result) + "\n")  # own line: runtimes may print to stdout too
    sys.stdout.flush()
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
