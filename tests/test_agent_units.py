"""Unit tests without a broker: the install transition table, the outbox bound, backoff, workload."""

from __future__ import annotations

import random

import numpy as np
import pytest

from agent.install import TERMINAL, TRANSITIONS, IllegalTransition, Journal, check_transition
from agent.mqtt import backoff_delay
from agent.outbox import Outbox
from agent.stats import ModuleStats, percentiles
from agent.workload import Workload
from protocol.manifest import TensorSpec

HAPPY = [None, "downloading", "verifying", "staged", "activating", "health_check", "committed"]
ROLLED_BACK = [None, "downloading", "verifying", "staged", "activating", "health_check", "rolling_back", "rolled_back"]
NO_PREVIOUS = ["activating", "rolling_back", "failed"]


@pytest.mark.parametrize("path", [HAPPY, ROLLED_BACK, NO_PREVIOUS, ["downloading", "failed"], ["verifying", "failed"],
                                  ["staged", "failed"], ["committed", "downloading"], ["rolled_back", "downloading"]])
def test_transition_paths_are_allowed(path):
    for old, new in zip(path, path[1:]):
        check_transition(old, new)


@pytest.mark.parametrize("old, new", [(None, "activating"), ("downloading", "committed"), ("staged", "health_check"),
                                      ("activating", "failed"), ("health_check", "rolled_back"), ("committed", "staged")])
def test_illegal_transitions_raise(old, new):
    with pytest.raises(IllegalTransition):
        check_transition(old, new)


def test_every_state_is_reachable_and_every_install_can_end():
    reachable, frontier = set(), [None]
    while frontier:
        for nxt in TRANSITIONS[frontier.pop()]:
            if nxt not in reachable:
                reachable.add(nxt)
                frontier.append(nxt)
    assert reachable == {s for s in TRANSITIONS if s is not None}
    for state in reachable - TERMINAL:  # from every state under way, some path ends in a terminal state
        seen, frontier = set(), [state]
        while frontier and not (seen & TERMINAL):
            for nxt in TRANSITIONS[frontier.pop()] - seen:
                seen.add(nxt)
                frontier.append(nxt)
        assert seen & TERMINAL, state


def test_journal_walks_the_table_and_persists_each_step(tmp_path):
    journal = Journal(tmp_path / "journal.json")
    journal.transition("m", "downloading", bundle="b" * 64, version=2, previous="a" * 64)
    for state in HAPPY[2:]:
        journal.transition("m", state)
        assert Journal(tmp_path / "journal.json").get("m").state == state  # on disk before it takes effect
    with pytest.raises(IllegalTransition):
        journal.transition("m", "health_check")
    assert Journal(tmp_path / "journal.json").get("m").previous == "a" * 64


def test_outbox_bound_drops_oldest_and_counts(tmp_path):
    box = Outbox(tmp_path / "outbox.db", max_rows=5)
    for i in range(8):
        box.put("telemetry", f"m{i}".encode())
    rows = box.peek(100)
    assert [p for _, _, p in rows] == [f"m{i}".encode() for i in range(3, 8)]
    assert len(box) == 5 and box.dropped == 3
    box.delete(rows[0][0])
    assert [p for _, _, p in box.peek(2)] == [b"m4", b"m5"]
    seqs = [box.next_seq("telemetry") for _ in range(3)]
    box.close()
    again = Outbox(tmp_path / "outbox.db", max_rows=5)  # sequence numbers and drop counts survive a restart
    assert again.next_seq("telemetry") == seqs[-1] + 1 and again.dropped == 3 and len(again) == 4
    assert again.next_seq("data") == 1


def test_backoff_is_jittered_and_capped():
    rng = random.Random(1)
    delays = [backoff_delay(a, 0.5, 30.0, rng) for a in range(1, 40)]
    assert all(0 <= d <= 30.0 for d in delays)
    assert len({round(d, 6) for d in delays}) == len(delays)  # full jitter: no two devices in lock-step


def test_workload_inputs_follow_the_signature_and_stats_give_percentiles():
    w = Workload(rate=1, batch=3)
    rng = np.random.default_rng(0)
    batch = w.make_inputs(rng, [TensorSpec(name="x", dtype="float32", shape=[None, 4]),
                                TensorSpec(name="ids", dtype="int64", shape=[None, 2])])
    assert batch["x"].shape == (3, 4) and batch["x"].dtype == np.float32 and batch["ids"].dtype == np.int64
    stats = ModuleStats()
    for ms in range(1, 101):
        stats.record(float(ms), ok=ms != 50)
    n, errors, lat = stats.take()
    assert (n, errors) == (100, 1) and 49 <= lat.p50 <= 52 and lat.p99 >= 99
    assert stats.take()[0] == 0 and stats.total == 100


@pytest.mark.parametrize("n", [1, 2, 7, 1000])
def test_percentiles_match_numpys_linear_method(n):
    values = np.random.default_rng(n).exponential(5.0, size=n).tolist()
    assert percentiles(values, [0, 50, 95, 99, 100]) == pytest.approx(np.percentile(values, [0, 50, 95, 99, 100]))
