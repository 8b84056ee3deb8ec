"""Unit tests without a broker: the install transition table, the outbox bound, backoff, workload."""

from __future__ import annotations

import asyncio
import os
import random

import numpy as np
import pytest

from agent.bake import BakeWatch
from agent.journal import TERMINAL, TRANSITIONS, IllegalTransition, Journal, check_transition
from agent.mqtt import backoff_delay
from agent.outbox import Outbox
from agent.stats import ModuleStats, percentiles
from agent.workload import Workload
from protocol.manifest import TensorSpec
from protocol.messages import BakePolicy

HAPPY = [None, "downloading", "verifying", "staged", "activating", "health_check", "committed"]
ROLLED_BACK = [None, "downloading", "verifying", "staged", "activating", "health_check", "rolling_back", "rolled_back"]
NO_PREVIOUS = ["activating", "rolling_back", "failed"]
BAKED = [None, "downloading", "verifying", "staged", "activating", "health_check", "baking", "committed"]
BAKE_FAILED = ["health_check", "baking", "rolling_back", "rolled_back"]
REBAKED = ["health_check", "baking", "baking", "baking", "committed"]  # restarts during the bake


@pytest.mark.parametrize("path", [HAPPY, ROLLED_BACK, NO_PREVIOUS, BAKED, BAKE_FAILED, REBAKED,
                                  ["downloading", "failed"], ["verifying", "failed"],
                                  ["staged", "failed"], ["committed", "downloading"], ["rolled_back", "downloading"]])
def test_transition_paths_are_allowed(path):
    for old, new in zip(path, path[1:]):
        check_transition(old, new)


@pytest.mark.parametrize("old, new", [(None, "activating"), ("downloading", "committed"), ("staged", "health_check"),
                                      ("activating", "failed"), ("health_check", "rolled_back"), ("committed", "verifying"),
                                      ("activating", "baking"), ("baking", "failed"), ("baking", "downloading"),
                                      ("committed", "baking")])
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


def test_journal_keeps_the_bake_policy_and_counts_bake_starts(tmp_path):
    journal = Journal(tmp_path / "journal.json")
    policy = {"seconds": 60, "max_error_ppm": 50_000, "min_inferences": 20}
    journal.transition("m", "downloading", bundle="b" * 64, version=2, bake=policy)
    for state in BAKED[2:6]:
        journal.transition("m", state)
    journal.transition("m", "baking", bakes=1)
    journal.transition("m", "baking", bakes=2)  # the agent restarted mid-bake and bakes again
    on_disk = Journal(tmp_path / "journal.json").get("m")
    assert (on_disk.state, on_disk.bake, on_disk.bakes) == ("baking", policy, 2)


def test_journal_from_before_the_bake_still_loads(tmp_path):
    (tmp_path / "journal.json").write_text('{"v": 1, "modules": {"m": {"state": "committed", "bundle": "' + "b" * 64
                                           + '", "version": 1, "previous": null, "error": "", "ts": 1.0}}}')
    entry = Journal(tmp_path / "journal.json").get("m")
    assert entry.state == "committed" and entry.bake is None and entry.bakes == 0


def test_bake_watch_needs_enough_inferences_and_decides_on_the_rate():
    policy = BakePolicy(seconds=60, max_error_ppm=100_000, min_inferences=10)
    early = BakeWatch(policy)
    for _ in range(9):
        early.record(ok=False)
    assert early.reason == ""  # 9 errors, but fewer than 10 inferences: undecided
    early.record(ok=False)
    assert early.reason == "error rate 100.0% (10 of 10 inferences) exceeds 10%"

    watch = BakeWatch(policy)
    for ok in [True] * 45 + [False] * 5:
        watch.record(ok)
    assert watch.reason == ""  # 5 in 50 = 10 %: not above 10 %
    watch.record(ok=False)
    assert watch.reason == "error rate 11.8% (6 of 51 inferences) exceeds 10%"
    watch.fail("crash loop")  # the first reason stands
    assert asyncio.run(watch.wait()) == watch.reason  # decided: returns at once


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


def test_procstat_reads_rss_and_cpu_from_proc_and_says_when_a_worker_is_gone():
    import subprocess
    import sys

    from agent.procstat import CpuMeter, ProcessGone, cpu_seconds, rss_bytes

    vmrss_kb = int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0])
    assert abs(rss_bytes() / 1024 - vmrss_kb) < 4096  # the same figure the kernel reports, within 4 MB of drift
    child = subprocess.Popen([sys.executable, "-c", "import sys; print('ready', flush=True); sys.stdin.read()"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert child.stdout is not None and child.stdout.readline() == b"ready\n"  # an interpreter, up and running
    try:
        meter = CpuMeter(child.pid)
        assert meter.percent() == 0.0  # the first look has nothing to compare with
        assert cpu_seconds(child.pid) >= 0 and rss_bytes(child.pid) > 1_000_000
    finally:
        child.stdin.close()  # type: ignore[union-attr]
        # exited but not reaped (WNOWAIT): a zombie counts as gone (the supervisor is about to restart it)
        os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)
        with pytest.raises(ProcessGone):
            cpu_seconds(child.pid)
        child.wait()
    with pytest.raises(ProcessGone):
        rss_bytes(child.pid)
