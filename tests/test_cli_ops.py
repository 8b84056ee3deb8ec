"""The CLI as an operator reads it (issue 14): user text shown as typed, 80 columns, readable times, help that
names every option whole, one-line refusals. Each command runs as ``python -m edgefleet`` against a real hub."""

from __future__ import annotations

import re
import subprocess
import sys

import httpx

from tests.cli_setup import RAW_TIME, built_module, deploy, enrol, fits
from tests.clirun import ROOT, cli


def test_user_text_is_shown_as_typed_never_read_as_markup(server, admin, tmp_path):
    built_module(server, tmp_path, {"note": "[/] closes nothing"}, "[bold]not bold[/bold] [null, 4]")
    assert "note: [/] closes nothing" in cli(server, "model", "list", columns=200).stdout
    shown = cli(server, "model", "show", "lr:1", columns=200).stdout
    assert "[bold]not bold[/bold] [null, 4]" in shown
    inputs = shown.split("inputs", 1)[1]
    assert "shape=[null, 4]" in inputs and '"shape": }' not in shown  # the input's shape, whole
    enrol(server, admin, "dev-markup", {"room": "[/]", "x": "[red]"})
    devices = cli(server, "device", "list", columns=200).stdout
    assert "room: [/]" in devices and "x: [red]" in devices
    refused = cli(server, "model", "show", "[/]:1", ok=False)  # the hub's reason echoes it: shown, no crash
    assert refused.returncode == 1 and "[/]" in refused.stderr and "Traceback" not in refused.stderr


def test_serve_on_a_directory_that_is_not_a_bundle_says_so_in_one_line(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    proc = subprocess.run([sys.executable, "-m", "edgefleet", "serve", str(tmp_path), "--key", "k", "--port", "0"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert "is not a bundle directory" in proc.stderr and "release.json" in proc.stderr


def test_device_and_deployment_show_fit_80_columns_with_readable_times(server, admin, tmp_path):
    module = built_module(server, tmp_path)
    enrol(server, admin, "dev-80", {"site": "berlin", "rack": "r-17-a-very-long-label-value-for-the-rack"})
    deploy(admin, "edge-80", module, "site=berlin")
    device = cli(server, "device", "show", "dev-80", columns=80).stdout
    fits(device)
    for key in ("labels", "modules", "last_seen", "revision"):
        assert re.search(rf"^\W*{key}\b", device, re.M), f"{key} not whole at the start of a row:\n{device}"
    deployment = cli(server, "deployment", "show", "edge-80", columns=80).stdout
    fits(deployment)
    assert re.search(r"created_at\W+20\d\d-\d\d-\d\d \d\d:\d\d:\d\dZ \(\d+s ago\)", deployment), deployment
    assert not RAW_TIME.search(deployment)
    assert isinstance(admin.get("/api/v1/deployments/edge-80").json()["created_at"], float)  # --json: as the API


def test_help_names_every_option_whole_at_80_columns(server):
    out = cli(server, "deploy", "edge", "--help", columns=80).stdout
    fits(out)
    for option in ("--device-max-error-rate", "--device-min-inferences", "--collect-rate", "--on-failure"):
        assert option in out, f"{option} cut in:\n{out}"


def test_docs_offer_a_bearer_scheme_on_the_operations_that_need_a_token(server, admin):
    spec = httpx.get(server.url + "/openapi.json").json()
    assert spec["components"]["securitySchemes"]["bearer"] == {
        "type": "http", "scheme": "bearer", "description": "an API token (edgefleet token create)"}
    assert spec["paths"]["/api/v1/devices"]["get"]["security"] == [{"bearer": []}]
    assert spec["paths"]["/api/v1/deployments/{name}"]["delete"]["security"] == [{"bearer": []}]
    assert "security" not in spec["paths"]["/api/v1/enroll"]["post"]  # the enrolment token is in the body
    # what "Try it out" sends once authorised: the token in the Authorization header
    ok = httpx.get(server.url + "/api/v1/devices", headers={"Authorization": f"Bearer {server.admin_token}"})
    assert ok.status_code == 200 and httpx.get(server.url + "/api/v1/devices").status_code == 401
