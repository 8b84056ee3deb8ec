"""``python -m agent install-offline --data DATA FILE``: install an offline package on this device.

The package is copied into ``DATA/inbox``. If an agent runs on DATA (it holds ``DATA/agent.lock``), that agent
takes it; otherwise this command runs the agent itself (the same daemon, holding the lock) until the package is
installed or refused, then stops it. Either way the agent verifies and installs it (agent/offline.py) and
writes the result beside it; this command prints the result's one line and exits with its code:
0 installed (or already applied), 2 usage (no package, not enrolled), 3 refused (nothing applied),
4 the install failed (rolled back), 5 no answer in time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from agent.daemon import run_agent, take_lock
from agent.identity import EnrollmentError, load_identity
from agent.offline import INBOX, OK, TIMEOUT, USAGE, result_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m agent install-offline",
                                     description="Install an offline package (edgefleet offline export) on this device.")
    parser.add_argument("--data", required=True, type=Path, help="the agent's data directory")
    parser.add_argument("package", type=Path, help="the package (a tar file)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for the agent's answer")
    parser.add_argument("--mqtt", default=None, help="broker URL when no agent runs (default: the enrolled one)")
    parser.add_argument("--log-level", default="WARNING", help="log level of the agent this command runs")
    args = parser.parse_args(argv)
    try:
        load_identity(args.data)
    except EnrollmentError as exc:
        return _say(USAGE, f"error: {exc}")
    if not args.package.is_file():
        return _say(USAGE, f"error: {args.package} is not a file")
    inbox = args.data / INBOX
    inbox.mkdir(mode=0o700, exist_ok=True)
    dropped = inbox / f"{time.time_ns()}-{os.getpid()}.tar"
    partial = dropped.with_name("." + dropped.name + ".partial")  # not *.tar: the agent takes it once renamed
    shutil.copyfile(args.package, partial)
    partial.replace(dropped)
    deadline = time.monotonic() + args.timeout
    if take_lock(args.data) is None:
        print(f"an agent runs on {args.data}: handed the package to it", file=sys.stderr)
    else:  # no agent runs: run it (holding the lock) until it has answered
        logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

        async def answered(_: Any) -> None:
            while not result_path(dropped).exists() and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
        try:
            run_agent(args.data, args.mqtt, lock=False, until=answered, module_sandbox="auto")
        except ValueError as exc:
            return _say(USAGE, f"error: {exc}")
    result = _wait(result_path(dropped), deadline)
    if result is None:
        dropped.unlink(missing_ok=True)
        return _say(TIMEOUT, f"no answer from the agent within {args.timeout:g}s (is it running?)")
    result_path(dropped).unlink(missing_ok=True)
    return _say(int(result["code"]), result["reason"])


def _wait(path: Path, deadline: float) -> dict[str, Any] | None:
    while time.monotonic() < deadline:
        try:
            return json.loads(path.read_text())  # type: ignore[no-any-return]
        except (OSError, ValueError):  # not written yet (it is renamed into place whole)
            time.sleep(0.2)
    return None


def _say(code: int, text: str) -> int:
    print(text, file=sys.stdout if code == OK else sys.stderr)
    return code
