"""Endpoint canaries that move their own traffic weight: up a ladder of steps while the gates pass, to 0 when
they fail.

``POST /api/v1/endpoints/NAME/canary {"module": "m:3", "steps": [5, 25, 50, 100], "interval_s": 60,
"gates": {"max_error_rate": 0.01, "max_p95_increase": 0.2}}``: the candidate (a version the endpoint
already holds, or deployed now at the first step) gets ``steps[0]`` % of requests; every ``interval_s`` its
telemetry since the step began (the gateway's per-version counts, ``endpoint:NAME``) is judged by the
rollout gates' rules (``max_error_rate``, ``max_p95_increase`` against the other versions on the same
endpoint in the same window, ``min_reporting`` unused); at least ``min_inferences`` answers are needed
before a step may pass. Passing moves to the next step (100: the candidate takes all traffic, done);
failing sets its weight to 0 (it stops serving) with the reason. The plan lives in ``endpoint_canaries``
and the endpoint monitor's loop drives it, so a hub restart carries on.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from hub.errors import Invalid, NotFound
from hub.monitoring.timeseries import SeriesFilter, totals
from hub.registry.bundles import parse_ref
from hub.rollout.gates import Check, GateResult
from hub.rollout.rollout_plan import Gates
from hub.store import Database, dumps, loads, now

if TYPE_CHECKING:
    from hub.endpoints.manager import EndpointManager

log = logging.getLogger("edgefleet.hub.autocanary")


def decide(elapsed: float, interval_s: float, inferences: int, min_inferences: int, result: GateResult) -> str:
    """``fail`` as soon as enough answers break a gate; ``step`` once the interval passed with enough answers and
    every gate holds; else ``wait``. Pure."""
    if inferences >= min_inferences and not result.ok:
        return "fail"
    if elapsed >= interval_s and inferences >= min_inferences:
        return "step"
    return "wait"


def judge(db: Database, endpoint: str, module: str, version: int, others: list[tuple[str, int]], gates: Gates,
          since: float) -> tuple[GateResult, int]:
    """The candidate's gates over the endpoint's telemetry since ``since``, and how many answers it gave."""
    source = f"endpoint:{endpoint}"
    mine = totals(db, SeriesFilter(device=source, module=module, version=version), since)
    points, n, errors = (sum(s[0] for s in mine.values()), int(sum(s[1] for s in mine.values())),
                         int(sum(s[2] for s in mine.values())))
    p95 = sum(s[6] for s in mine.values()) / points if points else None
    result = GateResult()
    if gates.max_error_rate is not None:
        rate = errors / n if n else None
        result.checks.append(Check("max_error_rate", rate, gates.max_error_rate,
                                   rate is None or rate <= gates.max_error_rate, f"{errors} errors in {n} requests"))
    if gates.max_p95_increase is not None:
        base = [s for m, v in others for s in totals(db, SeriesFilter(device=source, module=m, version=v),
                                                     since).values()]
        base_points = sum(s[0] for s in base)
        ref = sum(s[6] for s in base) / base_points if base_points else None
        if p95 is not None and ref:
            inc = p95 / ref - 1.0
            result.checks.append(Check("max_p95_increase", inc, gates.max_p95_increase, inc <= gates.max_p95_increase,
                                       f"p95 {p95:.3g} ms vs {ref:.3g} ms"))
    return result, n


class AutoCanaries:
    def __init__(self, manager: EndpointManager) -> None:
        self.m, self.db = manager, manager.db

    def start(self, name: str, module: str, steps: list[float], interval_s: float, gates: dict[str, Any] | None,
              min_inferences: int = 20) -> dict[str, Any]:
        if not steps or any(not 0 < s <= 100 for s in steps) or steps != sorted(steps):
            raise Invalid("steps are growing percentages in (0, 100], e.g. [5, 25, 50, 100]")
        if steps[-1] != 100:
            steps = [*steps, 100.0]
        gate_set = Gates.from_json({"max_install_failure_rate": None, **(gates or {})})
        module_name, version = parse_ref(module)
        label = f"{module_name}:{version}"
        labels = {v["module"] for v in self.m._row(name)["versions"]}
        if label not in labels:
            self.m.deploy(name, label, traffic=steps[0])
        else:
            self._weights(name, label, steps[0])
        t = now()
        with self.db.transaction() as tx:
            tx.execute("INSERT INTO endpoint_canaries (endpoint, module, steps, step, interval_s, gates, min_inferences,"
                       " step_started_at, state, reason, updated_at) VALUES (?,?,?,0,?,?,?,?,'running','',?)"
                       " ON CONFLICT (endpoint) DO UPDATE SET module = excluded.module, steps = excluded.steps, step = 0,"
                       " interval_s = excluded.interval_s, gates = excluded.gates,"
                       " min_inferences = excluded.min_inferences, step_started_at = excluded.step_started_at,"
                       " state = 'running', reason = '', updated_at = excluded.updated_at",
                       (name, label, dumps(steps), interval_s, dumps(gate_set.to_json()), min_inferences, t, t))
        return self.get(name)

    def get(self, name: str) -> dict[str, Any]:
        row = self.db.one("SELECT * FROM endpoint_canaries WHERE endpoint = ?", (name,))
        if row is None:
            raise NotFound(f"endpoint {name!r} has no canary")
        steps = loads(row["steps"])
        return {"endpoint": name, "module": row["module"], "steps": steps, "step": row["step"] + 1,
                "weight": steps[row["step"]], "interval_s": row["interval_s"], "gates": loads(row["gates"]),
                "min_inferences": row["min_inferences"], "state": row["state"], "reason": row["reason"],
                "last_gate": loads(row["last_gate"]) if row.get("last_gate") else None}

    def tick(self) -> None:
        for row in self.db.query("SELECT * FROM endpoint_canaries WHERE state = 'running'"):
            try:
                self._step(row)
            except Exception:
                log.exception("canary of endpoint %s: tick failed", row["endpoint"])

    def _step(self, row: dict[str, Any]) -> None:
        name, label = row["endpoint"], row["module"]
        module, version = parse_ref(label)
        others = [parse_ref(v["module"]) for v in self.m._row(name)["versions"] if v["module"] != label]
        result, n = judge(self.db, name, module, version, others, Gates.from_json(loads(row["gates"])),
                          row["step_started_at"])
        steps, t = loads(row["steps"]), now()
        action = decide(t - row["step_started_at"], row["interval_s"], n, row["min_inferences"], result)
        if action == "wait":
            return
        if action == "fail":
            self._weights(name, label, 0.0)
            self._save(name, row["step"], "failed", f"step {row['step'] + 1} ({steps[row['step']]:g}%) gate failed:"
                       f" {result.reason}; the canary's weight is 0", result, t)
            log.warning("canary %s of endpoint %s failed: %s", label, name, result.reason)
            return
        nxt = row["step"] + 1
        if nxt >= len(steps):
            self._save(name, row["step"], "succeeded", "", result, t)
            return
        self._weights(name, label, steps[nxt])
        self._save(name, nxt, "succeeded" if steps[nxt] >= 100 else "running", "", result, t)

    def _weights(self, name: str, label: str, weight: float) -> None:
        """``label`` gets ``weight`` %; the other versions share the rest in their current proportions."""
        versions = self.m._row(name)["versions"]
        others = [v for v in versions if v["module"] != label]
        rest = sum(v["weight"] for v in others) or 1.0
        weights = {v["module"]: v["weight"] * (100.0 - weight) / rest for v in others} | {label: weight}
        if weight == 0 and not others:
            raise Invalid("the canary is the endpoint's only version: nothing else would serve")
        self.m.set_traffic(name, weights)

    def _save(self, name: str, step: int, state: str, reason: str, result: GateResult, t: float) -> None:
        with self.db.transaction() as tx:
            tx.execute("UPDATE endpoint_canaries SET step = ?, state = ?, reason = ?, last_gate = ?,"
                       " step_started_at = ?, updated_at = ? WHERE endpoint = ?",
                       (step, state, reason, dumps(result.to_json()), t, t, name))
