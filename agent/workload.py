"""Synthetic workload for demos and the simulator (``--rate``): NumPy inputs shaped by a module's signature.

Only an agent given a workload imports this (and so NumPy); the statistics every inference feeds
are in agent.stats.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from modules.examples import N_FEATURES, synthetic_inputs
from modules.runners import Batch
from protocol.manifest import TensorSpec


@dataclass(frozen=True)
class Workload:
    """Generate inputs shaped by a module's input signature at ``rate`` inferences per second."""

    rate: float = 1.0
    batch: int = 1
    shift: float = 0.0  # moves feature 0 of the example model's inputs: a drift scenario
    seed: int | None = None

    def rng(self, salt: str) -> np.random.Generator:
        """A generator per module (seeded from ``seed`` when given)."""
        return np.random.default_rng(None if self.seed is None else self.seed + hash(salt) % 1000)

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
