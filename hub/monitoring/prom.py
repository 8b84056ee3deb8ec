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


def endpoint_families(out: Exposition, statuses: list[tuple[str, dict[str, Any] | None]]) -> None:
    """The web endpoints' families from each gateway's ``status()`` (None: its gateway is not answering): the
    hub's ``/metrics`` for all of them, a standalone ``edgefleet serve``'s own for itself."""
    up: list[tuple[dict[str, str], float]] = []
    responses: list[tuple[dict[str, str], float]] = []
    queued: list[tuple[dict[str, str], float]] = []
    latency: list[tuple[dict[str, str], dict[str, Any]]] = []
    for name, status in statuses:
        up.append(({"endpoint": name}, 0 if status is None else 1))
        if status is None:
            continue
        responses.extend(({"endpoint": name, "code": code}, n) for code, n in status["responses"].items())
        queued.extend(({"endpoint": name, "version": v["label"]}, v["queued"]) for v in status["versions"])
        latency.extend(({"endpoint": name, "version": label}, h) for label, h in status.get("latency_ms", {}).items())
    out.family("edgefleet_hub_endpoint_up", "gauge", "1 while the endpoint's gateway answers.", up)
    out.family("edgefleet_hub_endpoint_responses_total", "counter", "Scoring responses by HTTP status code.", responses)
    out.family("edgefleet_hub_endpoint_queued_requests", "gauge", "Requests waiting for a worker, per version.", queued)
    out.histogram("edgefleet_hub_endpoint_latency_ms", "Successful scoring latency at the gateway, per version.",
                  latency)
