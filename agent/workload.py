"""Synthetic workload for demos and the simulator, and the per-module statistics every inference feeds."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from modules.examples import N_FEATURES, synthetic_inputs
from modules.runners import Batch
from protocol.manifest import TensorSpec
from protocol.messages import LatencyMs


@dataclass(frozen=True)
class Workload:
    """Generate inputs shaped by a module's input signature at ``rate`` inferences per second."""

    rate: float = 1.0
    batch: int = 1
    shift: float = 0.0  # moves feature 0 of the example model's inputs: a drift scenario
    seed: int | None = None

    def make_inputs(self, rng: np.random.Generator, specs: list[TensorSpec]) -> Batch:
        out: Batch = {}
        for spec in specs:
            shape = [self.batch if d is None or d < 0 else d for d in spec.shape]
            if shape == [self.batch, N_FEATURES] and spec.dtype == "float32":
                out[spec.name] = synthetic_inputs(rng, self.batch, self.shift)  # the example model's distribution
            elif np.dtype(spec.dtype).kind in "iub":
                out[spec.name] = rng.integers(0, 2, size=shape).astype(spec.dtype)
            else:
                out[spec.name] = rng.normal(size=shape).astype(spec.dtype)
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

    def take(self) -> tuple[int, int, LatencyMs]:
        """Return and reset this interval's counts and latency percentiles."""
        n, errors, lat = self.inferences, self.errors, self.latencies_ms
        self.inferences, self.errors, self.latencies_ms = 0, 0, []
        if not lat:
            return n, errors, LatencyMs()
        p50, p95, p99 = (round(float(v), 3) for v in np.percentile(np.asarray(lat), [50, 95, 99]))
        return n, errors, LatencyMs(p50=p50, p95=p95, p99=p99)
