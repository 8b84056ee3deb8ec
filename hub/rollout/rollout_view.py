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

from hub.fleet.device_state import active_hold, bundle_state, category
from hub.fleet.targeting import parse_target
from hub.rollout import retries
from hub.rollout import rollout_states as S
from hub.rollout.rollout_plan import strategy_from_json, strategy_text
from hub.rollout.schedule import may_begin_wave, parse_windows
from hub.rollout.shadow_gates import shadow_figures, shadow_state
from hub.store import Database, loads

SETTLED = frozenset({"running", "failed", "rolled_back"})
MAX_LISTED = 100  # devices named in ``holding`` / ``not_updated``; the counts say how many in all
NAMED_IN_REASON = 10


def plan(r: dict[str, Any]) -> dict[str, Any]:
    """A rollout's plan as operators give it (strategy string, bake, gates, on failure, wave timeout)."""
    waves = strategy_from_json(loads(r["strategy"]))
    return {"strategy": strategy_text(waves), "waves": [w.label for w in waves], "bake_s": r["bake_s"],
            "gates": loads(r["gates"]), "on_failure": r["on_failure"], "wave_timeout_s": r["wave_timeout_s"],
            "approve": any(w.approve for w in waves), "window": r.get("windows") or "", "start_at": r.get("start_at"),
            "shadow_s": r.get("shadow_s") or 0.0}


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


def by_wave(devices: list[dict[str, Any]], labels: list[str]) -> list[dict[str, Any]]:
    """Per wave: its label, how many devices it moved and their buckets."""
    out = [{"wave": i + 1, "label": label, "devices": 0, "counts": {}} for i, label in enumerate(labels)]
    for d in devices:
        if d["wave"] is not None and d["wave"] <= len(out):
            w = out[d["wave"] - 1]
            w["devices"] += 1
            w["counts"][d["state"]] = w["counts"].get(d["state"], 0) + 1
    return out


def select(devices: list[dict[str, Any]], state: str = "", q: str = "", limit: int | None = None,
           cursor: str = "") -> dict[str, Any]:
    """The rollout's devices in bucket ``state`` whose id holds ``q``, one page of ``limit`` after id ``cursor``."""
    q = q.lower()
    match = [d for d in devices if (not state or d["state"] == state) and q in d["id"].lower()] if state or q else devices
    after = [d for d in match if d["id"] > cursor] if cursor else match
    shown = after if limit is None else after[:limit]
    more = limit is not None and len(after) > limit
    return {"devices": shown, "devices_total": len(match), "next_cursor": shown[-1]["id"] if more else None}


def status(db: Database, r: dict[str, Any], rev: dict[str, Any], prev: dict[str, Any] | None,
           t: float | None = None, page: dict[str, Any] | None = None) -> dict[str, Any]:
    """The view of rollout ``r`` (a ``rollouts`` row) of revision ``rev`` (from ``prev``, if any) at time ``t``;
    ``page`` (:func:`select`'s arguments) lists one filtered page of its devices instead of all."""
    t = time.time() if t is None else t
    waves = strategy_from_json(loads(r["strategy"]))
    admitted = {p["device"]: p["wave"] for p in db.query(
        "SELECT device, wave FROM rollout_devices WHERE rollout = ?", (r["id"],))}
    target = parse_target(rev["target"])
    reverted = r["state"] in (S.ROLLING_BACK, S.ROLLED_BACK, S.ABORTED, S.SUPERSEDED)
    shadowing = r["state"] == S.SHADOWING
    terminal = r["state"] in S.TERMINAL
    counts: dict[str, int] = {}
    devices = []
    digest = rev["digest"]
    # tuples, and a report decoded only if it names the bundle: this runs over the whole fleet on every poll
    retried = retries.pending_since(db, digest)  # a report before the retry went out no longer counts
    rows = db.db().execute("SELECT id, labels, online, reported, last_seen FROM devices ORDER BY id")
    for device_id, labels, online, reported, last_seen in rows:
        if device_id not in admitted and not target.matches(device_id, loads(labels, {})):
            continue
        judge = shadow_state if shadowing else bundle_state
        rep = loads(reported) if reported and digest in reported else None
        state, error = ("pending", "") if rep is None or retries.stale(rep, retried.get(device_id)) else judge(
            rep, digest)
        if device_id not in admitted:  # matched only after the last wave began: not targeted at rollout time
            bucket = "new" if r["state"] == S.SUCCEEDED or (r["everyone"] and not terminal) else (
                "not_moved" if terminal else "waiting")
        elif reverted:
            bucket = "rolled_back"
        elif shadowing:  # the candidate beside the live version: shadow_pending, shadow_installing, shadow_running, …
            bucket = "shadow_" + category(state)
        else:
            bucket = category(state)
        counts[bucket] = counts.get(bucket, 0) + 1
        devices.append({"id": device_id, "online": bool(online), "last_seen": last_seen,
                        "wave": admitted.get(device_id, -1) + 1 or None, "state": bucket, "install_state": state,
                        "error": error, "hold": active_hold(rep, t) if rep and bucket == "pending" else None})
    moved = [d for d in devices if d["wave"] is not None]
    out: dict[str, Any] = {
        "id": r["id"], "deployment": r["deployment"], "revision": r["revision"], "from_revision": r["from_revision"],
        "module": f"{rev['module_name']}:{rev['module_version']}",
        "from_module": f"{prev['module_name']}:{prev['module_version']}" if prev else None,
        "state": S.display(r["state"], r["wave"]), "phase": r["state"], "wave": r["wave"] + 1, "waves": len(waves),
        "strategy": [w.label for w in waves], "bake_s": r["bake_s"], "gates": loads(r["gates"]),
        "on_failure": r["on_failure"], "wave_timeout_s": r["wave_timeout_s"], "plan": plan(r),
        "reason": r["reason"], "last_gate": loads(r["last_gate"]), "counts": counts,
        "by_wave": by_wave(devices, [w.label for w in waves]), **select(devices, **(page or {})),
        "terminal": terminal, "created_at": r["created_at"], "created_by": r["created_by"],
        "updated_at": r["updated_at"], "shadow_s": r["shadow_s"], "shadow_started_at": r["shadow_started_at"],
        "shadow_sample_ppm": r["shadow_sample_ppm"],
    }
    if shadowing:  # what the devices measured so far (the gates judge the same figures when the period ends)
        since = r["shadow_started_at"] or r["phase_started_at"] or t
        out["shadow"] = shadow_figures(db, rev["module_name"], rev["module_version"], since,
                                       {d["id"] for d in moved})
        if r["shadow_started_at"] is not None:
            ends = r["shadow_started_at"] + r["shadow_s"]
            out |= {"shadow_ends_at": ends, "shadow_ends_in_s": round(max(0.0, ends - t), 1)}
    if r["state"] == S.INSTALLING or (shadowing and r["shadow_started_at"] is None):  # waits, at most until the timeout
        holding = sorted((d for d in moved if d["state"] not in SETTLED), key=lambda d: (d["online"], d["id"]))
        deadline = (r["phase_started_at"] or t) + r["wave_timeout_s"]
        out |= {"holding": [_brief(d) for d in holding[:MAX_LISTED]], "holding_count": len(holding),
                "wave_timeout_at": deadline, "wave_timeout_in_s": round(max(0.0, deadline - t), 1)}
    elif r["state"] == S.SCHEDULED:  # when the wave begins (None: no window ever opens)
        out["begins_at"] = may_begin_wave(t, r.get("start_at"), parse_windows(r.get("windows"))).at
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
    return {k: d[k] for k in ("id", "online", "last_seen", "state", "install_state", "error", "hold")}


def listing(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"id": r["id"], "deployment": r["deployment"], "revision": r["revision"],
             "from_revision": r["from_revision"], "state": S.display(r["state"], r["wave"]), "phase": r["state"],
             "reason": r["reason"], "created_at": r["created_at"], "created_by": r["created_by"],
             "updated_at": r["updated_at"]} for r in rows]
