"""Prometheus text exposition pieces, written by hand: a family writer and a fixed-bucket latency histogram.

Pure and light, so the endpoint gateway process can keep a histogram without importing the hub.
"""

from __future__ import annotations

import bisect
from typing import Any

# milliseconds; covers an in-process tree model (~0.1 ms) up to a slow batch on a small CPU
LATENCY_BUCKETS_MS: tuple[float, ...] = (0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000)


def escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def label_text(labels: dict[str, str]) -> str:
    return "{" + ",".join(f'{k}="{escape(v)}"' for k, v in labels.items()) + "}" if labels else ""


class Exposition:
    """Collects metric families and renders the text format (version 0.0.4)."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str, samples: list[tuple[dict[str, str], float]]) -> None:
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} {kind}")
        self.lines.extend(f"{name}{label_text(labels)} {value:g}" for labels, value in samples)

    def histogram(self, name: str, help_text: str, series: list[tuple[dict[str, str], dict[str, Any]]]) -> None:
        """``series``: (labels, ``LatencyHistogram.as_dict()``) pairs."""
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} histogram")
        for labels, h in series:
            running = 0
            for le, n in zip([*h["buckets"], "+Inf"], h["counts"], strict=True):
                running += n
                self.lines.append(f"{name}_bucket{label_text({**labels, 'le': f'{le:g}' if le != '+Inf' else le})} "
                                  f"{running}")
            self.lines.append(f"{name}_sum{label_text(labels)} {h['sum']:.6g}")
            self.lines.append(f"{name}_count{label_text(labels)} {h['count']}")

    def render(self) -> str:
        return "\n".join(self.lines) + "\n"


class LatencyHistogram:
    """Counts per bucket (not cumulative; the exposition accumulates), plus sum and count."""

    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS_MS) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value_ms: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value_ms)] += 1
        self.sum += value_ms
        self.count += 1

    def as_dict(self) -> dict[str, Any]:
        return {"buckets": list(self.buckets), "counts": list(self.counts), "sum": self.sum, "count": self.count}
