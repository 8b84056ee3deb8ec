"""When a rollout may begin a wave: a start time and maintenance windows. Pure: no clock, no I/O.

A window is ``DAYS HH:MM-HH:MM`` in UTC: ``Sat 02:00-04:00``, ``Mon-Fri 22:00-02:00`` (past midnight:
it ends the next day), ``daily 01:00-05:00``; several are separated by ``;``. A wave *begins* only
inside a window and at or after ``start_at``; a wave under way finishes (its gate is judged as usual),
so a window bounds when devices are first told to change, the way hawkBit's and Mender's schedules do.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from hub.errors import Invalid

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
FULL_DAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
WINDOW_RE = re.compile(r"^\s*(?P<days>[A-Za-z*,-]+)\s+(?P<start>\d{1,2}:\d{2})\s*-\s*(?P<end>\d{1,2}:\d{2})\s*$")
MAX_WINDOWS = 28
FORMS = "use 'DAYS HH:MM-HH:MM' in UTC, e.g. 'Sat 02:00-04:00', 'Mon-Fri 22:00-02:00', 'daily 01:00-05:00'"


@dataclass(frozen=True)
class Window:
    days: frozenset[int]  # 0 = Monday: the days the window opens on
    start: int  # minutes after midnight UTC
    end: int  # minutes after midnight (1440: midnight); <= start: it ends the next day

    def length(self) -> int:
        return (self.end - self.start) % 1440 or 1440


@dataclass(frozen=True)
class Decision:
    ok: bool  # a wave may begin now
    at: float | None = None  # if not: when it may (None: never, e.g. no window opens)
    reason: str = ""  # if not: why, for operators ("outside the window Sat 02:00-04:00; opens …")


def _minutes(text: str, what: str) -> int:
    h, m = (int(x) for x in text.split(":"))
    if not (0 <= h <= 24 and 0 <= m < 60) or (h == 24 and m):
        raise Invalid(f"window {what} {text!r} is not a time of day (00:00-24:00)")
    return h * 60 + m


def _day(text: str) -> int:
    """``mon`` / ``Monday`` / ``tues`` -> 0 / 0 / 1."""
    for i, full in enumerate(FULL_DAYS):
        if len(text) >= 3 and full.startswith(text):
            return i
    raise Invalid(f"window day {text!r} is not a day (Mon..Sun, Mon-Fri, daily); {FORMS}")


def _days(text: str) -> frozenset[int]:
    text = text.lower()
    if text in ("daily", "*"):
        return frozenset(range(7))
    out: set[int] = set()
    for part in text.split(","):
        first, _, last = part.partition("-")
        a = _day(first)
        b = _day(last) if last else a
        out.update((a + i) % 7 for i in range((b - a) % 7 + 1))  # Fri-Mon wraps over the weekend
    return frozenset(out)


def parse_windows(text: str | None) -> tuple[Window, ...]:
    """``"Sat 02:00-04:00; Sun 02:00-04:00"`` -> windows; empty or None: no restriction."""
    if not text or not text.strip():
        return ()
    parts = [p for p in text.split(";") if p.strip()]
    if len(parts) > MAX_WINDOWS:
        raise Invalid(f"at most {MAX_WINDOWS} windows")
    out = []
    for p in parts:
        m = WINDOW_RE.match(p)
        if m is None:
            raise Invalid(f"window {p.strip()!r}: {FORMS}")
        start, end = _minutes(m["start"], "start"), _minutes(m["end"], "end")
        if start == end:
            raise Invalid(f"window {p.strip()!r} is empty (it starts when it ends)")
        out.append(Window(_days(m["days"]), start, end))
    return tuple(out)


def window_text(windows: tuple[Window, ...]) -> str:
    """The canonical text of ``windows`` (what :func:`parse_windows` reads back to the same windows)."""
    def days(w: Window) -> str:
        return "daily" if len(w.days) == 7 else ",".join(DAYS[d].capitalize() for d in sorted(w.days))
    return "; ".join(f"{days(w)} {w.start // 60:02d}:{w.start % 60:02d}-{w.end // 60:02d}:{w.end % 60:02d}"
                     for w in windows)


def _open_at(w: Window, t: datetime) -> datetime | None:
    """When window ``w`` is open at ``t``: the time it opened; else None."""
    for back in (0, 1):  # it may have opened yesterday and run past midnight
        day = (t - timedelta(days=back)).replace(hour=0, minute=0, second=0, microsecond=0)
        if day.weekday() in w.days:
            opened = day + timedelta(minutes=w.start)
            if opened <= t < opened + timedelta(minutes=w.length()):
                return opened
    return None


def next_opening(windows: tuple[Window, ...], now: float) -> float | None:
    """The first time at or after ``now`` inside one of ``windows`` (``now`` itself if open); None: never."""
    t = datetime.fromtimestamp(now, UTC)
    if any(_open_at(w, t) for w in windows):
        return now
    best: datetime | None = None
    today = t.replace(hour=0, minute=0, second=0, microsecond=0)
    for w in windows:
        for ahead in range(8):
            day = today + timedelta(days=ahead)
            opens = day + timedelta(minutes=w.start)
            if day.weekday() in w.days and opens > t:
                best = opens if best is None or opens < best else best
                break
    return best.timestamp() if best is not None else None


def may_begin_wave(now: float, start_at: float | None, windows: tuple[Window, ...]) -> Decision:
    """May a rollout begin a wave at ``now``? Not before ``start_at``; only inside a window, if any are given."""
    earliest = max(now, start_at or now)
    if not windows:
        if earliest > now:
            return Decision(False, earliest, f"scheduled to start at {_iso(earliest)}")
        return Decision(True)
    opens = next_opening(windows, earliest)
    if opens is None:
        return Decision(False, None, f"no maintenance window ever opens ({window_text(windows)})")
    if opens <= now:
        return Decision(True)
    why = f"scheduled to start at {_iso(earliest)}; " if earliest > now else ""
    return Decision(False, opens, f"{why}outside the maintenance window ({window_text(windows)}); "
                                  f"the next wave begins at {_iso(opens)}")


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%SZ")
