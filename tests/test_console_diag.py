"""The console's device page as an operations tool (issue 14), in a real chromium (Playwright, Debian's browser):
signed diagnostic commands sent from the page to real agents (the simulator) over a real broker, their results
and history; an application's hold on updates shown on the device's and the deployment's pages; a viewer's
token offered no commands."""

from __future__ import annotations

import datetime
import json
import logging
from urllib.parse import urlsplit

import pytest

from hub.testing import wait_until
from simulator.fleet import Fleet
from tests.cli_setup import enrol
from tests.rollout_support import all_running, build_versions, rollout, wait_rollout
from tests.test_console import TIMEOUT_MS, browser, sign_in  # noqa: F401  (browser: the fixture)

REASON = "surgery in progress"


@pytest.fixture
def hub_options() -> dict:
    return {"rollout_tick_s": 0.2}


@pytest.fixture
def fleet(server, admin, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="edgefleet")  # as the daemon runs (edgefleet agent run logs at INFO)
    build_versions(admin, tmp_path, n=2)
    live = Fleet(server.url, server.admin_token, 2, tmp_path / "sim", rate=2, telemetry_interval=0.5, prefix="cd")
    try:
        live.start()
        admin.post("/api/v1/deployments", json={"name": "cd", "module": "scorer:1", "target": "sim=true"}
                   ).raise_for_status()
        wait_rollout(admin, "cd", "succeeded")
        all_running(admin, live.device_ids(), "scorer", 1)
        yield live
    finally:
        live.stop()


def test_logs_commands_and_a_held_update_on_the_device_page(server, admin, fleet, browser):  # noqa: F811
    device, other = fleet.device_ids()
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    posts: list[str] = []
    page.on("request", lambda r: posts.append(r.url) if r.method == "POST" else None)
    try:
        sign_in(page, server.url, server.admin_token)
        page.wait_for_selector("#nav:not([hidden])")
        page.goto(f"{server.url}/console/#/devices/{device}")
        page.wait_for_selector("[data-section=modules] tr[data-module=scorer]:has-text('running')")
        page.wait_for_selector("[data-commands=history] :text('no commands sent to this device yet')")

        # the agent's log lines about one module, in a scrollable pre with its size
        page.select_option("select[name=module]", "scorer")
        page.fill("input[name=lines]", "50")
        page.click("button[data-command=logs]")
        page.wait_for_selector("[data-commands=result] [data-state=done]")
        text = page.inner_text("pre[data-result=logs]")
        assert "module scorer" in text and ": committed" in text, text
        [sent] = admin.get(f"/api/v1/devices/{device}/commands").json()
        assert sent["name"] == "logs" and sent["args"] == {"module": "scorer", "lines": 50}
        assert sent["created_by"] == "admin" and sent["state"] == "done"
        size = int(page.get_attribute("[data-result-size]", "data-result-size"))
        assert size == len("\n".join(sent["result"]["lines"]).encode())
        assert f"{len(sent['result']['lines'])} lines" in page.inner_text("[data-result-size]")
        overflow = page.eval_on_selector("pre[data-result=logs]", "e => getComputedStyle(e).overflow")
        assert overflow == "auto"

        # a support bundle, then a module restart (confirmed), each shown when the device answers
        page.click("button[data-command=support_bundle]")
        page.wait_for_selector("[data-commands=result] [data-state=done]:has-text('support_bundle')")
        bundle = json.loads(page.inner_text("pre[data-result=support_bundle]"))
        assert bundle["device"] == device and bundle["journal"]["modules"]["scorer"]["state"] == "committed"
        before = fleet.agents[0].active["scorer"]
        page.once("dialog", lambda d: d.accept())
        page.click("button[data-command=restart_module]")
        page.wait_for_selector("[data-commands=result] [data-state=done]:has-text('restart_module')")
        assert json.loads(page.inner_text("pre[data-result=restart_module]")) == {
            "module": "scorer", "restarted": True, "running": True}
        assert fleet.agents[0].active["scorer"] is not before

        # the history, newest first; an older result shown again from it
        page.wait_for_function("document.querySelectorAll('tr[data-command-row]').length === 3")
        names = page.locator("tr[data-command-row]").evaluate_all("rows => rows.map(r => r.dataset.name)")
        assert names == ["restart_module", "support_bundle", "logs"]
        page.click("tr[data-name=logs] button[data-show]")
        page.wait_for_selector("pre[data-result=logs]")
        assert "module scorer" in page.inner_text("pre[data-result=logs]")

        # the app on the device holds the update: the device page and the deployment page say so, and why
        view = fleet.defer(0, 900, REASON)
        until = datetime.datetime.fromtimestamp(view["until"], datetime.UTC).strftime("%H:%M")
        line = f"held by app until {until}: {REASON}"
        page.wait_for_selector(f"[data-hold]:has-text('{line}')")
        page.goto(f"{server.url}/console/#/devices")
        page.wait_for_selector(f"tr[data-device='{device}'] [data-list-hold]:has-text('{line}')")
        assert page.query_selector(f"tr[data-device='{other}'] [data-list-hold]") is None
        admin.patch("/api/v1/deployments/cd", json={"module": "scorer:2"}).raise_for_status()
        all_running(admin, [other], "scorer", 2)
        wait_until(lambda: rollout(admin, "cd").get("holding_count") == 1, 30, 0.2, "the wave held by the app")
        page.goto(f"{server.url}/console/#/deployments/cd")
        page.wait_for_selector(f"[data-holding-device='{device}']:has-text('{line}')")
        page.wait_for_selector(f"tr[data-device='{device}'] [data-device-hold]:has-text('{line}')")
        fleet.defer(0, None)
        wait_rollout(admin, "cd", "succeeded")
        page.goto(f"{server.url}/console/#/devices/{device}")
        page.wait_for_selector("[data-section=modules] tr[data-module=scorer]:has-text('scorer:2')")
        page.wait_for_selector("[data-hold]", state="detached")

        # a device that is not connected: the command waits at the hub, and the page says so
        enrol(server, admin, "asleep", {})
        page.goto(f"{server.url}/console/#/devices/asleep")
        page.wait_for_selector("[data-commands=history] :text('no commands sent to this device yet')")
        page.click("button[data-command=support_bundle]")
        page.wait_for_selector("[data-commands=result] [data-state=sent]:has-text('the device answers when it is online')")
        page.wait_for_selector("tr[data-command-row] :text('waiting')")

        # a viewer's token: the page says commands need an operator, and sends none
        viewer = admin.post("/api/v1/tokens", json={"name": "diag-viewer", "role": "viewer"}).json()["token"]
        page.click("#logout")
        sign_in(page, server.url, viewer)
        page.wait_for_selector("#nav:not([hidden])")
        page.goto(f"{server.url}/console/#/devices/{device}")
        page.wait_for_selector("[data-commands=denied]:has-text('need an operator token')")
        assert "diag-viewer" in page.inner_text("[data-commands=denied]")
        assert page.query_selector("button[data-command]") is None
    finally:
        context.close()
    command_posts = [u for u in posts if urlsplit(u).path.endswith("/commands")]
    assert len(command_posts) == 4  # one per click; the viewer sent none
