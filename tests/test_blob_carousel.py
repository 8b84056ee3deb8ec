"""The bundle-part carousel (hub/mqtt/blob_carousel.py): its decisions on an explicit clock, then with real agents."""

from __future__ import annotations

import os

import pytest

from hub.mqtt.blob_carousel import NEVER, Carousel
from modules.examples import write_logreg_onnx
from protocol.encoding import canonical_json
from protocol.manifest import CHUNK_SIZE
from simulator.fleet import Fleet
from tests.rollout_support import all_running

M = "manifest"
CHUNKS = ["c1", "c2", "c3", "c4"]


def run_until_idle(c: Carousel, t: float) -> list[tuple[float, str, list[str]]]:
    """Fire every pass that falls due by ``t``; returns (time, bundle, parts)."""
    out = []
    while (d := c.next_deadline()) <= t:
        out += [(d, b, parts) for b, parts in c.due(d)]
    return out


def test_a_storm_of_requests_costs_one_pass_of_each_part():
    c = Carousel(quiet=1.5, max_hold=30, covered=30)
    # 1,000 devices ask for the manifest over 20 s, never 1.5 s apart: nothing goes out meanwhile
    for i in range(1000):
        c.request("b", f"d{i}", True, [], now=i * 0.02)
        assert c.due(i * 0.02) == []
    [(t1, _, parts)] = run_until_idle(c, 25.0)
    assert parts == [M] and t1 == pytest.approx(19.98 + 1.5)
    # each then asks for the chunks, and re-asks while its copy drains: still one copy
    for i in range(1000):
        c.request("b", f"d{i}", False, CHUNKS, now=t1 + 0.1 + i * 0.002)
    assert [p for _, _, p in run_until_idle(c, t1 + 10)] == [CHUNKS]
    for i in range(1000):
        c.request("b", f"d{i}", True, CHUNKS, now=t1 + 10 + i * 0.002)  # impatient retries after the pass
    assert run_until_idle(c, t1 + 60) == []
    assert c.ignored == 1000 * 5


def test_a_late_single_device_waits_one_quiet_period_per_step():
    c = Carousel(quiet=1.5, max_hold=30, covered=30)
    c.request("b", "early", True, [], now=0.0)
    assert run_until_idle(c, 100.0) == [(1.5, "b", [M])]
    c.request("b", "late", True, [], now=200.0)  # long after the wave: nothing of it is covered
    assert c.next_deadline() == 201.5
    [(t, _, parts)] = run_until_idle(c, 300.0)
    assert parts == [M]
    c.request("b", "late", False, CHUNKS, now=t + 0.1)
    assert run_until_idle(c, 400.0) == [(t + 1.6, "b", CHUNKS)]


def test_a_device_that_subscribed_after_a_pass_gets_the_next_one():
    c = Carousel(quiet=1.0, max_hold=30, covered=30)
    c.request("b", "a", False, CHUNKS, now=0.0)
    [(t1, _, _)] = run_until_idle(c, 5.0)
    c.request("b", "joiner", False, CHUNKS, now=t1 + 0.01)  # asked just after the copy: it missed it
    assert c.pending("b") == {ch: {"joiner"} for ch in CHUNKS}
    assert [p for _, _, p in run_until_idle(c, 10.0)] == [CHUNKS]


def test_only_the_chunks_a_joiner_lacks_are_sent_again():
    c = Carousel(quiet=1.0, max_hold=30, covered=30)
    c.request("b", "a", False, CHUNKS, now=0.0)
    run_until_idle(c, 5.0)
    c.request("b", "resumed", False, ["c3", "c4"], now=6.0)  # it had c1, c2 in its store already
    assert [p for _, _, p in run_until_idle(c, 10.0)] == [["c3", "c4"]]


def test_waiting_for_the_manifest_covers_the_chunks_of_the_same_pass():
    c = Carousel(quiet=1.0, max_hold=30, covered=30)
    c.request("b", "a", False, CHUNKS, now=0.0)
    c.request("b", "m", True, [], now=0.5)
    assert [p for _, _, p in run_until_idle(c, 5.0)] == [[M, *CHUNKS]]  # manifest first
    c.request("b", "m", False, CHUNKS, now=2.0)  # it read the manifest, then these chunks arrived behind it
    assert c.pending("b") == {} and c.next_deadline() == NEVER


def test_a_covered_request_is_served_again_after_the_covered_time():
    c = Carousel(quiet=1.0, max_hold=30, covered=20)
    c.request("b", "a", False, CHUNKS, now=0.0)
    run_until_idle(c, 5.0)
    c.request("b", "a", False, CHUNKS, now=10.0)  # the copy may still be draining to it
    assert c.pending("b") == {}
    c.request("b", "a", False, CHUNKS, now=25.0)  # long enough: it really missed the copy
    assert c.pending("b") == {ch: {"a"} for ch in CHUNKS}


def test_a_reconnected_device_is_served_again_at_once():
    c = Carousel(quiet=1.0, max_hold=30, covered=30)
    c.request("b", "a", False, CHUNKS, now=0.0)
    run_until_idle(c, 5.0)
    c.reconnected("a")  # its session (and the queued copy) may be gone
    c.request("b", "a", False, CHUNKS, now=6.0)
    assert c.pending("b") == {ch: {"a"} for ch in CHUNKS}


def test_a_never_ending_stream_of_new_devices_is_cut_at_max_hold():
    c = Carousel(quiet=1.0, max_hold=10, covered=30)
    passes = []
    for i in range(100):  # a new device every 0.5 s for 50 s
        passes += run_until_idle(c, i * 0.5)
        c.request("b", f"d{i}", True, [], now=i * 0.5)
    passes += run_until_idle(c, 100.0)
    times = [t for t, _, _ in passes]
    assert times[0] == 10.0 and len(times) == 5  # no device waits more than max_hold (+ its 0.5 s arrival step)
    assert all(b - a <= 10.5 for a, b in zip(times, times[1:], strict=False)) and times[-1] == 49.5 + 1.0


def test_bundles_are_independent_and_idle_ones_are_forgotten():
    c = Carousel(quiet=1.0, max_hold=30, covered=5)
    c.request("b1", "a", True, [], now=0.0)
    c.request("b2", "a", True, [], now=0.8)
    assert run_until_idle(c, 1.0) == [(1.0, "b1", [M])]
    assert run_until_idle(c, 2.0) == [(1.8, "b2", [M])]
    c.due(100.0)
    c.request("b1", "a", True, [], now=100.0)  # forgotten: not covered any more
    assert c.pending("b1") == {M: {"a"}}


def test_bad_settings_are_refused():
    with pytest.raises(ValueError):
        Carousel(quiet=0)
    with pytest.raises(ValueError):
        Carousel(quiet=2, max_hold=1)


# --- with the real hub, broker and agents ------------------------------------------------------------


def test_a_wave_and_a_late_joiner_install_over_the_carousel(server, admin, tmp_path):
    model = write_logreg_onnx(tmp_path / "model.onnx")
    weights = os.urandom(2 * CHUNK_SIZE + 99)  # a bundle of several chunks
    admin.post("/api/v1/models", data={"name": "big"}, files=[
        ("files", ("model.onnx", model.read_bytes())), ("files", ("weights.bin", weights))]).raise_for_status()
    module = admin.post("/api/v1/modules", json={"name": "big", "models": ["big:1"]}).json()
    envelope = admin.get(f"/api/v1/bundles/{module['digest']}/release").json()
    one_copy = module["size"] + len(canonical_json(envelope))
    bridge = server.hub.bridge

    wave = Fleet(server.url, server.admin_token, 4, tmp_path / "wave", rate=0, telemetry_interval=5, prefix="cw")
    wave.start()
    try:
        admin.post("/api/v1/deployments", json={"name": "big", "module": "big:1", "target": "sim=true"}
                   ).raise_for_status()
        all_running(admin, wave.device_ids(), "big", 1)
        wave_bytes = bridge.blob_bytes_sent

        # joins after the wave's passes: nothing it asks for is covered, so the next pass serves it
        joiner = Fleet(server.url, server.admin_token, 1, tmp_path / "joiner", rate=0, telemetry_interval=5,
                       prefix="cj")
        joiner.start()
        try:
            all_running(admin, joiner.device_ids(), "big", 1)
            assert bridge.blob_bytes_sent - wave_bytes == one_copy  # its own copy of each part, once
        finally:
            joiner.stop()
    finally:
        wave.stop()
    assert wave_bytes >= one_copy
