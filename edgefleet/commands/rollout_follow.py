"""``rollout status --wait`` / ``--watch``: follow one rollout to its end, for people and for CI.

On a terminal: a live view. Otherwise: one plain line per change (and every ``HEARTBEAT_S`` while
nothing changes), or with ``--json`` one JSON object per line (NDJSON), the last one carrying
``outcome`` and ``exit``. The exit code says how it ended:

    0 succeeded   3 rolled back   4 halted, aborted or superseded   5 timed out (still running)
    1 the hub could not be asked  2 bad usage
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

from edgefleet.client import HubClient, HubError

EXIT_SUCCEEDED = 0
EXIT_ROLLED_BACK = 3
EXIT_FAILED = 4
EXIT_TIMEOUT = 5
HEARTBEAT_S = 30.0

OUTCOMES = {"succeeded": EXIT_SUCCEEDED, "rolled_back": EXIT_ROLLED_BACK, "halted": EXIT_FAILED,
            "aborted": EXIT_FAILED, "superseded": EXIT_FAILED}


def outcome(st: dict[str, Any]) -> int | None:
    """The exit code once the rollout has ended (halted counts: it waits for a person), else None."""
    code = OUTCOMES.get(st["phase"])
    if code is None and st.get("terminal"):
        return EXIT_FAILED
    return code


def summary(st: dict[str, Any]) -> dict[str, Any]:
    """One NDJSON record: the status without its per-device list."""
    keep = ("deployment", "id", "revision", "module", "from_module", "state", "phase", "wave", "waves", "counts",
            "reason", "terminal")
    return {"ts": round(time.time(), 3), **{k: st.get(k) for k in keep}}


def shadow_line(f: dict[str, Any], ends_in: float | None = None) -> str:
    """A shadow phase's figures in one line (``rollout status``)."""
    rate = f.get("disagreement")
    return (f"shadow: {f['compared']} predictions compared on {f['devices_reporting']} device(s),"
            f" disagreement {'n/a' if rate is None else f'{rate:.1%}'}, {f['errors']} errors, {f['dropped']} dropped"
            + ("" if f.get("prediction_drift") is None else f", prediction drift (PSI) {f['prediction_drift']:.3g}")
            + ("" if ends_in is None else f"; ends in {ends_in:.0f}s"))


def plain(st: dict[str, Any]) -> str:
    counts = " ".join(f"{k}={v}" for k, v in sorted(st["counts"].items())) or "no devices"
    origin = f" from {st['from_module']}" if st.get("from_module") else ""
    reason = f"  reason: {st['reason']}" if st.get("reason") else ""
    shadow = f"  {shadow_line(st['shadow'], st.get('shadow_ends_in_s'))}" if st.get("shadow") else ""
    held = "".join(f"  {d['id']} {d['hold']['text']}" for d in held_devices(st)[:5])
    return (f"{datetime.now().strftime('%H:%M:%S')} {st['deployment']} rollout {st['id']} revision {st['revision']} "
            f"({st['module']}{origin}): {st['state']}  {counts}{reason}{shadow}{held}")


def held_devices(st: dict[str, Any]) -> list[dict[str, Any]]:
    """The devices holding the wave because an application on them defers the update (protocol §5 ``hold``)."""
    return [d for d in st.get("holding") or [] if d.get("hold")]


def ending(st: dict[str, Any], code: int, waited: float) -> str:
    if code == EXIT_TIMEOUT:
        return f"timed out after {waited:.0f}s: rollout {st['id']} of {st['deployment']} is still {st['state']} (exit 5)"
    words = {EXIT_SUCCEEDED: "succeeded", EXIT_ROLLED_BACK: "rolled back", EXIT_FAILED: st["phase"]}[code]
    why = f": {st['reason']}" if st.get("reason") and code else ""
    return f"rollout {st['id']} of {st['deployment']} {words}{why} (exit {code})"


def follow(c: HubClient, name: str, rollout_id: int | None, *, interval: float, timeout: float | None, mode: str,
           live: Callable[[dict[str, Any]], Any] | None = None) -> int:
    """Poll until the rollout ends or ``timeout`` passes; print per ``mode`` (live, plain, json); return the code."""
    start = time.monotonic()
    st = c.get(f"/api/v1/rollouts/{name}", id=rollout_id)
    rollout_id = st["id"]  # follow this one rollout, even if a newer one supersedes it
    last_key: Any = None
    last_print = 0.0
    view = None
    if mode == "live":
        from rich.console import Console
        from rich.live import Live

        view = Live(live(st) if live else "", console=Console(), refresh_per_second=4)
        view.start()
    try:
        while True:
            code = outcome(st)
            waited = time.monotonic() - start
            if code is None and timeout is not None and waited >= timeout:
                code = EXIT_TIMEOUT
            key = (st["state"], tuple(sorted(st["counts"].items())), st.get("reason"),
                   tuple(d["id"] for d in held_devices(st)))
            if mode == "live" and view is not None and live is not None:
                view.update(live(st))
            elif key != last_key or code is not None or time.monotonic() - last_print >= HEARTBEAT_S:
                if mode == "json":
                    record = summary(st)
                    if code is not None:
                        record |= {"outcome": _word(code), "exit": code}
                    print(json.dumps(record), flush=True)
                elif key != last_key or time.monotonic() - last_print >= HEARTBEAT_S:
                    print(plain(st), flush=True)
                last_key, last_print = key, time.monotonic()
            if code is not None:
                if mode != "json":
                    print(ending(st, code, waited), file=sys.stderr if mode == "live" else sys.stdout, flush=True)
                return code
            time.sleep(min(interval, max(0.05, (timeout - waited) if timeout is not None else interval)))
            st = _poll(c, name, rollout_id, st, mode)
    finally:
        if view is not None:
            view.stop()


def _poll(c: HubClient, name: str, rollout_id: int, last: dict[str, Any], mode: str) -> dict[str, Any]:
    """The rollout's status now; while the hub cannot be reached (a restart) say so and keep the last one:
    the rollout goes on in the hub, and the timeout still bounds the wait."""
    try:
        return c.get(f"/api/v1/rollouts/{name}", id=rollout_id)
    except HubError as exc:
        if not str(exc).startswith("cannot reach"):
            raise
        print(f"{datetime.now().strftime('%H:%M:%S')} {exc}; still waiting", file=sys.stderr, flush=True)
        return last


def _word(code: int) -> str:
    return {EXIT_SUCCEEDED: "succeeded", EXIT_ROLLED_BACK: "rolled_back", EXIT_FAILED: "failed",
            EXIT_TIMEOUT: "timeout"}[code]
