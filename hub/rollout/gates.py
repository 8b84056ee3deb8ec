"""Health gates: the checks between rollout waves, read from what devices report and their live telemetry."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hub.fleet.device_state import FAILED
from hub.monitoring.timeseries import SeriesFilter, totals
from hub.rollout.rollout_plan import Gates
from hub.store import Database

BASELINE_WINDOW_S = 3600.0  # the previous version's latency is taken from the hour before the rollout began


@dataclass
class Check:
    name: str
    value: float | None
    limit: float
    ok: bool
    note: str = ""


@dataclass
class GateResult:
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def reason(self) -> str:
        return "; ".join(f"{c.name} {_fmt(c.value)} exceeds {_fmt(c.limit)}" + (f" ({c.note})" if c.note else "")
                         if c.name.startswith("max") else
                         f"{c.name} {_fmt(c.value)} below {_fmt(c.limit)}" + (f" ({c.note})" if c.note else "")
                         for c in self.checks if not c.ok)

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "checks": [c.__dict__ for c in self.checks]}


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3g}"


def install_check(gates: Gates, states: dict[str, tuple[str, str]]) -> Check | None:
    """Share of the moved devices whose install of the new bundle failed; ``states``: device -> (state, error)."""
    if gates.max_install_failure_rate is None or not states:
        return None
    failed = {d: e for d, (s, e) in states.items() if s in FAILED}
    rate = len(failed) / len(states)
    note = f"{len(failed)} of {len(states)} devices"
    if failed:
        first = sorted(failed)[0]
        note += f"; {first}: {failed[first] or 'failed'}"
    return Check("max_install_failure_rate", rate, gates.max_install_failure_rate,
                 rate <= gates.max_install_failure_rate, note)


def _mean_p95(db: Database, module: str, version: int, since: float) -> float | None:
    """Mean of the reported p95s of a module version since ``since`` (one per telemetry point), None without any."""
    sums = totals(db, SeriesFilter(module=module, version=version), since).values()
    points = sum(s[0] for s in sums)
    return sum(s[6] for s in sums) / points if points else None


def evaluate(db: Database, gates: Gates, states: dict[str, tuple[str, str]], module: str, version: int,
             since: float, previous_version: int | None, rollout_started: float) -> GateResult:
    """Every configured gate over the moved devices (``states``), telemetry from ``since`` on."""
    result = GateResult()
    if (c := install_check(gates, states)) is not None:
        result.checks.append(c)
    rows = [{"device": device, "n": int(s[1]), "errors": int(s[2]), "p95": s[6] / s[0]}
            for (_, device), s in totals(db, SeriesFilter(module=module, version=version), since).items()
            if device in states and s[0] > 0]
    if gates.min_reporting is not None and states:
        share = len(rows) / len(states)
        result.checks.append(Check("min_reporting", share, gates.min_reporting, share >= gates.min_reporting,
                                   f"{len(rows)} of {len(states)} devices sent telemetry"))
    n = sum(r["n"] or 0 for r in rows)
    if gates.max_error_rate is not None:
        rate = (sum(r["errors"] or 0 for r in rows) / n) if n else None
        result.checks.append(Check("max_error_rate", rate, gates.max_error_rate,
                                   rate is None or rate <= gates.max_error_rate,
                                   f"{n} inferences" if n else "no inferences yet"))
    if gates.max_p95_increase is not None:
        new = [r["p95"] for r in rows if r["p95"] is not None]
        base = _mean_p95(db, module, previous_version, rollout_started - BASELINE_WINDOW_S) if previous_version else None
        if new and base:
            increase = sum(new) / len(new) / base - 1.0
            result.checks.append(Check("max_p95_increase", increase, gates.max_p95_increase,
                                       increase <= gates.max_p95_increase,
                                       f"p95 {sum(new) / len(new):.3g} ms vs {base:.3g} ms"))
        else:  # nothing to compare: not evidence of harm, but say so
            result.checks.append(Check("max_p95_increase", None, gates.max_p95_increase, True,
                                       "no latency data for one of the versions"))
    return result
