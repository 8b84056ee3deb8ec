"""Ground truth: labels for earlier predictions, joined to the sampled records, and accuracy per version over time.

A label names a sampled record by its sample id (``device/request-id`` when the device's request carried
an id, else ``device/seq/idx``: hub/ingest/writer.py). Labels are stored apart (``labels``) and joined
when read, so a label may arrive before or after its record, and a later label corrects an earlier one.

What a record predicted: its first output's row ``i``: the argmax for several columns, the class for one
integer (a label output), 0/1 for one score in 0..1 (the same side of 0.5), else the value itself
(regression). A classification row is right when the prediction equals the label; a regression row
contributes its absolute error. ``accuracy`` is the share of right classification rows, ``mae`` the mean
absolute error of regression rows.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from hub.audit import record
from hub.bounds import check_api_name
from hub.errors import Invalid
from hub.monitoring.abtest import Arm
from hub.monitoring.drift import compare
from hub.monitoring.reports import DriftReports, Target
from hub.monitoring.timeseries import SeriesFilter, totals
from hub.store import Database, dumps, loads, now

MAX_LABELS = 10_000  # per request


def predictions(output: Any) -> list[tuple[str, float]]:
    """Per row of a record's output: ("class", k) or ("value", v)."""
    if isinstance(output, dict):
        output = next(iter(output.values()), None) if output else None
    if not isinstance(output, list):
        output = [output]
    out: list[tuple[str, float]] = []
    for row in output:
        vals = row if isinstance(row, list) else [row]
        nums = [float(v) for v in vals if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if not nums:
            continue
        if len(nums) > 1:
            out.append(("class", float(max(range(len(nums)), key=nums.__getitem__))))
        elif isinstance(vals[0], int) and not isinstance(vals[0], bool):  # a class id (skl2onnx's output_label)
            out.append(("class", nums[0]))
        elif 0.0 <= nums[0] <= 1.0:
            out.append(("class", 1.0 if nums[0] >= 0.5 else 0.0))
        else:
            out.append(("value", nums[0]))
    return out


def score(output: Any, label: Any) -> tuple[int, int, float, int]:
    """One labelled record: (classification rows, right ones, sum of absolute errors, regression rows)."""
    labels = label if isinstance(label, list) else [label]
    n = right = reg = 0
    err = 0.0
    for (kind, pred), lab in zip(predictions(output), labels):
        try:
            truth = float(lab)
        except (TypeError, ValueError):
            continue
        if not math.isfinite(truth):
            continue
        if kind == "class":
            n += 1
            right += int(pred == truth)
        else:
            reg += 1
            err += abs(pred - truth)
    return n, right, err, reg


class Labels:
    def __init__(self, db: Database) -> None:
        self.db = db

    def add(self, items: Iterable[dict[str, Any]], actor: str) -> dict[str, Any]:
        """Store labels ``{"sample": "device/request-id", "label": value}``; the latest label of a sample wins."""
        rows = []
        for i, it in enumerate(items):
            sample = it.get("sample")
            if not isinstance(sample, str) or not 3 <= len(sample) <= 200 or "/" not in sample:
                raise Invalid(f"labels[{i}].sample must be 'device/request-id' or 'device/seq/idx'")
            source = sample.split("/", 1)[0]  # a device id, or endpoint:NAME for a web endpoint's request
            check_api_name(source.removeprefix("endpoint:"), f"labels[{i}] device or endpoint")
            if "label" not in it:
                raise Invalid(f"labels[{i}] has no label")
            rows.append((sample, dumps(it["label"]), float(it.get("ts") or now()), "api", actor))
        if len(rows) > MAX_LABELS:
            raise Invalid(f"at most {MAX_LABELS} labels per request")
        with self.db.transaction() as tx:
            tx.executemany("INSERT INTO labels (sample_id, label, ts, source, created_by) VALUES (?, ?, ?, ?, ?)"
                           " ON CONFLICT (sample_id) DO UPDATE SET label = excluded.label, ts = excluded.ts,"
                           " source = excluded.source, created_by = excluded.created_by", rows)
            record(self.db, actor, "labels.added", "labels", count=len(rows))
        matched = sum(1 for r in rows if self.db.one("SELECT 1 FROM data_records WHERE sample_id = ?", (r[0],)))
        return {"stored": len(rows), "matched": matched}

    def _joined(self, module: str | None, version: int | None, since: float, until: float,
                devices: set[str] | None = None) -> list[dict[str, Any]]:
        sql = ("SELECT d.device, d.ts, d.module, d.version, d.output, l.label FROM data_records d"
               " JOIN labels l ON l.sample_id = d.sample_id WHERE d.ts >= ? AND d.ts < ?")
        args: list[Any] = [since, until]
        if module is not None:
            sql += " AND d.module = ?"
            args.append(module)
        if version is not None:
            sql += " AND d.version = ?"
            args.append(version)
        rows = self.db.query(sql + " ORDER BY d.ts", args)
        return [r for r in rows if devices is None or r["device"] in devices]

    def accuracy(self, module: str, version: int, since: float, devices: set[str] | None = None,
                 until: float | None = None) -> dict[str, Any]:
        """Accuracy (classification) and MAE (regression) of ``module:version`` on labelled records since ``since``."""
        n = right = reg = 0
        err = 0.0
        for r in self._joined(module, version, since, until if until is not None else now() + 1, devices):
            a, b, c, d = score(loads(r["output"]), loads(r["label"]))
            n, right, err, reg = n + a, right + b, err + c, reg + d
        return {"module": module, "version": version, "labelled": n + reg, "accuracy": right / n if n else None,
                "correct": right, "classified": n, "mae": err / reg if reg else None}

    def series(self, module: str | None, step: float, since: float, until: float) -> list[dict[str, Any]]:
        """Per version and per ``step`` seconds: labelled rows, accuracy, MAE."""
        buckets: dict[tuple[str, int, float], list[float]] = {}
        for r in self._joined(module, None, since, until):
            a, b, c, d = score(loads(r["output"]), loads(r["label"]))
            start = since + math.floor((r["ts"] - since) / step) * step
            acc = buckets.setdefault((r["module"], r["version"], start), [0, 0, 0.0, 0])
            acc[0], acc[1], acc[2], acc[3] = acc[0] + a, acc[1] + b, acc[2] + c, acc[3] + d
        return [{"module": m, "version": v, "ts": t, "labelled": int(a[0] + a[3]), "correct": int(a[1]),
                 "accuracy": a[1] / a[0] if a[0] else None, "mae": a[2] / a[3] if a[3] else None}
                for (m, v, t), a in sorted(buckets.items())]

    def totals(self, since: float) -> list[dict[str, Any]]:
        """Per module version since ``since``: for /metrics."""
        out: dict[tuple[str, int], list[float]] = {}
        for r in self._joined(None, None, since, now() + 1):
            a, b, c, d = score(loads(r["output"]), loads(r["label"]))
            acc = out.setdefault((r["module"], r["version"]), [0, 0, 0.0, 0])
            acc[0], acc[1], acc[2], acc[3] = acc[0] + a, acc[1] + b, acc[2] + c, acc[3] + d
        return [{"module": m, "version": v, "labelled": int(a[0] + a[3]), "accuracy": a[1] / a[0] if a[0] else None,
                 "mae": a[2] / a[3] if a[3] else None} for (m, v), a in sorted(out.items())]


class Quality:
    """What the quality gates read besides shadow comparisons: input drift against the baseline, and accuracy."""

    def __init__(self, reports: DriftReports, labels: Labels) -> None:
        self.reports, self.labels = reports, labels

    def input_drift(self, module: str, data_version: int, baseline_version: int, since: float,
                    devices: set[str]) -> tuple[float | None, str]:
        """The largest per-feature PSI of the inputs ``module:data_version`` collected since ``since`` on ``devices``,
        against ``module:baseline_version``'s baseline; None (and why) without a baseline or enough rows."""
        base = self.reports.baseline(module, baseline_version)
        if base is None or not base[0]:
            return None, f"no input baseline for {module}:{baseline_version}"
        inputs, _ = self.reports.collected(Target(module, data_version, devices=frozenset(devices)), since, now() + 1)
        drifts = compare(base[0], inputs)
        if not drifts:
            return None, "fewer than 30 collected input rows (raise the deployment's collect rate)"
        worst = max(drifts, key=lambda d: d.psi)
        return worst.psi, f"largest PSI: {worst.feature}, over {len(next(iter(inputs.values()), []))} rows"

    def arm(self, deployment: str, metric: str, since: float) -> Arm:
        """One A/B arm: a deployment's current version on its own devices. ``accuracy``: labelled predictions
        right; ``success``: inferences answered without error (telemetry)."""
        t = self.reports.deployment_target(deployment)
        if metric == "accuracy":
            acc = self.labels.accuracy(t.module, t.version, since, set(t.devices or ()))
            return Arm(deployment, acc["correct"], acc["classified"])
        if metric != "success":
            raise Invalid("metric must be accuracy or success")
        sums = totals(self.reports.db, SeriesFilter(module=t.module, version=t.version, devices=t.devices), since)
        n = int(sum(s[1] for s in sums.values()))
        return Arm(deployment, n - int(sum(s[2] for s in sums.values())), n)
