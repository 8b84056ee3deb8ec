"""Load a model in its runtime in a short-lived child process and report its signature.

The hub checks every upload by loading it, but a huge or hostile model must not
bloat or crash the hub: ``inspect_model`` runs ``python -m modules.loadcheck`` with
a timeout (and optionally an address-space limit), and reads one JSON line back.
The child prints ``{"inputs": [...], "outputs": [...]}`` or ``{"error": "..."}``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from modules.runners import ModelError

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def describe(path: Path, runtime: str) -> dict[str, Any]:
    """In this process: load the model and return its signature as JSON-ready dicts."""
    from modules.runners import load_model_file

    runner = load_model_file(path, runtime)
    return {"inputs": [s.to_dict() for s in runner.inputs],
            "outputs": [s.to_dict() for s in runner.outputs]}


def _limit_memory(limit_bytes: int) -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes))


def inspect_model(path: Path, runtime: str, timeout_s: float = 120.0, memory_limit_mb: int = 0) -> dict[str, Any]:
    """Load ``path`` in a child process; return its signature or raise ModelError with the runtime's reason."""
    env = dict(os.environ)
    # the child must import this very code tree, installed or not
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH", "")) if p)
    env["OMP_NUM_THREADS"] = "1"
    limit = memory_limit_mb * 1024 * 1024
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "modules.loadcheck", runtime, os.path.abspath(path)], env=env, capture_output=True,
            timeout=timeout_s, stdin=subprocess.DEVNULL, cwd=os.path.dirname(os.path.abspath(path)),
            preexec_fn=(lambda: _limit_memory(limit)) if limit else None,
        )
    except subprocess.TimeoutExpired:
        raise ModelError(f"loading {path.name} took longer than {timeout_s:g}s; refused") from None
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
    why = f"killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exit status {proc.returncode}"
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
