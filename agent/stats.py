"""Per-module inference statistics: what every inference feeds and each telemetry interval takes."""

from __future__ import annotations

from dataclasses import dataclass, field

from protocol.messages import LatencyMs


def percentiles(values: list[float], qs: list[float]) -> list[float]:
    """Linear-interpolation percentiles (NumPy's default method) of a non-empty list."""
    ordered = sorted(values)
    last = len(ordered) - 1
    out = []
    for q in qs:
        pos = last * q / 100.0
        lo = int(pos)
        hi = min(lo + 1, last)
        out.append(ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo))
    return out


@dataclass
class ModuleStats:
    """Counts for the current telemetry interval, plus a lifetime total."""

    inferences: int = 0
    errors: int = 0
    total: int = 0
    errors_total: int = 0
    latency_ms_sum: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)

    def record(self, latency_ms: float, ok: bool) -> None:
        self.inferences += 1
        self.total += 1
        self.errors += 0 if ok else 1
        self.errors_total += 0 if ok else 1
        self.latency_ms_sum += latency_ms
        if len(self.latencies_ms) < 100_000:  # bounded even at absurd rates
            self.latencies_ms.append(latency_ms)

    def add(self, count: int, errors: int, latency_ms_sum: float, latencies_ms: list[float]) -> None:
        """Inferences counted elsewhere (a worker's direct socket), as :meth:`record` would have counted them."""
        self.inferences += count
        self.total += count
        self.errors += errors
        self.errors_total += errors
        self.latency_ms_sum += latency_ms_sum
        self.latencies_ms.extend(latencies_ms[:max(0, 100_000 - len(self.latencies_ms))])

    def take(self) -> tuple[int, int, LatencyMs]:
        """Return and reset this interval's counts and latency percentiles."""
        n, errors, lat = self.inferences, self.errors, self.latencies_ms
        self.inferences, self.errors, self.latencies_ms = 0, 0, []
        if not lat:
            return n, errors, LatencyMs()
        p50, p95, p99 = (round(v, 3) for v in percentiles(lat, [50, 95, 99]))
        return n, errors, LatencyMs(p50=p50, p95=p95, p99=p99)
