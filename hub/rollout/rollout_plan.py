"""What a rollout is asked to do: its waves (from a strategy string) and the health gates between them."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from hub.errors import Invalid

ON_FAILURE = ("rollback", "halt")


@dataclass(frozen=True)
class Wave:
    """Cumulative size after this wave: ``devices`` (an absolute count) or ``percent`` of the matching fleet."""

    percent: float = 100.0
    devices: int | None = None

    def size(self, fleet: int) -> int:
        if self.devices is not None:
            return min(fleet, self.devices)
        # at least one device per wave, so "1%" of 50 devices is a real canary, not an empty wave
        return min(fleet, max(1, math.ceil(fleet * self.percent / 100.0))) if fleet else 0

    @property
    def label(self) -> str:
        return f"{self.devices} devices" if self.devices is not None else f"{self.percent:g}%"


def parse_strategy(text: str) -> list[Wave]:
    """``all`` | ``canary:N`` | ``canary:P%`` | ``waves:1,10,50,100``; the last wave is always the whole fleet."""
    text = (text or "all").strip().lower()
    kind, _, arg = text.partition(":")
    if kind == "all" and not arg:
        return [Wave()]
    try:
        if kind == "canary":
            first = Wave(percent=float(arg[:-1])) if arg.endswith("%") else Wave(devices=int(arg))
            waves = [first]
        elif kind == "waves":
            waves = [Wave(percent=float(p.rstrip("%"))) for p in arg.split(",") if p.strip()]
        else:
            raise ValueError
    except ValueError:
        raise Invalid(f"strategy {text!r}: use all, canary:N, canary:P% or waves:1,10,50,100") from None
    if not waves or any((w.devices is not None and w.devices < 1) or not 0 < w.percent <= 100 for w in waves):
        raise Invalid(f"strategy {text!r}: wave sizes must be positive and at most 100%")
    pcts = [w.percent for w in waves if w.devices is None]
    if pcts != sorted(pcts):
        raise Invalid(f"strategy {text!r}: wave percentages must grow")
    if waves[-1].devices is not None or waves[-1].percent < 100:
        waves.append(Wave())
    return waves


def strategy_text(waves: list[Wave]) -> str:
    """The strategy string :func:`parse_strategy` turns back into ``waves`` (``canary:P%`` reads as ``waves:P,100``)."""
    if len(waves) == 1 and waves[0] == Wave():
        return "all"
    if waves[0].devices is not None and len(waves) == 2:
        return f"canary:{waves[0].devices}"
    return "waves:" + ",".join(f"{w.percent:g}" for w in waves)


def strategy_to_json(waves: list[Wave]) -> list[dict[str, Any]]:
    return [asdict(w) for w in waves]


def strategy_from_json(raw: list[dict[str, Any]]) -> list[Wave]:
    return [Wave(**w) for w in raw]


@dataclass(frozen=True)
class Gates:
    """Checked after each wave's bake time, on the devices the rollout has moved so far. None: not checked.

    Install failures are also checked while a wave installs, so a broken version halts early.
    """

    max_install_failure_rate: float | None = 0.0  # share of moved devices whose install failed or rolled back
    max_error_rate: float | None = None  # inference errors / inferences of the new version during the bake
    max_p95_increase: float | None = None  # 0.2: new p95 latency at most 20% above the previous version's
    min_reporting: float | None = None  # share of moved devices that sent telemetry for the new version
    # quality gates (hub/rollout/shadow_gates.py): what the candidate answers, not only whether it runs
    max_disagreement: float | None = None  # shadow: share of mirrored inputs where the candidate's prediction differs
    max_prediction_drift: float | None = None  # PSI of predicted classes: shadow vs live, waves vs the previous version
    max_input_drift: float | None = None  # largest per-feature PSI of the inputs collected since the phase began
    min_accuracy: float | None = None  # share of labelled predictions the new version got right (ground truth)

    @classmethod
    def from_json(cls, raw: dict[str, Any] | None) -> Gates:
        raw = dict(raw or {})
        unknown = set(raw) - set(cls.__dataclass_fields__)
        if unknown:
            raise Invalid(f"unknown gate(s) {sorted(unknown)}: known are {sorted(cls.__dataclass_fields__)}")
        for k, v in raw.items():
            if v is not None and (not isinstance(v, (int, float)) or v < 0):
                raise Invalid(f"gate {k} must be a non-negative number or null")
        return cls(**raw)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)
