"""The fleet commands an operator was missing (issue 14): module list/show, deployment delete, device filters and
bulk labels, endpoint ports. Each runs as ``python -m edgefleet`` against a real hub."""

from __future__ import annotations

import re

import httpx

from tests.cli_setup import RAW_TIME, built_module, deploy, enrol, fits
from tests.clirun import as_json, cli
from tests.hubprocess import free_port


def test_module_list_show_and_deployment_delete(server, admin, tmp_path):
    module = built_module(server, tmp_path)
    mods = as_json(cli(server, "module", "list", "--json"))
    assert [(m["name"], m["version"]) for m in mods] == [("lrmod", 1)]
    shown = cli(server, "module", "show", module, columns=80).stdout
    fits(shown)
    assert "model.onnx" in shown and "lr:1" in shown and mods[0]["digest"][:16] in shown.replace("\n", "")
    deploy(admin, "to-delete", module)
    gone = as_json(cli(server, "deployment", "delete", "to-delete", "--json"))
    assert gone["active"] is False and admin.get("/api/v1/deployments/to-delete").json()["active"] is False


def test_device_filters_and_bulk_labels(server, admin, tmp_path):
    module = built_module(server, tmp_path)
    for i in range(4):
        enrol(server, admin, f"dev-{i}", {"site": "berlin" if i < 3 else "paris"})
    deploy(admin, "berlin", module, "site=berlin")

    def ids(*args: str) -> list[str]:
        return sorted(d["id"] for d in as_json(cli(server, "device", "list", *args, "--json")))

    assert ids("--status", "offline") == ["dev-0", "dev-1", "dev-2", "dev-3"]  # enrolled, never connected
    assert ids("--status", "pending", "--label", "site=berlin") == ["dev-0", "dev-1", "dev-2"]  # told, not reported
    assert ids("--status", "failed", "--status", "idle") == ["dev-3"]

    moved = as_json(cli(server, "device", "label", "--selector", "site!=paris", "tier=canary", "--json"))
    assert moved["matched"] == 3
    canary = admin.get("/api/v1/devices", params={"label": "tier=canary"}).json()
    assert sorted(d["id"] for d in canary) == ["dev-0", "dev-1", "dev-2"]
    unset = cli(server, "device", "label", "--selector", "dev-0,dev-1", "tier-")
    assert "2 device(s) relabelled" in unset.stderr
    assert [d["id"] for d in admin.get("/api/v1/devices", params={"label": "tier=canary"}).json()] == ["dev-2"]

    typo = cli(server, "device", "list", "--selector", "site==berlin", ok=False)
    assert typo.returncode == 1 and "site==berlin" in typo.stderr
    assert admin.get("/api/v1/devices", params={"status": "broken"}).json()["detail"].startswith(
        "status 'broken' is not one of")


def test_deploy_web_on_a_given_port_shows_the_whole_url_at_80_columns(server, admin, tmp_path):
    module = built_module(server, tmp_path)
    port = free_port()
    web = cli(server, "deploy", "web", "pinned-endpoint", "--module", module, "--port", str(port), columns=80).stdout
    fits(web)
    ep = admin.get("/api/v1/endpoints/pinned-endpoint").json()
    assert ep["port"] == port and ep["url"].endswith(f":{port}/endpoints/pinned-endpoint/score")
    assert f"url: {ep['url']}\n" in web  # whole, on a line of its own
    assert httpx.get(f"http://127.0.0.1:{port}/endpoints/pinned-endpoint").status_code in (200, 401)
    endpoint = cli(server, "endpoint", "show", "pinned-endpoint", columns=80).stdout
    fits(endpoint)
    assert re.search(r"^\W*versions\b", endpoint, re.M) and not RAW_TIME.search(endpoint)
