"""An application's hold on updates, seen at the hub (issue 14): the agent reports it in its reported state
(protocol §5 ``ReportedState.hold``), the hub shows it in ``device show`` (API and CLI) and names it in the
rollout's holding list. A real hub, a real agent (the simulator) over a real broker, the real CLI."""

from __future__ import annotations

import datetime

import msgspec
import pytest

from hub.fleet.device_state import active_hold
from hub.testing import wait_until
from protocol.messages import ReportedState
from simulator.fleet import Fleet
from tests.clirun import as_json, cli
from tests.rollout_support import all_running, build_versions, rollout, wait_rollout

REASON = "checkout in progress"


@pytest.fixture
def hub_options() -> dict:
    return {"rollout_tick_s": 0.2}


def hhmm(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%H:%M")


def test_the_hold_is_reported_only_while_it_lasts_and_older_reports_still_decode():
    assert active_hold(None, 100.0) is None and active_hold({"hold": None}, 100.0) is None
    assert active_hold({"hold": {"since": 0, "until": 100.0, "reason": "x"}}, 100.0) is None  # ended
    assert active_hold({"hold": {"since": 0, "until": "soon"}}, 1.0) is None  # not a time: no hold shown
    until = 1_767_225_600.0 + 3 * 3600 + 25 * 60  # 03:25 UTC
    assert active_hold({"hold": {"since": 1.0, "until": until, "reason": ""}}, 2.0) == {
        "since": 1.0, "until": until, "reason": "", "text": "held by app until 03:25: no reason given"}
    old = msgspec.json.decode(b'{"v": 1, "device": "d", "revision": 2, "ts": 1.0}', type=ReportedState)
    assert old.hold is None  # an agent that never holds leaves it out
    new = msgspec.json.decode(b'{"v": 1, "device": "d", "revision": 2, "ts": 1.0,'
                              b' "hold": {"since": 1.0, "until": 9.0, "reason": "busy"}}', type=ReportedState)
    assert new.hold is not None and (new.hold.until, new.hold.reason) == (9.0, "busy")
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(b'{"v": 1, "device": "d", "revision": 2, "ts": 1.0,'
                            b' "hold": {"since": 1.0, "until": 9.0, "reason": "' + b"x" * 201 + b'"}}', type=ReportedState)


def test_a_held_update_shows_in_device_show_and_in_the_rollouts_holding_list(server, admin, tmp_path):
    build_versions(admin, tmp_path, n=2)
    fleet = Fleet(server.url, server.admin_token, 2, tmp_path / "sim", rate=1, telemetry_interval=0.5, prefix="hd")
    fleet.start()
    try:
        held, free = fleet.device_ids()
        admin.post("/api/v1/deployments", json={"name": "hd", "module": "scorer:1", "target": "sim=true"}
                   ).raise_for_status()
        wait_rollout(admin, "hd", "succeeded")
        all_running(admin, [held, free], "scorer", 1)
        assert admin.get(f"/api/v1/devices/{held}").json()["hold"] is None

        view = fleet.defer(0, 900, REASON)
        assert view["held"] and view["reason"] == REASON
        text = f"held by app until {hhmm(view['until'])}: {REASON}"
        dev = wait_until(lambda: (d := admin.get(f"/api/v1/devices/{held}").json())["hold"] and d, 30, 0.1,
                         "the hold reported to the hub")
        assert dev["hold"] == {"since": pytest.approx(view["until"] - 900, abs=1), "until": view["until"],
                               "reason": REASON, "text": text}
        shown = as_json(cli(server, "device", "show", held, "--json"))
        assert shown["hold"]["text"] == text
        table = cli(server, "device", "show", held, columns=200).stdout
        assert text in table and "hold" in table
        assert as_json(cli(server, "device", "show", free, "--json"))["hold"] is None

        admin.patch("/api/v1/deployments/hd", json={"module": "scorer:2"}).raise_for_status()
        all_running(admin, [free], "scorer", 2)  # the other device installs at once
        st = wait_until(lambda: (r := rollout(admin, "hd")).get("holding") and r, 30, 0.2, "the wave held")
        assert [(d["id"], d["hold"]["text"]) for d in st["holding"]] == [(held, text)]
        assert admin.get(f"/api/v1/devices/{held}").json()["modules"][0]["version"] == 2  # desired, not installed
        out = cli(server, "rollout", "status", "hd", columns=250).stdout
        assert f"waits for 1 device(s): {held} ({text})" in " ".join(out.split()), out
        follow = cli(server, "rollout", "status", "hd", "--wait", "--timeout", "1", "--interval", "0.2", ok=False)
        assert follow.returncode == 5 and f"  {held} {text}" in follow.stdout.splitlines()[0], follow.stdout

        fleet.defer(0, None)  # the app releases it: the update goes ahead, the hub stops showing the hold
        wait_rollout(admin, "hd", "succeeded")
        all_running(admin, [held], "scorer", 2)
        wait_until(lambda: admin.get(f"/api/v1/devices/{held}").json()["hold"] is None, 30, 0.1, "the hold gone")
        assert "held by app" not in cli(server, "rollout", "status", "hd", columns=250).stdout
    finally:
        fleet.stop()
