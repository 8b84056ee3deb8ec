"""A device's state as operators see it, from its desired modules and what it reports (pure: no I/O).

The hub stores the summary (:func:`device_state`) in ``devices.state`` whenever either side changes
(the director writing a desired state, the bridge storing a reported one), so the device list can
filter and count by state in SQL instead of decoding every device's JSON on every request.
"""

from __future__ import annotations

import datetime
import json
from typing import Any

from protocol.messages import config_digest

INSTALLING = {"downloading", "verifying", "staged", "activating", "health_check", "baking"}
FAILED = {"failed", "rolled_back", "rolling_back"}
STATES = ("idle", "pending", "installing", "running", "failed")  # what summarize() answers

# the progress buckets operators see (rollout status, deployment counts), from the agent's install states
CATEGORY = {"pending": "pending", "downloading": "downloading", "verifying": "installing", "staged": "installing",
            "activating": "installing", "health_check": "installing", "baking": "installing", "running": "running",
            "failed": "failed",
            "rolling_back": "rolled_back", "rolled_back": "rolled_back"}


def category(state: str) -> str:
    return CATEGORY.get(state, state)


def bundle_state(reported: dict[str, Any] | None, bundle: str) -> tuple[str, str]:
    """What a device reports for ``bundle``: (state, error); ("pending", "") if it does not mention it."""
    for m in (reported or {}).get("modules", []):
        if m.get("bundle") == bundle:
            return m.get("state", "pending"), m.get("error", "")
    return "pending", ""


def module_views(desired: list[dict[str, Any]], reported: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Each desired module with the state the device reports for that bundle ("pending" until it does)."""
    reports = {m["name"]: m for m in (reported or {}).get("modules", [])}
    views = []
    for d in desired:
        r = reports.pop(d["name"], None)
        same = r is not None and r["bundle"] == d["bundle"]
        views.append({"name": d["name"], "version": d["version"], "bundle": d["bundle"], "deployment": d["deployment"],
                      "state": r["state"] if same else "pending", "error": r.get("error", "") if same else "",
                      "shadow": (r.get("shadow") if same and r else None),
                      **_applied(r if same else None, d.get("config", {}))})
    # modules the device still runs or reports but no longer should
    views += [{"name": r["name"], "version": r["version"], "bundle": r["bundle"], "deployment": "",
               "state": r["state"], "error": r.get("error", ""), **_applied(r, None)} for r in reports.values()]
    return views


def _applied(report: dict[str, Any] | None, desired_config: dict[str, Any] | None) -> dict[str, Any]:
    """The configuration desired (values and digest), the digest the device reports applied, and the accelerator
    it reports: ``config_applied`` equal to ``config_digest`` once the device runs the desired configuration."""
    out: dict[str, Any] = {"config_applied": (report or {}).get("config", ""),
                           "accelerator": (report or {}).get("accelerator", "")}
    if desired_config is not None:
        out |= {"config": desired_config, "config_digest": config_digest(desired_config)}
    return out


def summarize(desired: list[dict[str, Any]], views: list[dict[str, Any]]) -> str:
    if not desired:
        return "idle"
    states = [v["state"] for v in views if v["deployment"]]
    if any(s in FAILED for s in states):
        return "failed"
    if all(s == "running" for s in states):
        return "running"
    if any(s in INSTALLING for s in states):
        return "installing"
    return "pending"


def device_state(desired_json: str | None, reported_json: str | None) -> str:
    """The stored summary of a ``devices`` row's ``desired`` and ``reported`` columns (JSON text or NULL)."""
    desired = json.loads(desired_json) if desired_json else []
    reported = json.loads(reported_json) if reported_json else None
    return summarize(desired, module_views(desired, reported))


def active_hold(reported: dict[str, Any] | None, now: float) -> dict[str, Any] | None:
    """The application hold a device reported (protocol §5 ``ReportedState.hold``) while it lasts, with the line
    operators read: ``held by app until 14:05: checkout in progress`` (UTC); None when there is none or it ended."""
    hold = (reported or {}).get("hold")
    if not isinstance(hold, dict) or not isinstance(hold.get("until"), (int, float)) or hold["until"] <= now:
        return None
    until = datetime.datetime.fromtimestamp(hold["until"], datetime.UTC).strftime("%H:%M")
    reason = str(hold.get("reason") or "no reason given")
    return {"since": hold.get("since"), "until": hold["until"], "reason": hold.get("reason") or "",
            "text": f"held by app until {until}: {reason}"}
