"""Shadow evaluation's pure parts: the reconciler's shadow actions, the comparison rules, the bounded queue,
the desired-state field's wire form, and the shadow gates on stored comparisons."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from agent.reconcile import (
    Install,
    InstallShadow,
    ModuleFacts,
    Remove,
    RemoveShadow,
    Report,
    StartShadow,
    next_retry,
    step,
    supersede,
)
from agent.shadow import Shadow, compare
from protocol.messages import DesiredModule, DesiredState, ShadowSpec, TelemetryBatch, decode
from protocol.topics import Channel
from tests.pg import hub_store

NOW = 1_700_000_000.0
LIVE, CAND, OTHER = "a" * 64, "b" * 64, "c" * 64


def _state(*modules: DesiredModule) -> DesiredState:
    return DesiredState(device="d1", revision=2, expires=int(NOW) + 3600, modules=list(modules))


def _mod(shadow: str | None = None) -> DesiredModule:
    spec = ShadowSpec(version=2, bundle=shadow, size=10) if shadow else None
    return DesiredModule(name="m", version=1, bundle=LIVE, size=10, shadow=spec)


def test_step_installs_then_starts_a_candidate_beside_the_live_version():
    live = {"m": ModuleFacts(current=LIVE, active=LIVE)}
    actions = step(NOW, _state(_mod(CAND)), live)
    assert actions[-2:] == [InstallShadow(_mod(CAND).candidate()), Report()]
    assert actions[-2].module.version == 2 and actions[-2].module.bundle == CAND  # type: ignore[union-attr]
    installed = {"m": ModuleFacts(current=CAND, journal="committed", journal_bundle=CAND)}
    assert StartShadow("m", _mod(CAND).shadow) in step(NOW, _state(_mod(CAND)), live, shadows=installed)  # type: ignore[arg-type]
    running = {"m": ModuleFacts(current=CAND, active=CAND)}
    assert not any(isinstance(a, (InstallShadow, StartShadow, RemoveShadow))
                   for a in step(NOW, _state(_mod(CAND)), live, shadows=running))


def test_step_removes_a_candidate_no_longer_wanted_first_and_replaces_another():
    live = {"m": ModuleFacts(current=LIVE, active=LIVE)}
    running = {"m": ModuleFacts(current=CAND, active=CAND)}
    assert step(NOW, _state(_mod()), live, shadows=running)[0] == RemoveShadow("m")
    actions = step(NOW, _state(_mod(OTHER)), live, shadows=running)
    assert actions[0] == RemoveShadow("m") and InstallShadow(_mod(OTHER).candidate()) in actions  # type: ignore[arg-type]
    # the promotion: the candidate becomes the live version (installed in the live slot), its shadow goes
    promoted = DesiredModule(name="m", version=2, bundle=CAND, size=10)
    actions = step(NOW, _state(promoted), live, shadows=running)
    assert actions[0] == RemoveShadow("m") and Install(promoted) in actions
    # a module dropped altogether loses its live version and its candidate
    assert step(NOW, _state(), live, shadows=running)[:2] == [RemoveShadow("m"), Remove("m")]


def test_step_gives_up_on_a_candidate_that_failed_and_downloads_are_not_cancelled_for_it():
    live = {"m": ModuleFacts(current=LIVE, active=LIVE)}
    failed = {"m": ModuleFacts(journal="rolled_back", journal_bundle=CAND)}
    assert not any(isinstance(a, InstallShadow) for a in step(NOW, _state(_mod(CAND)), live, shadows=failed))
    assert supersede(_state(_mod(CAND)), ("m", CAND), "downloading") == []


def test_a_candidate_the_environment_stopped_is_tried_again_from_its_retry_time_like_a_live_install():
    live = {"m": ModuleFacts(current=LIVE, active=LIVE)}
    stopped = {"m": ModuleFacts(journal="failed", journal_bundle=CAND, retry_at=NOW + 30)}  # a full disk, say
    assert not any(isinstance(a, InstallShadow) for a in step(NOW, _state(_mod(CAND)), live, shadows=stopped))
    assert next_retry(_state(_mod(CAND)), live, stopped) == NOW + 30  # the agent wakes for it
    assert InstallShadow(_mod(CAND).candidate()) in step(NOW + 30, _state(_mod(CAND)), live, shadows=stopped)  # type: ignore[arg-type]
    refused = {"m": ModuleFacts(journal="failed", journal_bundle=CAND)}  # the bundle's fault: not again
    assert not any(isinstance(a, InstallShadow) for a in step(NOW + 99, _state(_mod(CAND)), live, shadows=refused))
    assert next_retry(_state(_mod(CAND)), live, refused) is None
    assert next_retry(_state(_mod(OTHER)), live, stopped) is None  # another candidate is wanted now


@pytest.mark.parametrize(("live", "cand", "rule", "differ"), [
    ({"p": [[0.9], [0.2], [0.6]]}, {"p": [[0.1], [0.8], [0.7]]}, "auto", 2),  # threshold: 2 flipped of 3
    ({"p": [[0.1, 0.7, 0.2], [0.5, 0.3, 0.2]]}, {"p": [[0.1, 0.2, 0.7], [0.6, 0.3, 0.1]]}, "auto", 1),  # argmax
    ({"y": [[3.0], [10.0]]}, {"y": [[3.005], [11.0]]}, "auto", 1),  # tolerance 0.01 on regression values
    ({"p": [[0.9], [0.2]]}, {"q": [[0.9], [0.2]]}, "auto", 2),  # an output missing: every row differs
])
def test_compare_rules(live, cand, rule, differ):
    c = compare(live, cand, rule, 0.01)
    assert c.rows == len(next(iter(live.values()))) and c.differ == differ


def test_compare_counts_classes_for_output_drift():
    c = compare({"p": [[0.9], [0.2], [0.6]]}, {"p": [[0.1], [0.8], [0.7]]})
    assert c.live_classes == {"1": 2, "0": 1} and c.shadow_classes == {"0": 1, "1": 2}


class _Runner:
    """An in-process runner answering 1 - p (the inverted candidate), counting its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def predict(self, batch: dict) -> dict:
        self.calls += 1
        return {"p": 1.0 - batch["x"]}


def test_the_queue_is_bounded_the_live_path_never_waits_and_drops_are_counted():
    async def run() -> tuple[Shadow, _Runner]:
        runner = _Runner()
        shadow = Shadow("m", CAND, 2, runner, ShadowSpec(version=2, bundle=CAND, size=1, max_queue=4))  # type: ignore[arg-type]
        for _ in range(10):  # the consumer is not running yet: 4 fit, 6 are dropped
            shadow.offer("batch", {"x": np.array([[0.9]])}, {"p": np.array([[0.9]])}, 1.0, 1)
        shadow.task = asyncio.create_task(shadow.run())
        while not shadow.queue.empty() or shadow.compared < 4:
            await asyncio.sleep(0.01)
        await shadow.stop()
        return shadow, runner

    shadow, runner = asyncio.run(run())
    assert runner.calls == 4
    point = shadow.take(NOW)
    assert (point.mirrored, point.dropped, point.compared, point.disagreements) == (4, 6, 4, 4)
    assert shadow.take(NOW).mirrored == 0  # taken: reset for the next interval


def test_desired_module_without_a_shadow_signs_as_before_and_telemetry_carries_shadow_points():
    assert "shadow" not in _mod().to_dict() and _mod(CAND).to_dict()["shadow"]["bundle"] == CAND
    assert "shadow" not in _state(_mod()).to_dict()["modules"][0]
    batch = TelemetryBatch(device="d1", seq=1, ts=NOW, points=[])
    assert decode(Channel.TELEMETRY, batch.encode()).shadow == []  # type: ignore[attr-defined]


class _Quality:
    """A stand-in for hub/monitoring/labels.Quality with fixed answers (the real one is exercised in test_labels)."""

    def __init__(self, drift: float | None, accuracy: float | None) -> None:
        self.drift, self.labels = drift, self
        self.acc = accuracy

    def input_drift(self, module, data_version, baseline_version, since, devices):
        return self.drift, "fixed"

    def accuracy(self, module, version, since, devices):
        return {"accuracy": self.acc, "correct": 0, "labelled": 0 if self.acc is None else 10}


@pytest.mark.hubstore  # run again on PostgreSQL by scripts/test.sh
def test_shadow_gates_judge_stored_comparisons_and_fail_without_evidence(tmp_data):
    from hub.ingest.writer import SHADOW_SQL, shadow_rows
    from hub.rollout.rollout_plan import Gates
    from hub.rollout.shadow_gates import evaluate_shadow, quality_checks
    from protocol.messages import LatencyMs, ShadowPoint

    db = hub_store(tmp_data)
    states = {"d1": ("running", ""), "d2": ("running", "")}
    gates = Gates(max_disagreement=0.1, max_prediction_drift=0.2, min_reporting=1.0)
    result, figures = evaluate_shadow(db, gates, states, "m", 2, NOW - 10, 1)
    assert not result.ok and "no mirrored input was compared" in result.reason and figures["compared"] == 0

    def point(dev: str, seq: int, differ: int) -> TelemetryBatch:
        p = ShadowPoint(ts=NOW, module="m", version=2, live_version=1, mirrored=100, dropped=3, compared=100,
                        disagreements=differ, errors=0, latency_ms=LatencyMs(p95=2.0), live_latency_ms=LatencyMs(p95=1.0),
                        live_classes={"0": 50, "1": 50}, shadow_classes={"0": 50 + differ, "1": 50 - differ})
        return TelemetryBatch(device=dev, seq=seq, ts=NOW, points=[], shadow=[p])

    with db.transaction() as tx:
        for batch in (point("d1", 1, 2), point("d2", 1, 4), point("d3", 1, 100)):  # d3 is not a shadow device
            tx.executemany(SHADOW_SQL, shadow_rows(batch))
    result, figures = evaluate_shadow(db, gates, states, "m", 2, NOW - 10, 1)
    assert result.ok, result.reason
    assert (figures["compared"], figures["disagreements"], figures["dropped"]) == (200, 6, 6)
    assert figures["disagreement"] == pytest.approx(0.03) and figures["p95_ms"] == 2.0
    strict = Gates(max_disagreement=0.01, max_p95_increase=0.5)
    result, _ = evaluate_shadow(db, strict, states, "m", 2, NOW - 10, 1)
    assert [c.name for c in result.checks if not c.ok] == ["max_disagreement", "max_p95_increase"]
    assert "6 of 200 mirrored predictions differ on 2 device(s)" in result.reason

    # input drift and accuracy: judged on waves, accuracy noted (not judged) on a shadow, no evidence fails
    q = Gates(max_input_drift=0.2, min_accuracy=0.9)
    checks = {c.name: c for c in quality_checks(_Quality(0.5, 0.95), q, "m", 2, NOW, {"d1"})}
    assert not checks["max_input_drift"].ok and checks["min_accuracy"].ok
    checks = {c.name: c for c in quality_checks(_Quality(None, None), q, "m", 2, NOW, {"d1"})}
    assert not checks["max_input_drift"].ok and not checks["min_accuracy"].ok
    checks = {c.name: c for c in quality_checks(_Quality(0.1, None), q, "m", 2, NOW, {"d1"}, shadow_of=1)}
    assert checks["max_input_drift"].ok and checks["min_accuracy"].ok and "waves" in checks["min_accuracy"].note
