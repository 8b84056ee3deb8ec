"""GET /api/v1/devices: search, filters, keyset pages and counts, in SQL, with the unpaged list kept for old clients."""

from __future__ import annotations

import pytest

from hub.seed import enrol, play
from hub.testing import wait_until
from tests.rollout_support import build_versions

pytestmark = pytest.mark.hubstore  # run again on PostgreSQL by scripts/test.sh (instr, LIKE: hub/store/dialect.py)

N = 120  # 30 per site


@pytest.fixture
def seeded(server, admin, probe, tmp_path):
    ids = enrol(admin, N, prefix="dl")
    [module] = build_versions(admin, tmp_path, n=1)
    admin.post("/api/v1/deployments", json={"name": "edge-b", "module": "scorer:1", "target": "site=berlin",
                                            "gates": {"max_install_failure_rate": 1}}).raise_for_status()
    berlin = ids[0::4]
    digest = module["digest"]
    play(probe, berlin[:10], module=("scorer", 1, digest), state="running")
    play(probe, berlin[10:13], module=("scorer", 1, digest), state="failed", error="health check: boom")
    play(probe, ids[1:40:4], online=True)  # 10 paris devices connected, reporting nothing
    wait_until(lambda: admin.get("/api/v1/devices", params={"status": "failed", "limit": 5}).json()["total"] == 3,
               20, what="the failed reports stored")
    wait_until(lambda: admin.get("/api/v1/devices", params={"status": "online", "limit": 5}).json()["total"] == 23,
               20, what="the status messages stored")
    return ids, berlin


def page(admin, **params):
    r = admin.get("/api/v1/devices", params=params)
    assert r.status_code == 200, r.text
    return r.json()


def test_pages_walk_every_match_once_in_id_order_with_the_total(seeded, admin):
    ids, _ = seeded
    seen, cursor, pages = [], None, 0
    while True:
        p = page(admin, limit=50, **({"cursor": cursor} if cursor else {}))
        assert p["total"] == N and len(p["items"]) <= 50
        seen += [d["id"] for d in p["items"]]
        pages += 1
        cursor = p["next_cursor"]
        if cursor is None:
            break
    assert seen == sorted(ids) and pages == 3
    assert p["counts"]["online"] == 23 and p["counts"]["offline"] == N - 23


def test_filters_by_status_label_deployment_and_search(seeded, admin):
    ids, berlin = seeded
    failed = page(admin, status="failed", limit=100)
    assert sorted(d["id"] for d in failed["items"]) == sorted(berlin[10:13])
    assert all(d["state"] == "failed" and d["modules"][0]["error"] == "health check: boom" for d in failed["items"])
    assert page(admin, status="running", limit=100)["total"] == 10
    assert page(admin, status="pending", limit=100)["total"] == len(berlin) - 13  # given scorer:1, not reported yet
    assert page(admin, status="idle", limit=100)["total"] == N - len(berlin)
    assert page(admin, status="offline", limit=100)["total"] == N - 23

    berlin_page = page(admin, label="site=berlin", limit=100)
    assert sorted(d["id"] for d in berlin_page["items"]) == sorted(berlin)
    assert berlin_page["counts"]["failed"] == 3  # counts per status within the other filters
    assert page(admin, label="site!=berlin,fleet=dl", limit=100)["total"] == N - len(berlin)
    assert page(admin, label="site=Berlin", limit=100)["total"] == 0  # label values are case-sensitive
    assert page(admin, deployment="edge-b", limit=100)["total"] == len(berlin)
    assert page(admin, deployment="edge", limit=100)["total"] == 0  # a name, not a prefix

    assert [d["id"] for d in page(admin, q=ids[7], limit=10)["items"]] == [ids[7]]
    assert page(admin, q="TOKYO", limit=100)["total"] == N // 4  # a label value, any case
    assert page(admin, q="scor", limit=100)["total"] == len(berlin)  # the start of a module name
    assert page(admin, q="bundle", limit=100)["total"] == 0  # not the JSON around it
    assert page(admin, q="%", limit=100)["total"] == 0 and page(admin, q="_", limit=100)["total"] == 0

    both = page(admin, label="site=berlin", status="online", q="dl-000", limit=100)
    assert {d["id"] for d in both["items"]} == {i for i in berlin[:13] if i.startswith("dl-000")}


def test_unpaged_list_stays_a_list_and_bad_filters_are_refused_with_the_reason(seeded, admin):
    ids, berlin = seeded
    everything = admin.get("/api/v1/devices").json()
    assert isinstance(everything, list) and [d["id"] for d in everything] == sorted(ids)
    assert [d["id"] for d in admin.get("/api/v1/devices", params={"status": "failed"}).json()] == sorted(berlin[10:13])
    for params, reason in [({"status": "broken"}, "status 'broken' is not one of"),
                           ({"label": "site==berlin"}, "use '='"),
                           ({"label": "dl-00001"}, "is not label conditions"),
                           ({"limit": 0}, "limit")]:
        r = admin.get("/api/v1/devices", params=params)
        assert r.status_code in (400, 422) and reason in r.text, (params, r.text)


def test_device_detail_has_desired_reported_and_totals_and_summary_counts_by_state(seeded, admin):
    ids, berlin = seeded
    d = admin.get(f"/api/v1/devices/{berlin[10]}").json()
    assert d["state"] == "failed" and d["desired"][0]["deployment"] == "edge-b"
    assert d["reported"]["modules"][0]["error"] == "health check: boom" and d["facts"]["arch"] == "arm64"
    s = admin.get("/api/v1/fleet/summary").json()
    assert s["devices"] == N and s["online"] == 23
    assert s["by_state"] == {"idle": N - len(berlin), "pending": len(berlin) - 13, "running": 10, "failed": 3}


def test_rollout_status_pages_its_devices_and_counts_per_wave(seeded, admin):
    ids, berlin = seeded
    whole = admin.get("/api/v1/rollouts/edge-b").json()
    assert whole["phase"] == "installing" and len(whole["devices"]) == whole["devices_total"] == len(berlin)
    assert whole["by_wave"] == [{"wave": 1, "label": "100%", "devices": len(berlin),
                                 "counts": {"running": 10, "failed": 3, "pending": len(berlin) - 13}}]
    seen, cursor = [], ""
    while True:
        p = admin.get("/api/v1/rollouts/edge-b", params={"state": "pending", "limit": 7, "cursor": cursor}).json()
        assert p["devices_total"] == len(berlin) - 13 and p["counts"] == whole["counts"]
        seen += [d["id"] for d in p["devices"]]
        if not (cursor := p["next_cursor"]):
            break
    assert seen == sorted(set(berlin) - set(berlin[:13]))
    one = admin.get("/api/v1/rollouts/edge-b", params={"q": berlin[5].upper(), "limit": 5}).json()
    assert [d["id"] for d in one["devices"]] == [berlin[5]] and one["devices"][0]["state"] == "running"


def test_states_of_rows_written_before_the_column_are_filled_at_start(seeded, server, admin):
    ids, berlin = seeded
    before = admin.get("/api/v1/fleet/summary").json()["by_state"]
    with server.hub.db.transaction() as tx:
        tx.execute("UPDATE devices SET state = NULL")  # as migration 5 leaves an older hub's rows
    assert server.hub.fleet.fill_states() == N
    assert admin.get("/api/v1/fleet/summary").json()["by_state"] == before
    assert server.hub.fleet.fill_states() == 0
