"""Inputs built from a signature (health checks and advertised sample requests), and specs read off outputs."""

from __future__ import annotations

from typing import Any

import numpy as np

from protocol.manifest import TensorSpec

Batch = dict[str, np.ndarray]

SAMPLE_SEED = 0


def sample_inputs(specs: list[TensorSpec], zeros: bool = False) -> Batch | None:
    """Inputs built from a signature, for a health check or an advertised sample request: every free
    dimension 1 (a batch of one), floats uniform in [0, 1) (seeded; zeros with ``zeros``), other numbers 0.
    None when there is no signature to build from (a script that declares none)."""
    if not specs:
        return None
    rng = np.random.default_rng(SAMPLE_SEED)
    out: Batch = {}
    for spec in specs:
        shape = tuple(1 if d is None or d < 0 else d for d in spec.shape)
        dtype = np.dtype(spec.dtype) if spec.dtype != "str" else np.dtype(object)
        if dtype.kind == "f" and not zeros:
            out[spec.name] = rng.random(shape).astype(dtype)
        elif dtype.kind == "O":
            out[spec.name] = np.full(shape, "", dtype=object)
        else:
            out[spec.name] = np.zeros(shape, dtype=dtype)
    return out


def sample_request(specs: list[TensorSpec]) -> dict[str, Any]:
    """A JSON request body the signature accepts (zeros): what an endpoint or device advertises without ``--sample``."""
    batch = sample_inputs(specs, zeros=True) or {}
    return {"inputs": {k: v.tolist() for k, v in batch.items()}}


def observed_specs(out: Batch) -> list[TensorSpec]:
    """Specs of the outputs a call returned (a postprocess that declares no ``OUTPUTS``), as seen for that call."""
    return [TensorSpec(name=k, dtype=v.dtype.name if v.dtype.kind != "O" else "str", shape=list(v.shape))
            for k, v in out.items()]
