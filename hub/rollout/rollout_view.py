"""What a rollout shows operators: progress per device, who holds a wave and until when, and how it ended.

Device buckets (``counts``): a device the rollout moved is counted by its install state
(``pending``, ``downloading``, ``installing``, ``running``, ``failed``, ``rolled_back``); one it has
not moved is ``waiting`` (for a later wave), ``new`` (it matched the target only after the last wave
began, e.g. enrolled later: not targeted at rollout time; the deployment's current revision reaches
it directly) or ``not_moved`` (the rollout ended before its wave).
"""

from __future__ import annotations

import time
from typing import Any

from hub.fleet.devices import bundle_state, category
from hub.fleet.targeting import parse_target
from hub.rollout import rollout_states as S
from hub.rollout.rollout_plan import strategy_from_json, strategy_text
from hub.store import Database, loads

SETTLED = frozenset({"running", "failed", "rolled_back"})
MAX_LISTED = 100  # devices named in ``holding`` / ``not_updated``; the counts say how many in all
NAMED_IN_REASON = 10


def plan(r: dict[str, Any]) -> dict[str, Any]:
    """A rollout's plan as operators give it (strategy string, bake, gates, on failure, wave timeout)."""
    waves = strategy_from_json(loads(r["strategy"]))
    return {"strategy": strategy_text(waves), "waves": [w.label for w in waves], "bake_s": r["bake_s"],
            "gates": loads(r["gates"]), "on_failure": r["on_failure"], "wave_timeout_s": r["wave_timeout_s"]}


def not_updated_reason(devices: list[dict[str, Any]]) -> str:
    """``succeeded`` or ``succeeded with 3 not updated (2 offline, 1 failed): a, b, c``, from the moved devices
    (``id``, ``online``, ``state``: the install bucket) when the last gate passed."""
    left = [d for d in devices if d["state"] != "running"]
    if not left:
        return "succeeded"
    why: dict[str, int] = {}
    for d in left:
        key = "offline" if not d["online"] and d["state"] not in ("failed", "rolled_back") else d["state"]
        why[key] = why.get(key, 0) + 1
    names = ", ".join(d["id"] for d in left[:NAMED_IN_REASON]) + (
        f" and {len(left) - NAMED_IN_REASON} more" if len(left) > NAMED_IN_REASON else "")
    return (f"succeeded with {len(left)} not updated ({', '.join(f'{n} {k}' for k, n in sorted(why.items()))}): "
            f"{names}")


def status(db: Database, r: dict[str, Any], rev: dict[str, Any], prev: dict[str, Any] | None,
           t: float | None = None) -> dict[str, Any]:
    """The view of rollout ``r`` (a ``rollouts`` row) of revision ``rev`` (from ``prev``, if any) at time ``t``."""
    t = time.time() if t is None else t
    waves = strategy_from_json(loads(r["strategy"]))
    admitted = {p["device"]: p["wave"] for p in db.query(
        "SELECT device, wave FROM rollout_devices WHERE rollout = ?", (r["id"],))}
    target = parse_target(rev["target"])
    reverted = r["state"] in (S.ROLLING_BACK, S.ROLLED_BACK, S.ABORTED, S.SUPERSEDED)
    terminal = r["state"] in S.TERMINAL
    counts: dict[str, int] = {}
    devices = []
    for d in db.query("SELECT id, labels, online, reported, last_seen FROM devices ORDER BY id"):
        if d["id"] not in admitted and not target.matches(d["id"], loads(d["labels"], {})):
            continue
        state, error = bundle_state(loads(d["reported"]), rev["digest"])
        if d["id"] not in admitted:  # matched only after the last wave began: not targeted at rollout time
            bucket = "new" if r["state"] == S.SUCCEEDED or (r["everyone"] and not terminal) else (
                "not_moved" if terminal else "waiting")
        elif reverted:
            bucket = "rolled_back"
        else:
            bucket = category(state)
        counts[bucket] = counts.get(bucket, 0) + 1
        devices.append({"id": d["id"], "online": bool(d["online"]), "last_seen": d["last_seen"],
                        "wave": admitted.get(d["id"], -1) + 1 or None, "state": bucket, "install_state": state,
                        "error": error})
    moved = [d for d in devices if d["wave"] is not None]
    out: dict[str, Any] = {
        "id": r["id"], "deployment": r["deployment"], "revision": r["revision"], "from_revision": r["from_revision"],
        "module": f"{rev['module_name']}:{rev['module_version']}",
        "from_module": f"{prev['module_name']}:{prev['module_version']}" if prev else None,
        "state": S.display(r["state"], r["wave"]), "phase": r["state"], "wave": r["wave"] + 1, "waves": len(waves),
        "strategy": [w.label for w in waves], "bake_s": r["bake_s"], "gates": loads(r["gates"]),
        "on_failure": r["on_failure"], "wave_timeout_s": r["wave_timeout_s"], "plan": plan(r),
        "reason": r["reason"], "last_gate": loads(r["last_gate"]), "counts": counts, "devices": devices,
        "terminal": terminal, "created_at": r["created_at"], "created_by": r["created_by"],
        "updated_at": r["updated_at"],
    }
    if r["state"] == S.INSTALLING:  # the wave waits for these, at most until the timeout
        holding = sorted((d for d in moved if d["state"] not in SETTLED), key=lambda d: (d["online"], d["id"]))
        deadline = (r["phase_started_at"] or t) + r["wave_timeout_s"]
        out |= {"holding": [_brief(d) for d in holding[:MAX_LISTED]], "holding_count": len(holding),
                "wave_timeout_at": deadline, "wave_timeout_in_s": round(max(0.0, deadline - t), 1)}
    elif r["state"] == S.BAKING:
        ends = (r["phase_started_at"] or t) + r["bake_s"]
        out |= {"bake_ends_at": ends, "bake_ends_in_s": round(max(0.0, ends - t), 1)}
    if r["state"] == S.SUCCEEDED:
        left = [d for d in moved if d["state"] != "running"]
        out |= {"outcome": r["reason"] or "succeeded", "not_updated": [_brief(d) for d in left[:MAX_LISTED]],
                "not_updated_count": len(left)}
    elif terminal:
        out["outcome"] = f"{r['state']}: {r['reason']}" if r["reason"] else r["state"]
    return out


def _brief(d: dict[str, Any]) -> dict[str, Any]:
    return {k: d[k] for k in ("id", "online", "last_seen", "state", "install_state", "error")}


def listing(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"id": r["id"], "deployment": r["deployment"], "revision": r["revision"],
             "from_revision": r["from_revision"], "state": S.display(r["state"], r["wave"]), "phase": r["state"],
             "reason": r["reason"], "created_at": r["created_at"], "created_by": r["created_by"],
             "updated_at": r["updated_at"]} for r in rows]
