"""Quality gates of a shadow phase: what the candidate answered on the live inputs, as the devices measured it.

Each device running a shadow sends, per telemetry interval, a ``ShadowPoint`` (protocol): how many live
inferences it mirrored or dropped, how many rows both versions answered and how many of those differ,
the candidate's errors and latency beside the live version's, and the predicted classes of each. The
hub stores them in ``shadow_points``; :func:`evaluate_shadow` judges the phase from the rows of the
devices the rollout moved, sent since the shadow period began.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Protocol

import numpy as np

from hub.monitoring.drift import psi
from hub.rollout.gates import Check, GateResult, install_check
from hub.rollout.rollout_plan import Gates
from hub.store import Database, loads


def shadow_state(reported: dict[str, Any] | None, bundle: str) -> tuple[str, str]:
    """What a device reports for the shadow candidate ``bundle``: (state, error); ("pending", "") until it does."""
    for m in (reported or {}).get("modules", []):
        s = m.get("shadow") or {}
        if s.get("bundle") == bundle:
            return s.get("state", "pending"), s.get("error", "")
    return "pending", ""


def class_psi(live: Counter[str], shadow: Counter[str]) -> float | None:
    """PSI between two distributions of predicted classes (None without any)."""
    cats = sorted(set(live) | set(shadow))
    if not cats or not sum(live.values()) or not sum(shadow.values()):
        return None
    return psi(np.array([live[c] for c in cats], dtype=float), np.array([shadow[c] for c in cats], dtype=float))


def shadow_figures(db: Database, module: str, version: int, since: float, devices: set[str] | None = None
                   ) -> dict[str, Any]:
    """The candidate's comparison summed over ``devices`` (all when None) from ``since`` on."""
    rows = [r for r in db.query(
        "SELECT device, mirrored, dropped, compared, disagreements, errors, p95, live_p95, live_classes,"
        " shadow_classes FROM shadow_points WHERE module = ? AND version = ? AND ts >= ?", (module, version, since))
        if devices is None or r["device"] in devices]
    live, shadow = Counter[str](), Counter[str]()
    for r in rows:
        live.update(loads(r["live_classes"], {}))
        shadow.update(loads(r["shadow_classes"], {}))
    p95 = [r["p95"] for r in rows if r["p95"] > 0]
    live_p95 = [r["live_p95"] for r in rows if r["live_p95"] > 0]
    compared = sum(r["compared"] for r in rows)
    disagreements = sum(r["disagreements"] for r in rows)
    mirrored = sum(r["mirrored"] for r in rows)
    errors = sum(r["errors"] for r in rows)
    return {
        "devices_reporting": len({r["device"] for r in rows if r["mirrored"] or r["compared"] or r["errors"]}),
        "mirrored": mirrored, "dropped": sum(r["dropped"] for r in rows), "compared": compared,
        "disagreements": disagreements, "disagreement": disagreements / compared if compared else None,
        "errors": errors, "error_rate": errors / mirrored if mirrored else None,
        "p95_ms": sum(p95) / len(p95) if p95 else None, "live_p95_ms": sum(live_p95) / len(live_p95) if live_p95 else None,
        "prediction_drift": class_psi(live, shadow), "live_classes": dict(live), "shadow_classes": dict(shadow),
    }


def evaluate_shadow(db: Database, gates: Gates, states: dict[str, tuple[str, str]], module: str, version: int,
                    since: float, live_version: int, quality: QualitySource | None = None
                    ) -> tuple[GateResult, dict[str, Any]]:
    """Every configured gate over the shadow devices (``states``: device -> the candidate's state), and the figures.

    A quality gate without evidence fails: a shadow that compared nothing has not shown the candidate agrees.
    """
    result = GateResult()
    if (c := install_check(gates, states)) is not None:
        result.checks.append(Check(c.name, c.value, c.limit, c.ok, "shadow candidate: " + c.note))
    f = shadow_figures(db, module, version, since, set(states))
    n = len(states)
    if gates.min_reporting is not None and n:
        share = f["devices_reporting"] / n
        result.checks.append(Check("min_reporting", share, gates.min_reporting, share >= gates.min_reporting,
                                   f"{f['devices_reporting']} of {n} devices compared"))
    if gates.max_disagreement is not None:
        v = f["disagreement"]
        result.checks.append(Check("max_disagreement", v, gates.max_disagreement,
                                   v is not None and v <= gates.max_disagreement,
                                   f"{f['disagreements']} of {f['compared']} mirrored predictions differ"
                                   f" on {f['devices_reporting']} device(s)" if f["compared"]
                                   else "no mirrored input was compared"))
    if gates.max_error_rate is not None:
        v = f["error_rate"]
        result.checks.append(Check("max_error_rate", v, gates.max_error_rate, v is None or v <= gates.max_error_rate,
                                   f"{f['errors']} errors in {f['mirrored']} mirrored inferences"))
    if gates.max_p95_increase is not None:
        new, base = f["p95_ms"], f["live_p95_ms"]
        if new is not None and base:
            inc = new / base - 1.0
            result.checks.append(Check("max_p95_increase", inc, gates.max_p95_increase, inc <= gates.max_p95_increase,
                                       f"p95 {new:.3g} ms vs live {base:.3g} ms on the same inputs"))
        else:
            result.checks.append(Check("max_p95_increase", None, gates.max_p95_increase, True,
                                       "no latency data for one of the versions"))
    if gates.max_prediction_drift is not None:
        v = f["prediction_drift"]
        result.checks.append(Check("max_prediction_drift", v, gates.max_prediction_drift,
                                   v is not None and v <= gates.max_prediction_drift,
                                   "PSI of predicted classes, candidate vs live on the same inputs" if v is not None
                                   else "no classes predicted"))
    result.checks += quality_checks(quality, gates, module, version, since, set(states), shadow_of=live_version)
    return result, f


class QualitySource(Protocol):
    """hub/monitoring/labels.py's ``Quality``: input drift against the baseline, and accuracy from labels."""

    labels: Any

    def input_drift(self, module: str, data_version: int, baseline_version: int, since: float,
                    devices: set[str]) -> tuple[float | None, str]: ...


def quality_checks(quality: QualitySource | None, gates: Gates, module: str, version: int, since: float,
                   devices: set[str], *, shadow_of: int | None = None) -> list[Check]:
    """``max_input_drift`` and ``min_accuracy`` (and, on waves, a note for the shadow-only gates).

    On a shadow (``shadow_of``: the live version serving the inputs) input drift is the live inputs against the
    candidate's baseline; accuracy is not measured there (labels join served predictions): the waves check it.
    """
    out: list[Check] = []
    if gates.max_input_drift is not None:
        v, note = (None, "no monitoring") if quality is None else quality.input_drift(
            module, shadow_of or version, version, since, devices)
        out.append(Check("max_input_drift", v, gates.max_input_drift, v is not None and v <= gates.max_input_drift,
                         note))
    if gates.min_accuracy is not None:
        if shadow_of is not None:
            out.append(Check("min_accuracy", None, gates.min_accuracy, True,
                             "not measured in a shadow (labels join served predictions): checked on the waves"))
        else:
            acc = quality.labels.accuracy(module, version, since, devices) if quality is not None else {}
            v = acc.get("accuracy")
            out.append(Check("min_accuracy", v, gates.min_accuracy, v is not None and v >= gates.min_accuracy,
                             f"{acc.get('correct', 0)} of {acc.get('labelled', 0)} labelled predictions right"
                             if v is not None else "no labelled predictions yet"))
    if shadow_of is None:
        for name in ("max_disagreement", "max_prediction_drift"):
            limit = getattr(gates, name)
            if limit is not None:
                out.append(Check(name, None, limit, True, "measured in a shadow phase (--shadow) only"))
    return out
