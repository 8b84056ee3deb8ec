"""Maintenance windows and scheduled rollouts (issue 14): the pure decision checked minute by minute over whole
weeks against a brute-force oracle, and the controller holding a real hub's rollout until its time."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import pytest

from hub.errors import Invalid
from hub.rollout.schedule import Window, may_begin_wave, next_opening, parse_windows, window_text
from hub.testing import wait_until
from tests.cli_setup import enrol
from tests.clirun import as_json, cli
from tests.rollout_support import build_versions, rollout

WEEK = 7 * 1440
MONDAY = datetime(2026, 11, 30, tzinfo=UTC).timestamp()  # a Monday, 00:00 UTC

CASES = ["Sat 02:00-04:00", "Mon-Fri 22:00-02:00", "daily 23:30-00:15", "Fri-Mon 12:00-13:00",
         "sun 00:00-24:00", "Tue 05:00-06:00; Thursday 05:30-07:00; Sun 23:00-01:00", "Wed,Fri 10:00-10:01"]


def next_open_minute(open_: set[int]) -> list[int]:
    """For each minute of two weeks, the first open minute at or after it (one backward pass)."""
    out, nxt = [0] * (2 * WEEK), None
    for m in range(3 * WEEK - 1, -1, -1):
        if m % WEEK in open_:
            nxt = m
        if m < 2 * WEEK:
            out[m] = nxt
    return out


def oracle_minutes(windows: tuple[Window, ...]) -> set[int]:
    """Every open minute of the week (0 = Monday 00:00), laid out the slow obvious way."""
    out = set()
    for w in windows:
        for d in w.days:
            for k in range(w.length()):
                out.add((d * 1440 + w.start + k) % WEEK)
    return out


@pytest.mark.parametrize("text", CASES)
def test_the_decision_matches_the_oracle_at_every_minute_of_the_week(text):
    windows = parse_windows(text)
    assert parse_windows(window_text(windows)) == windows  # the stored text reads back the same
    open_ = oracle_minutes(windows)
    nxt = next_open_minute(open_)
    for minute in range(WEEK):
        now = MONDAY + minute * 60 + 7  # a few seconds into the minute
        got = may_begin_wave(now, None, windows)
        assert got.ok == (minute in open_), (text, minute)
        if not got.ok:
            assert got.at == MONDAY + nxt[minute] * 60, (text, minute)  # the minute the next window opens
            assert "outside the maintenance window" in got.reason


@pytest.mark.parametrize("text", ["", "Sat 02:00-04:00", "Mon-Fri 22:00-02:00"])
def test_a_start_time_and_windows_together(text):
    windows = parse_windows(text)
    nxt = next_open_minute(oracle_minutes(windows) if windows else set(range(WEEK)))
    for start in range(0, WEEK, 331):  # start times spread over the week
        start_at = MONDAY + start * 60
        for minute in range(0, WEEK, 29):
            now = MONDAY + minute * 60
            got = may_begin_wave(now, start_at, windows)
            first = nxt[max(minute, start)]
            assert got.ok == (first == minute), (text, start, minute)
            assert got.ok or got.at == MONDAY + first * 60


def test_windows_that_mean_nothing_are_refused_with_the_reason():
    for bad, why in [("Sat 2-4", "DAYS HH:MM-HH:MM"), ("Sa 02:00-04:00", "not a day"), ("Sat 25:00-26:00", "time"),
                     ("Sat 02:00-02:00", "empty"), ("Funday 01:00-02:00", "not a day")]:
        with pytest.raises(Invalid, match=why):
            parse_windows(bad)
    assert parse_windows("") == () and may_begin_wave(MONDAY, None, ()).ok
    assert next_opening((), MONDAY) is None
    never = may_begin_wave(MONDAY, None, (Window(frozenset(), 60, 120),))
    assert not never.ok and never.at is None and "ever opens" in never.reason


@pytest.fixture
def hub_options() -> dict:
    return {"rollout_tick_s": 0.2}


def closed_window_now() -> str:
    """A one-hour window 12 hours from now: closed now, whatever the time."""
    t = datetime.fromtimestamp(time.time() + 12 * 3600, UTC)
    return f"{t:%a} {t:%H}:00-{(t.hour + 1) % 24:02d}:00"


@pytest.mark.hubstore  # run again on PostgreSQL by scripts/test.sh
def test_a_rollout_waits_for_its_window_and_start_time(server, admin, tmp_path):
    build_versions(admin, tmp_path, n=3)
    enrol(server, admin, "sched-0", {"ring": "sched"})
    window = closed_window_now()
    out = cli(server, "deploy", "edge", "sched", "--module", "scorer:1", "--target", "ring=sched",
              "--window", window).stderr
    assert f"waves begin in {window} (UTC)" in " ".join(out.split())
    st = rollout(admin, "sched")
    assert st["state"] == "wave[1].scheduled" and "outside the maintenance window" in st["reason"]
    assert 11 * 3600 < st["begins_at"] - time.time() < 13 * 3600
    assert admin.get("/api/v1/devices/sched-0").json()["modules"] == []  # nobody was told anything yet
    assert "outside the maintenance window" in cli(server, "rollout", "status", "sched").stdout

    # v2 not before an hour from now: the update keeps the window and adds the start time
    later = time.time() + 3600
    st = as_json(cli(server, "deployment", "update", "sched", "--module", "scorer:2", "--start-at", str(later),
                     "--json"))
    assert st["plan"]["window"] == window and "window" in st["plan"]["inherited"]
    assert st["plan"]["start_at"] == pytest.approx(later)
    st = rollout(admin, "sched")
    assert st["phase"] == "scheduled" and st["begins_at"] >= later and "scheduled to start at" in st["reason"]

    # v3 with the window cleared and no start time: it begins at once
    admin.patch("/api/v1/deployments/sched", json={"module": "scorer:3", "window": ""}).raise_for_status()
    wait_until(lambda: rollout(admin, "sched")["phase"] in ("installing", "succeeded"), 30, 0.1, "the wave to begin")
    assert [m["version"] for m in admin.get("/api/v1/devices/sched-0").json()["modules"]] == [3]


@pytest.mark.hubstore  # run again on PostgreSQL by scripts/test.sh
def test_a_scheduled_rollout_with_a_shadow_phase_begins_with_the_shadow(server, admin, tmp_path):
    build_versions(admin, tmp_path, n=2)
    admin.post("/api/v1/deployments", json={"name": "sched-shadow", "module": "scorer:1",
                                            "target": "ring=nobody"}).raise_for_status()
    wait_until(lambda: rollout(admin, "sched-shadow")["phase"] == "succeeded", 30, 0.1, "v1 to go live")
    start = time.time() + 1.5
    admin.patch("/api/v1/deployments/sched-shadow", json={"module": "scorer:2", "shadow_s": 1,
                                                          "start_at": start}).raise_for_status()
    st = rollout(admin, "sched-shadow")
    assert st["phase"] == "scheduled" and st["plan"]["shadow_s"] == 1 and st["begins_at"] >= start
    wait_until(lambda: rollout(admin, "sched-shadow")["phase"] != "scheduled", 30, 0.1, "the start time")
    moves = [e["action"] for e in admin.get("/api/v1/audit", params={"subject": "sched-shadow"}).json()]
    assert moves[:2] == ["rollout.shadowing", "rollout.scheduled"]  # newest first: the shadow phase, not a wave
