"""An endpoint's spec as the hub (or ``edgefleet serve``) hands it to the gateway: versions, weights, settings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hub.endpoints.pool import Settings


@dataclass
class Version:
    """One model version behind the endpoint and its share of traffic."""

    label: str  # "module:version"
    bundle_dir: str
    weight: float = 100.0
    mirror: float = 0.0  # share (0-1) of all requests also sent here, answers discarded


def parse_spec(spec: dict[str, Any]) -> tuple[list[Version], Settings]:
    versions = [Version(v["label"], str(v["bundle_dir"]), float(v.get("weight", 100)), float(v.get("mirror", 0)))
                for v in spec.get("versions", [])]
    if not versions or sum(v.weight for v in versions) <= 0:
        raise ValueError("an endpoint needs at least one version with a positive weight")
    if len({v.label for v in versions}) != len(versions):
        raise ValueError("each version may appear once")
    if any(v.weight < 0 or not 0 <= v.mirror <= 1 for v in versions):
        raise ValueError("weights must be >= 0 and mirror shares between 0 and 1")
    settings = Settings(replicas=int(spec.get("replicas", 1)), max_batch=max(1, int(spec.get("max_batch", 64))),
                        max_wait_ms=float(spec.get("max_wait_ms", 2.0)), threads=int(spec.get("threads", 1)),
                        queue_timeout_s=float(spec.get("queue_timeout_s", 30.0)),
                        collect_db=str(spec.get("collect_db") or ""),
                        collect_rate_ppm=int(spec.get("collect_rate_ppm", -1)),
                        memory_mb=int(spec.get("memory_mb", 0)))
    return versions, settings
