"""An application's hold on updates (``POST /v1/defer`` on the local API), bounded by the agent. Pure.

An app busy with something that must not be interrupted (a surgery robot mid-procedure, a checkout
mid-payment) asks the agent to hold installs for a while, the way balena's update locks and
Greengrass's component update policies let it. The agent, not the app, bounds it: one hold lasts at
most ``max_s`` from when it began, however often it is renewed, and a hold that ran to that maximum
blocks the next one for as long again, so the held updates get their turn. Removals and everything
but installs and reconfigurations go ahead; a release (``DELETE /v1/defer``) ends the hold at once.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_REASON = 200


@dataclass(frozen=True)
class Hold:
    since: float = 0.0  # when this hold began (renewals keep it)
    until: float = 0.0  # installs wait until then
    reason: str = ""
    blocked_until: float = 0.0  # the hold ran to its maximum: no new one before this

    def active(self, now: float) -> bool:
        return now < self.until


def request(held: Hold, now: float, seconds: float, max_s: float, reason: str = "") -> tuple[Hold, str | None]:
    """Hold installs for ``seconds`` more (renewing a hold keeps its start): (the hold now, None) or
    (``held`` unchanged, why it is refused)."""
    if max_s <= 0:
        return held, "this device does not let applications hold updates (agent --max-defer 0)"
    if not seconds > 0:
        return held, "seconds must be a positive number"
    if not held.active(now) and now < held.blocked_until:
        return held, (f"the last hold ran to its maximum of {max_s:g}s: held updates go first; "
                      f"a new hold is possible in {held.blocked_until - now:.0f}s")
    since = held.since if held.active(now) else now
    until = min(now + seconds, since + max_s)
    capped = until >= since + max_s
    return Hold(since, until, reason[:MAX_REASON], until + max_s if capped else 0.0), None


def release(held: Hold, now: float) -> Hold:
    """End the hold now (one released before its maximum blocks nothing)."""
    return Hold() if held.active(now) else held
