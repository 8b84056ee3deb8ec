"""The web console in a real browser (Debian chromium driven by Playwright) against a real hub and simulated fleet.

Needs `apt-get install chromium` and the `playwright` Python package (scripts/test.sh installs both; no browser
download: Playwright drives the system chromium through ``executable_path``).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest

from simulator.fleet import Fleet
from tests.rollout_support import all_running, build_versions, rollout, wait_rollout

N = 4
NAME = "console-demo"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 20_000


def chromium_path() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.fail("the console tests need Debian's chromium: apt-get install -y chromium (scripts/test.sh does it)")
    return path


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the console tests need Playwright: pip install -e '.[test]'")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture
def hub_options() -> dict:
    return {"rollout_tick_s": 0.2}


@pytest.fixture
def hub_and_fleet(server, admin, tmp_path):
    fleet = Fleet(server.url, server.admin_token, N, tmp_path / "sim", rate=2, telemetry_interval=0.5, prefix="cs")
    try:
        build_versions(admin, tmp_path, n=2)
        fleet.start()
        admin.post("/api/v1/deployments", json={"name": NAME, "module": "scorer:1", "target": "sim=true"}
                   ).raise_for_status()
        wait_rollout(admin, NAME, "succeeded")
        all_running(admin, fleet.device_ids(), "scorer", 1)
        yield server, admin, fleet
    finally:
        fleet.stop()


def sign_in(page, url: str, token: str) -> None:
    page.goto(url + "/")  # the hub's root redirects to the console
    page.fill("#token", token)
    page.click("#login button[type=submit]")


def test_console_shows_the_fleet_and_drives_a_rollout_with_role_checks_and_no_outside_requests(hub_and_fleet, browser):
    server, admin, fleet = hub_and_fleet
    ids = fleet.device_ids()
    # a label with markup in it must show as text, never as HTML
    hostile = '<img src=x onerror="window.pwned=1">'
    admin.patch(f"/api/v1/devices/{ids[0]}", json={"labels": {"note": hostile}}).raise_for_status()

    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    try:
        # a wrong token is refused with the hub's reason, and the console stays on the sign-in form
        sign_in(page, server.url, "not-a-token")
        page.wait_for_selector("#login-error:has-text('Token refused')")
        assert page.is_visible("#login") and not page.is_visible("#nav")

        sign_in(page, server.url, server.admin_token)
        page.wait_for_selector(f"[data-card=online] .value:text-is('{N} / {N}')")

        # devices: one row each, the module running, the hostile label as literal text
        page.click("#nav a[data-view=devices]")
        page.wait_for_function(f"document.querySelectorAll('tr[data-device]').length === {N}")
        for device in ids:
            assert "scorer:1 running" in page.inner_text(f"tr[data-device='{device}']")
        assert hostile in page.inner_text(f"tr[data-device='{ids[0]}']")
        assert page.query_selector("#view img") is None and page.evaluate("window.pwned") is None
        page.fill("input[type=search]", ids[1])
        page.wait_for_function("document.querySelectorAll('tr[data-device]').length === 1")

        # deployments: start a waved update with a long bake, watch it, pause and resume it from the page
        admin.patch(f"/api/v1/deployments/{NAME}", json={"module": "scorer:2", "strategy": "waves:50,100",
                                                         "bake_s": 600}).raise_for_status()
        page.click("#nav a[data-view=deployments]")
        page.click(f"tr[data-deployment='{NAME}'] a")
        page.wait_for_selector("[data-count=running]:text-is('running: 2')")  # wave 1: half the fleet on v2
        page.wait_for_selector("[data-count=waiting]:text-is('waiting: 2')")
        page.click("button[data-action=pause]")
        page.wait_for_selector("#toast:has-text('pause: done')")
        assert rollout(admin, NAME)["phase"] == "paused"
        page.wait_for_selector(".pill.state-paused")
        page.click("button[data-action=resume]")
        page.wait_for_selector("#toast:has-text('resume: done')")
        assert rollout(admin, NAME)["phase"] != "paused"

        # a viewer sees everything but cannot act: the hub's 403 reason is shown, nothing changes
        viewer = admin.post("/api/v1/tokens", json={"name": "console-viewer", "role": "viewer"}).json()["token"]
        page.click("#logout")
        sign_in(page, server.url, viewer)
        page.wait_for_selector(f"[data-card=online] .value:text-is('{N} / {N}')")
        page.goto(f"{server.url}/console/#/deployments/{NAME}")
        page.click("button[data-action=pause]")
        page.wait_for_selector("#toast.bad:has-text('pause refused')")
        assert "operator" in page.inner_text("#toast")
        assert rollout(admin, NAME)["phase"] != "paused"

        # the API docs render from the hub's own copy of Swagger UI (no CDN either)
        page.goto(f"{server.url}/docs")
        page.wait_for_selector(".opblock-tag")
        assert "/api/v1/models" in page.inner_text("#swagger-ui")
    finally:
        context.close()

    origin = urlsplit(server.url).netloc
    outside = [u for u in requests if urlsplit(u).netloc != origin]
    assert not outside, f"the console reached outside the hub (it must work offline): {outside}"
    assert any(u.endswith("/console/console.js") for u in requests)
    assert any(u.endswith("/_swagger/swagger-ui-bundle.js") for u in requests)
