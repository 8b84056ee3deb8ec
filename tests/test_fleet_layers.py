"""Layered deployments: per module the highest priority wins, per device; labels edited through the API move it."""

from __future__ import annotations

import httpx
import pytest

from tests.rollout_support import build_versions

pytestmark = pytest.mark.hubstore  # run again on PostgreSQL by scripts/test.sh


def enrol(server, admin, device: str, **labels: str) -> None:
    [token] = admin.post("/api/v1/enrollment-tokens", json={"labels": labels}).json()["tokens"]
    httpx.post(server.url + "/api/v1/enroll", json={"token": token, "device_id": device}).raise_for_status()


def supplied(admin, device: str) -> dict[str, tuple[int, str]]:
    """module name -> (version, deployment that supplies it), as the API shows a device."""
    return {m["name"]: (m["version"], m["deployment"]) for m in admin.get(f"/api/v1/devices/{device}").json()["modules"]}


def test_base_and_site_overlay_resolve_per_device(server, admin, tmp_path):
    build_versions(admin, tmp_path, "scorer", 2)
    build_versions(admin, tmp_path / "x", "detector", 1)
    enrol(server, admin, "ly-berlin-1", site="berlin", tier="prod")
    enrol(server, admin, "ly-berlin-dev", site="berlin", tier="dev")
    enrol(server, admin, "ly-paris-1", site="paris", tier="prod")

    def post(**body):
        r = admin.post("/api/v1/deployments", json=body)
        assert r.status_code == 200, r.text
        return r.json()

    post(name="base", module="scorer:1", target="*")
    post(name="base-detector", module="detector:1", target="tier!=dev")
    post(name="berlin", module="scorer:2", target="site=berlin,tier!=dev", priority=10, collect_rate_ppm=5000)
    assert supplied(admin, "ly-berlin-1") == {"scorer": (2, "berlin"), "detector": (1, "base-detector")}
    assert supplied(admin, "ly-berlin-dev") == {"scorer": (1, "base")}
    assert supplied(admin, "ly-paris-1") == {"scorer": (1, "base"), "detector": (1, "base-detector")}
    desired = server.hub.db.one("SELECT desired FROM devices WHERE id = 'ly-berlin-1'")["desired"]
    assert '"collect_rate_ppm":5000' in desired  # the overlay's data-collection override

    # a lower-priority overlay does not win; the overlay's label moves a device in and out
    post(name="low", module="scorer:1", target="site=paris", priority=-5)
    assert supplied(admin, "ly-paris-1")["scorer"] == (1, "base")
    r = admin.patch("/api/v1/devices/ly-paris-1", json={"labels": {"site": "berlin"}})
    assert r.status_code == 200 and r.json()["labels"] == {"site": "berlin", "tier": "prod"}
    assert supplied(admin, "ly-paris-1")["scorer"] == (2, "berlin")
    admin.patch("/api/v1/devices/ly-paris-1", json={"labels": {"tier": None}}).raise_for_status()
    assert admin.get("/api/v1/devices/ly-paris-1").json()["labels"] == {"site": "berlin"}
    admin.patch("/api/v1/devices/ly-berlin-1", json={"unset": ["site"]}).raise_for_status()
    assert supplied(admin, "ly-berlin-1") == {"scorer": (1, "base"), "detector": (1, "base-detector")}

    # removing the overlay gives every device the base again; all of it is in the audit log
    admin.delete("/api/v1/deployments/berlin").raise_for_status()
    assert supplied(admin, "ly-paris-1")["scorer"] == (1, "base")
    actions = [e["action"] for e in admin.get("/api/v1/audit").json()]
    assert {"deployment.revision", "deployment.deleted", "device.labels", "device.enrolled"} <= set(actions)
    assert admin.patch("/api/v1/devices/nope", json={"labels": {"a": "b"}}).status_code == 404
