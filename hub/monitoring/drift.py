"""Drift statistics, pure NumPy: PSI, two-sample Kolmogorov-Smirnov, chi-square.

Numeric features get PSI over the baseline's decile bins plus KS; categorical
features get PSI over categories plus a chi-square test. The p-value functions
are the standard asymptotic forms (Kolmogorov distribution; chi-square via the
regularized incomplete gamma function), so no SciPy is needed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

EPS = 1e-4  # floor for empty bins, as is usual for PSI, so log(0) never happens


@dataclass(frozen=True)
class FeatureDrift:
    feature: str
    kind: str  # "numeric" | "categorical"
    psi: float
    statistic: float  # KS D or chi-square
    p_value: float
    n_baseline: int
    n_current: int

    def as_dict(self) -> dict[str, Any]:
        return {"feature": self.feature, "kind": self.kind, "psi": round(self.psi, 6),
                "statistic": round(self.statistic, 6), "p_value": self.p_value,
                "n_baseline": self.n_baseline, "n_current": self.n_current}


def quantile_edges(reference: np.ndarray, bins: int = 10) -> np.ndarray:
    """Inner bin edges at the reference's quantiles (duplicates removed for discrete-ish data)."""
    return np.unique(np.quantile(reference, np.linspace(0, 1, bins + 1)[1:-1]))


def psi(expected: np.ndarray, actual: np.ndarray) -> float:
    """Population stability index between two distributions over the same bins."""
    e = np.clip(expected / max(expected.sum(), 1e-12), EPS, None)
    a = np.clip(actual / max(actual.sum(), 1e-12), EPS, None)
    return float(np.sum((a - e) * np.log(a / e)))


def binned(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    return np.bincount(np.searchsorted(edges, values, side="right"), minlength=len(edges) + 1).astype(float)


def ks_2samp(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Two-sample KS statistic D and its asymptotic p-value."""
    a, b = np.sort(a), np.sort(b)
    grid = np.concatenate([a, b])
    d = float(np.max(np.abs(np.searchsorted(a, grid, side="right") / len(a)
                            - np.searchsorted(b, grid, side="right") / len(b))))
    n = len(a) * len(b) / (len(a) + len(b))
    lam = (math.sqrt(n) + 0.12 + 0.11 / math.sqrt(n)) * d
    return d, kolmogorov_sf(lam)


def kolmogorov_sf(lam: float) -> float:
    if lam < 1e-3:
        return 1.0
    total = sum((-1) ** (k - 1) * math.exp(-2 * k * k * lam * lam) for k in range(1, 101))
    return float(min(1.0, max(0.0, 2 * total)))


def chi2_sf(x: float, dof: int) -> float:
    """Survival function of the chi-square distribution: Q(dof/2, x/2)."""
    if x <= 0:
        return 1.0
    return _gamma_q(dof / 2.0, x / 2.0)


def _gamma_q(a: float, x: float) -> float:
    """Regularized upper incomplete gamma (Numerical Recipes: series below a+1, continued fraction above)."""
    gln = math.lgamma(a)
    if x < a + 1:
        term = total = 1.0 / a
        ap = a
        for _ in range(500):
            ap += 1
            term *= x / ap
            total += term
            if abs(term) < abs(total) * 1e-12:
                break
        return max(0.0, 1.0 - total * math.exp(-x + a * math.log(x) - gln))
    b, c, d = x + 1 - a, 1.0 / 1e-300, 1.0 / (x + 1 - a)
    h = d
    for i in range(1, 500):
        an = -i * (i - a)
        b += 2
        d = an * d + b
        d = 1.0 / (d if abs(d) > 1e-300 else 1e-300)
        c = b + an / c
        c = c if abs(c) > 1e-300 else 1e-300
        h *= d * c
        if abs(d * c - 1) < 1e-12:
            break
    return min(1.0, math.exp(-x + a * math.log(x) - gln) * h)


def numeric_drift(name: str, reference: np.ndarray, current: np.ndarray) -> FeatureDrift:
    edges = quantile_edges(reference)
    stat, p = ks_2samp(reference, current)
    return FeatureDrift(name, "numeric", psi(binned(reference, edges), binned(current, edges)), stat, p,
                        len(reference), len(current))


def categorical_drift(name: str, reference: list[Any], current: list[Any]) -> FeatureDrift:
    cats = sorted({str(v) for v in reference} | {str(v) for v in current})
    ref = np.array([sum(str(v) == c for v in reference) for c in cats], dtype=float)
    cur = np.array([sum(str(v) == c for v in current) for c in cats], dtype=float)
    expected = np.clip(ref / ref.sum(), EPS, None) * cur.sum()
    stat = float(np.sum((cur - expected) ** 2 / expected))
    return FeatureDrift(name, "categorical", psi(ref, cur), stat, chi2_sf(stat, max(len(cats) - 1, 1)),
                        int(ref.sum()), int(cur.sum()))


def flatten_rows(records: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """Turn records like ``{"x": [[1, 2], [3, 4]]}`` into columns ``x[0]: [1, 3], x[1]: [2, 4]``.

    The first dimension of each tensor is the batch; scalars per row become one column, and a map per row
    (``{"p": [{"cat": 0.9, "dog": 0.1}, ...]}``) a column per key (``p[cat]``, ``p[dog]``).
    """
    columns: dict[str, list[Any]] = {}
    for record in records:
        for tensor, value in record.items():
            if isinstance(value, list) and value and all(isinstance(row, dict) for row in value):
                for row in value:  # one map per row (skl2onnx's ZipMap {class: probability}): a column per key
                    for key, v in row.items():
                        columns.setdefault(f"{tensor}[{key}]", []).append(v)
                continue
            arr = np.asarray(value, dtype=object)
            if arr.ndim == 0:
                columns.setdefault(tensor, []).append(arr.item())
                continue
            rows = arr.reshape(arr.shape[0], -1)
            for j in range(rows.shape[1]):
                key = f"{tensor}[{j}]" if rows.shape[1] > 1 or arr.ndim > 1 else tensor
                columns.setdefault(key, []).extend(rows[:, j].tolist())
    return columns


def _is_numeric(values: list[Any]) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def compare(reference: dict[str, list[Any]], current: dict[str, list[Any]], min_rows: int = 30) -> list[FeatureDrift]:
    """Per-feature drift for every column present in both, with at least ``min_rows`` current values."""
    out = []
    for name in sorted(set(reference) & set(current)):
        ref, cur = reference[name], current[name]
        if len(cur) < min_rows or len(ref) < min_rows:
            continue
        if _is_numeric(ref) and _is_numeric(cur):
            out.append(numeric_drift(name, np.asarray(ref, dtype=float), np.asarray(cur, dtype=float)))
        else:
            out.append(categorical_drift(name, ref, cur))
    return out
