"""The operations console at 10,000 devices, in a real chromium (Playwright, Debian's browser): the paged and
filtered device list, a device's page, a deployment's page with a held wave, and the charts.

10,000 devices are stored through the hub's store (hub/seed.py) and stay offline, except a few played over
MQTT; three real agents (the simulator) run a model and send real telemetry for the charts.
"""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

import pytest

from hub.seed import insert, play
from hub.testing import wait_until
from simulator.fleet import Fleet
from tests.rollout_support import all_running, build_versions, wait_rollout
from tests.test_console import TIMEOUT_MS, browser, sign_in  # noqa: F401  (browser: the fixture)

SEEDED = 10_000
LIVE = 3
TOTAL = SEEDED + LIVE
BERLIN = SEEDED // 4
FAILED = 4  # wave-1 devices played over MQTT: connected, reporting a failed install
ONLINE = LIVE + FAILED
WAVE1 = BERLIN // 10


@pytest.fixture
def hub_options() -> dict:
    return {"rollout_tick_s": 0.2}


@pytest.fixture
def fleet(server, admin, probe, tmp_path):
    [_, v2] = build_versions(admin, tmp_path, n=2)
    ids = insert(server.hub.db, SEEDED, prefix="ops")
    live = Fleet(server.url, server.admin_token, LIVE, tmp_path / "sim", rate=5, telemetry_interval=0.5, prefix="live")
    try:
        live.start()
        admin.post("/api/v1/deployments", json={"name": "live-edge", "module": "scorer:1", "target": "sim=true"}
                   ).raise_for_status()
        wait_rollout(admin, "live-edge", "succeeded")
        all_running(admin, live.device_ids(), "scorer", 1)
        # the Berlin quarter, offline: wave 1 (10%) is held by its devices until the wave timeout
        admin.post("/api/v1/deployments", json={"name": "berlin", "module": "scorer:2", "target": "site=berlin",
                                                "strategy": "waves:10,100", "wave_timeout_s": 3600,
                                                "gates": {"max_install_failure_rate": 1}}).raise_for_status()
        moved = admin.get("/api/v1/rollouts/berlin", params={"limit": FAILED, "state": "pending"}).json()["devices"]
        play(probe, [d["id"] for d in moved], module=("scorer", 2, v2["digest"]), state="failed", error="disk full")
        wait_until(lambda: admin.get("/api/v1/devices", params={"status": "failed", "limit": 1}).json()["total"] == FAILED,
                   20, what="the failed reports stored")
        # a device that matches live-edge only after its rollout: counted "new" there
        admin.patch(f"/api/v1/devices/{ids[1]}", json={"labels": {"sim": "true"}}).raise_for_status()
        yield ids, live
    finally:
        live.stop()


def test_console_pages_at_ten_thousand_devices(server, fleet, browser):  # noqa: F811
    ids, live = fleet
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    try:
        sign_in(page, server.url, server.admin_token)
        page.wait_for_selector(f"[data-card=online] .value:text-is('{ONLINE} / {TOTAL}')")

        # the device list: one page of 50, the true total, keyset paging, filters done by the hub
        page.click("#nav a[data-view=devices]")
        page.wait_for_selector(f"#device-count:text-is('1–50 of {TOTAL:,}')")
        assert page.locator("tr[data-device]").count() == 50
        first_rows = page.locator("tr[data-device]").evaluate_all("rows => rows.map(r => r.dataset.device)")
        page.click("button[data-page=next]")
        page.wait_for_selector(f"#device-count:text-is('51–100 of {TOTAL:,}')")
        second = page.locator("tr[data-device]").evaluate_all("rows => rows.map(r => r.dataset.device)")
        assert second[0] > first_rows[-1] and len(second) == 50
        page.click("button[data-page=prev]")
        page.wait_for_selector(f"#device-count:text-is('1–50 of {TOTAL:,}')")

        page.select_option("select[name=status]", "offline")
        page.wait_for_selector(f"#device-count:text-is('1–50 of {TOTAL - ONLINE:,}')")
        page.select_option("select[name=status]", "failed")
        page.wait_for_selector(f"#device-count:text-is('1–{FAILED} of {FAILED}')")
        texts = page.locator("tr[data-device]").all_inner_texts()
        assert all("disk full" in t for t in texts), texts
        # given a module, not installed: Berlin's wave 1 (scorer:2) and the device relabelled into live-edge
        page.select_option("select[name=status]", "pending")
        page.wait_for_selector(f"#device-count:text-is('1–50 of {WAVE1 - FAILED + 1:,}')")
        page.select_option("select[name=status]", "")
        page.fill("input[name=label]", "site=paris")
        page.wait_for_selector(f"#device-count:text-is('1–50 of {SEEDED // 4:,}')")
        page.fill("input[name=label]", "")
        page.fill("input[name=q]", ids[4242])
        page.wait_for_selector("#device-count:text-is('1–1 of 1')")
        page.fill("input[name=q]", "")
        page.click("button[data-status=online]")  # a count chip filters too
        page.wait_for_selector(f"#device-count:text-is('1–{ONLINE} of {ONLINE}')")
        device_calls = [parse_qs(urlsplit(u).query) for u in requests if urlsplit(u).path == "/api/v1/devices"]
        assert device_calls and all(c.get("limit") == ["50"] for c in device_calls), "the console fetched every device"

        # a device's page: modules, facts, config, reported state, telemetry charts, events
        agent = live.device_ids()[0]
        page.click(f"tr[data-device='{agent}'] a")
        page.wait_for_selector(f"#device-id:text-is('{agent}')")
        page.wait_for_selector("[data-section=modules] tr[data-module=scorer]:has-text('running')")
        assert "live-edge" in page.inner_text("[data-section=modules]")
        page.wait_for_selector("[data-section=facts] tr[data-key]")
        assert "scorer:1" in page.inner_text("[data-section=config]")
        assert '"state": "running"' in page.inner_text("[data-section=reported] pre")
        page.wait_for_selector("[data-section=events] :text('device.enrolled')")
        page.wait_for_selector("svg[data-chart=device-latency] path[data-series=p95][d^=M]", state="attached")
        page.wait_for_selector("svg[data-chart=device-errors] path[data-series=errors][d^=M]", state="attached")

        # a deployment whose wave is held: who holds it, a countdown, per-wave progress, filtered devices, history
        page.goto(f"{server.url}/console/#/deployments/berlin")
        page.wait_for_selector(f"[data-holding] p:has-text('wave 1 waits for {WAVE1 - FAILED} device(s)')")
        left = page.inner_text("[data-countdown]")
        assert left.startswith(("59m", "1h")), left
        assert page.locator("[data-holding-device]").count() == 100  # the hub names 100, the count says all
        page.wait_for_selector(f"tr[data-wave='1'] td:text-is('{WAVE1}')")
        assert "not started" in page.inner_text("tr[data-wave='2']")
        page.wait_for_selector(f"#rollout-device-count:text-is('50 shown of {BERLIN:,} matching')")
        page.select_option("#view select[name=state]", "waiting")
        page.wait_for_selector(f"#rollout-device-count:text-is('50 shown of {BERLIN - WAVE1:,} matching')")
        page.wait_for_selector("[data-section=history] tr[data-revision='1']")
        assert "no gate checked yet" in page.inner_text("[data-section=gates]")
        page.wait_for_function("left => document.querySelector('[data-countdown]').textContent !== left", arg=left,
                               timeout=5000)  # it counts down between polls

        # a finished deployment: its gate results, the "new" bucket, latency and error charts of its devices
        page.goto(f"{server.url}/console/#/deployments/live-edge")
        page.wait_for_selector("[data-count=new]:text-is('new: 1')")
        page.wait_for_selector(f"[data-count=running]:text-is('running: {LIVE}')")
        page.wait_for_selector("[data-section=gates] tr[data-gate]")
        page.wait_for_selector("svg[data-chart=deployment-latency] path[data-series=p50][d^=M]", state="attached")
        page.wait_for_selector("[data-section=charts] [data-chart=drift]")
    finally:
        context.close()
    origin = urlsplit(server.url).netloc
    assert all(urlsplit(u).netloc == origin for u in requests), "the console reached outside the hub"
