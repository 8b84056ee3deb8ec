"""Evaluation metrics, thresholds and the champion comparison: pure functions over NumPy arrays.

What a model's outputs mean (:func:`predictions`): an integer, boolean or string output is the
predicted label; a float output of one column (or none) is the positive class's probability (label:
``>= decision threshold``) or, for regression metrics, the predicted value; a float output of C > 1
columns holds class probabilities (label: the argmax; with C = 2, column 1 is the positive class).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

HIGHER_IS_BETTER = {"accuracy", "precision", "recall", "f1", "auc", "r2"}
LOWER_IS_BETTER = {"mse", "rmse", "mae", "log_loss"}
METRICS = tuple(sorted(HIGHER_IS_BETTER | LOWER_IS_BETTER))
NEEDS_LABEL = {"accuracy", "precision", "recall", "f1"}
NEEDS_SCORE = {"auc", "log_loss"}
NEEDS_VALUE = {"mse", "rmse", "mae", "r2"}

THRESHOLD_RE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(>=|<=|>|<)\s*([-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?)\s*$")


class EvaluationError(ValueError):
    """The data or the model's outputs cannot give the metric asked for; the text says why."""


@dataclass(frozen=True)
class Threshold:
    metric: str
    op: str
    value: float

    def holds(self, got: float) -> bool:
        return {">=": got >= self.value, "<=": got <= self.value, ">": got > self.value, "<": got < self.value}[self.op]

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.value:g}"


def parse_threshold(text: str) -> Threshold:
    m = THRESHOLD_RE.match(text)
    if not m or m.group(1) not in METRICS:
        raise EvaluationError(f"threshold {text!r}: want METRIC>=NUMBER (or <=, >, <) with METRIC one of "
                              f"{', '.join(METRICS)}")
    return Threshold(m.group(1), m.group(2), float(m.group(3)))


def check_metrics(names: list[str]) -> list[str]:
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise EvaluationError(f"unknown metric(s) {unknown}: choose from {', '.join(METRICS)}")
    return list(dict.fromkeys(names))


@dataclass
class Predictions:
    labels: np.ndarray | None = None  # predicted class per row
    scores: np.ndarray | None = None  # probability of the positive class per row (binary)
    values: np.ndarray | None = None  # predicted number per row (regression)


def predictions(outputs: dict[str, np.ndarray], output: str | None = None, decision: float = 0.5) -> Predictions:
    """Read labels, positive-class scores and values out of a model's outputs (see the module docstring)."""
    if output is not None:
        if output not in outputs:
            raise EvaluationError(f"the model has no output {output!r}: it has {sorted(outputs)}")
        outputs = {output: outputs[output]}
    p = Predictions()
    for raw in outputs.values():
        arr = np.asarray(raw)
        if arr.ndim == 0 or arr.ndim > 2:
            continue
        if arr.dtype.kind in "iubUSO" and p.labels is None:
            p.labels = arr.reshape(-1) if arr.ndim == 1 or arr.shape[1] == 1 else None
        elif arr.dtype.kind == "f":
            cols = 1 if arr.ndim == 1 else arr.shape[1]
            if cols == 1:
                col = arr.reshape(-1).astype(np.float64)
                p.scores = col if p.scores is None else p.scores
                p.values = col if p.values is None else p.values
                if p.labels is None:
                    p.labels = (col >= decision).astype(np.int64)
            else:
                if cols == 2 and p.scores is None:
                    p.scores = arr[:, 1].astype(np.float64)
                if p.labels is None:
                    p.labels = np.argmax(arr, axis=1).astype(np.int64)
    return p


def as_labels(column: np.ndarray) -> np.ndarray:
    """Label column values as numbers when they all are (``"1"`` and ``1.0`` both become 1), else as text."""
    try:
        num = column.astype(np.float64)
    except (TypeError, ValueError):
        return column.astype(str)
    return num.astype(np.int64) if np.all(np.isfinite(num)) and np.all(num == np.round(num)) else num


def _binary(y: np.ndarray, yhat: np.ndarray, pos: Any) -> tuple[float, float, float]:
    tp = float(np.sum((yhat == pos) & (y == pos)))
    fp = float(np.sum((yhat == pos) & (y != pos)))
    fn = float(np.sum((yhat != pos) & (y == pos)))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def _prf(y: np.ndarray, yhat: np.ndarray, pos_label: Any) -> tuple[float, float, float]:
    """Binary (positive class ``pos_label``) when the labels are two classes including it, else macro averages."""
    classes = np.unique(np.concatenate([np.unique(y), np.unique(yhat)]))
    if len(classes) <= 2 and pos_label in set(classes.tolist()):
        return _binary(y, yhat, pos_label)
    per = np.array([_binary(y, yhat, c) for c in classes])
    return tuple(float(v) for v in per.mean(axis=0))  # type: ignore[return-value]


def auc(y: np.ndarray, score: np.ndarray, pos_label: Any) -> float:
    """ROC AUC as the Mann-Whitney U statistic (ties take average ranks)."""
    pos = y == pos_label
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if not n_pos or not n_neg:
        raise EvaluationError("auc needs both classes in the label column")
    order = np.argsort(score, kind="mergesort")
    ranks = np.empty(len(score), dtype=np.float64)
    sorted_scores = score[order]
    i = 0
    while i < len(score):  # average ranks over runs of equal scores
        j = i
        while j + 1 < len(score) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def compute(names: list[str], y: np.ndarray, p: Predictions, pos_label: Any = 1) -> dict[str, float]:
    """Each metric of ``names`` from the labels ``y`` and the model's predictions."""
    if len(y) == 0:
        raise EvaluationError("the data has no rows")
    out: dict[str, float] = {}
    for name in names:
        if name in NEEDS_LABEL:
            if p.labels is None:
                raise EvaluationError(f"{name} needs a predicted label: the model has no label or score output")
            yhat = p.labels
            if yhat.dtype.kind in "US" or y.dtype.kind in "US":
                yhat, y_cmp = yhat.astype(str), y.astype(str)
                pos = str(pos_label)
            else:
                y_cmp, pos = y, pos_label
            if name == "accuracy":
                out[name] = float(np.mean(yhat == y_cmp))
            else:
                precision, recall, f1 = _prf(y_cmp, yhat, pos)
                out[name] = {"precision": precision, "recall": recall, "f1": f1}[name]
        elif name in NEEDS_SCORE:
            if p.scores is None:
                raise EvaluationError(f"{name} needs the positive class's probability: a float output of one or two "
                                      "columns")
            if name == "auc":
                out[name] = auc(y, p.scores, pos_label)
            else:
                q = np.clip(p.scores, 1e-15, 1 - 1e-15)
                t = (y == pos_label).astype(np.float64)
                out[name] = float(-np.mean(t * np.log(q) + (1 - t) * np.log(1 - q)))
        elif name in NEEDS_VALUE:
            if p.values is None:
                raise EvaluationError(f"{name} needs a predicted value: a float output of one column")
            if y.dtype.kind not in "iuf":
                raise EvaluationError(f"{name} needs a numeric label column")
            err = p.values - y.astype(np.float64)
            mse = float(np.mean(err ** 2))
            if name == "mse":
                out[name] = mse
            elif name == "rmse":
                out[name] = math.sqrt(mse)
            elif name == "mae":
                out[name] = float(np.mean(np.abs(err)))
            else:
                var = float(np.var(y.astype(np.float64)))
                out[name] = 1.0 - mse / var if var else 0.0
        else:
            raise EvaluationError(f"unknown metric {name!r}")
    return out


@dataclass(frozen=True)
class Row:
    metric: str
    candidate: float
    champion: float | None
    threshold: Threshold | None
    verdict: str  # "ok", "better", "equal", "within tolerance", "worse", "fails threshold"

    @property
    def failed(self) -> bool:
        return self.verdict in ("worse", "fails threshold")


def judge(candidate: dict[str, float], champion: dict[str, float] | None, thresholds: list[Threshold],
          tolerance: float = 0.0) -> list[Row]:
    """One row per metric: a threshold that does not hold fails; so does being worse than the champion by more
    than ``tolerance`` (absolute), in the metric's own direction."""
    rows = []
    for metric, got in candidate.items():
        limit = next((t for t in thresholds if t.metric == metric), None)
        theirs = None if champion is None else champion.get(metric)
        verdict = "ok"
        if limit is not None and not limit.holds(got):
            verdict = "fails threshold"
        elif theirs is not None:
            delta = got - theirs if metric in HIGHER_IS_BETTER else theirs - got  # > 0: the candidate is better
            if delta < -tolerance - 1e-12:
                verdict = "worse"
            elif delta < -1e-12:
                verdict = "within tolerance"
            else:
                verdict = "better" if delta > 1e-12 else "equal"
        rows.append(Row(metric, got, theirs, limit, verdict))
    return rows
