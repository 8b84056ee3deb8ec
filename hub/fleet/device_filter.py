"""Which devices an operator asked for: by status (``offline``, ``failed``, ``pending`` …), labels and a selector.

Pure: it judges the device views :class:`hub.fleet.devices.Fleet` builds, so the CLI, the API and the
bulk label change agree on what ``--status pending --selector site=berlin`` means.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hub.errors import Invalid
from hub.fleet.targeting import Target, check_target

# status -> does a device view have it; "pending" is every device not yet running what it should
STATUSES = {
    "online": lambda d: d["online"],
    "offline": lambda d: not d["online"],
    "failed": lambda d: d["state"] == "failed",
    "pending": lambda d: d["state"] in ("pending", "installing"),
    "installing": lambda d: d["state"] == "installing",
    "running": lambda d: d["state"] == "running",
    "idle": lambda d: d["state"] == "idle",
}


@dataclass(frozen=True)
class DeviceFilter:
    statuses: tuple[str, ...] = ()  # any of them (a device is offline OR failed …)
    target: Target | None = None  # labels and selector, all of them

    def matches(self, view: dict[str, Any]) -> bool:
        if self.statuses and not any(STATUSES[s](view) for s in self.statuses):
            return False
        return self.target is None or self.target.matches(view["id"], view.get("labels") or {})


def device_filter(statuses: list[str] | None = None, labels: list[str] | None = None,
                  selector: str | None = None) -> DeviceFilter:
    """Parse what was typed; a status or selector that means nothing is refused with the reason."""
    bad = sorted(set(statuses or ()) - set(STATUSES))
    if bad:
        raise Invalid(f"unknown device status {bad[0]!r}: use {', '.join(STATUSES)}")
    terms = [t for t in [selector or "", *(labels or [])] if t.strip()]
    for label in labels or []:
        if "=" not in label or "!=" in label:
            raise Invalid(f"label filter {label!r} is not key=value")
    target = check_target(",".join(terms)) if terms else None
    if target is not None and target.ids and labels:
        raise Invalid("a selector of device ids cannot be combined with --label: use label conditions")
    return DeviceFilter(tuple(statuses or ()), target)
