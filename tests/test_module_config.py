"""Per-module configuration (issue 15): a signed desired state's ``config`` reaches the module's ``init(config)``
without a new bundle; a change passes the same health gate as a version change and a failing one is rolled back to
the previous configuration while the module keeps serving; the device reports the applied configuration's digest
and the accelerator (a preference for an unavailable one falls back to the CPU, and says so). Real broker, real agent
(in-process and worker-process isolation), the hub side signing as the director does."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from msgspec.structs import replace

from agent.reconcile import Activate, Install, ModuleFacts, Reconfigure, Report, SetCollectRate, step
from protocol.messages import DesiredModule, DesiredState, config_digest
from tests.hubside import HubSide, new_device, running_agent, until

SCRIPT = """
import numpy as np
SEEN = {}

def init(config):
    if config.get("fail") == "yes":
        raise RuntimeError("refusing this configuration")
    SEEN.update(config)

def run(inputs):
    return {"probability": np.full((inputs["x"].shape[0], 1), float(SEEN.get("bias", "0")), np.float32)}
"""
X = "a" * 64


@pytest.fixture
def hub(broker, tmp_path):
    h = HubSide(broker.url, tmp_path / "hub")
    yield h
    h.close()


def with_config(m: DesiredModule, **config: object) -> DesiredModule:
    return replace(m, config=config)


@pytest.mark.parametrize("isolation", ["inprocess", "process"])
def test_config_applies_with_the_health_gate_and_a_failing_one_rolls_back(hub, tmp_data, isolation):
    device = new_device()
    py = hub.build("tuned", 1, script=SCRIPT)
    onnx = hub.build("scorer", 1)

    def report(name):
        r = hub.reported(device)
        return next((m for m in r.modules if m.name == name), None) if r else None

    async def main() -> None:
        async with running_agent(hub, device, tmp_data, isolation=isolation) as agent:
            hub.publish_desired(device, 1, [py.desired(), with_config(onnx.desired(), accelerators="cuda,cpu")])
            await until(lambda: hub.module_state(device, "tuned") == "running"
                        and hub.module_state(device, "scorer") == "running", 60, "both running")
            assert report("tuned").config == "" and report("tuned").accelerator == "python"
            scorer = report("scorer")
            assert scorer.config == config_digest({"accelerators": "cuda,cpu"})
            assert scorer.accelerator == "CPUExecutionProvider (cuda: not available in this runtime build)"

            good = {"bias": "0.25", "labels": "cat,dog"}
            hub.publish_desired(device, 2, [with_config(py.desired(), **good), onnx.desired()])
            await until(lambda: report("tuned").config == config_digest(good) and report("scorer").config == "",
                        60, "configs applied")
            assert report("tuned").state == "running" and agent.active["tuned"].bundle == py.digest
            base = tmp_data / "modules" / "tuned"
            assert (base / "config.current").readlink().name == f"{config_digest(good)}.json"
            if isolation == "inprocess":
                out = agent.active["tuned"].runner.predict({"x": np.zeros((1, 4), np.float32)})
                assert out["probability"].tolist() == [[0.25]]

            bad = {"bias": "0.5", "fail": "yes"}
            hub.publish_desired(device, 3, [with_config(py.desired(), **bad), onnx.desired()])
            await until(lambda: hub.module_state(device, "tuned") == "rolled_back", 60, "bad config rolled back")
            assert "refusing this configuration" in report("tuned").error
            assert (base / "config.current").readlink().name == f"{config_digest(good)}.json"
            active = agent.active["tuned"]
            assert active.bundle == py.digest and active.config == config_digest(good)  # still serving the good one
            if isolation == "inprocess":
                assert active.runner.predict({"x": np.zeros((1, 4), np.float32)})["probability"].tolist() == [[0.25]]

            hub.publish_desired(device, 4, [with_config(py.desired(), **good), onnx.desired()])
            await until(lambda: hub.module_state(device, "tuned") == "running", 60, "back to the good config")
            assert report("tuned").config == config_digest(good)
            reconfigured_at = agent.installer.journal.get("tuned").ts
        async with running_agent(hub, device, tmp_data, isolation=isolation) as agent:  # a restart keeps it
            await until(lambda: "tuned" in agent.active, 60, "serving after the restart")
            assert agent.active["tuned"].config == config_digest(good)
            assert agent.installer.journal.get("tuned").ts == reconfigured_at  # applied from disk, not installed again

    asyncio.run(main())


def state(*modules: DesiredModule) -> DesiredState:
    return DesiredState(device="d", revision=1, expires=2**40, modules=list(modules))


M = DesiredModule(name="m", version=1, bundle=X, size=1)
C = config_digest({"k": "v"})


@pytest.mark.parametrize("facts, actions", [
    # the configuration desired is applied and serving: nothing to do
    (ModuleFacts(current=X, active=X, journal="committed", journal_bundle=X, config=C, active_config=C,
                 journal_config=C), "same"),
    # a new configuration for the installed bundle
    (ModuleFacts(current=X, active=X, journal="committed", journal_bundle=X), "reconfigure"),
    # that configuration was judged unusable: not tried again; the previous one keeps serving
    (ModuleFacts(current=X, active=X, journal="rolled_back", journal_bundle=X, journal_config=C), "same"),
    # a different configuration after one was given up: tried
    (ModuleFacts(current=X, active=X, journal="rolled_back", journal_bundle=X, journal_config="c" * 64), "reconfigure"),
    # serving another configuration than the one applied (a restart during the change): load the applied one
    (ModuleFacts(current=X, active=X, journal="committed", journal_bundle=X, journal_config=C, config=C,
                 active_config="b" * 64), "activate"),
])
def test_step_reconfigures_only_what_changed(facts, actions):
    m = with_config(M, k="v")
    want = {"same": [], "reconfigure": [Reconfigure(m)], "activate": [Activate("m")]}[actions]
    assert step(0, state(m), {"m": facts}) == [*want, SetCollectRate("m", 0), Report()]


def test_a_given_up_bundle_is_installed_again_with_another_config():
    m = with_config(M, k="v")
    gave_up = ModuleFacts(journal="failed", journal_bundle=X)  # failed with no configuration
    assert step(0, state(m), {"m": gave_up}) == [Install(m), Report()]
    assert step(0, state(M), {"m": gave_up}) == [Report()]


def test_deployment_config_is_set_merged_validated_and_shown_per_device(server, admin, tmp_path):
    from hub.fleet.devices import module_views
    from tests.rollout_support import cli
    from tests.test_deployment_numbers import enrol, register

    register(admin, tmp_path, "cam", None)
    enrol(server, admin, ["cfg-1"], {})
    r = admin.post("/api/v1/deployments", json={"name": "cam", "module": "cam:1", "config": {"threshold": "0.5",
                                                                                            "camera": 2}})
    assert r.status_code == 200, r.text
    first = {"threshold": "0.5", "camera": 2}
    view = admin.get("/api/v1/devices/cfg-1").json()["modules"][0]
    assert view["config"] == first and view["config_digest"] == config_digest(first) and view["config_applied"] == ""

    out = cli(server.url, server.admin_token, "deployment", "update", "cam", "--config", "threshold=0.7",
              "--config-unset", "camera", "--json")
    assert out["revision"] == 2
    (tmp_path / "c.json").write_text('{"labels": "cat,dog", "debug": true}')
    cli(server.url, server.admin_token, "deployment", "update", "cam", "--config-file", str(tmp_path / "c.json"),
        "--config", "threshold=0.9", "--json")
    revs = admin.get("/api/v1/deployments/cam/revisions").json()
    configs = [r["config"] for r in sorted(revs, key=lambda r: r["revision"])]
    assert configs == [first, {"threshold": "0.7"}, {"labels": "cat,dog", "debug": True, "threshold": "0.9"}]
    assert admin.get("/api/v1/devices/cfg-1").json()["modules"][0]["config"] == configs[-1]  # in its desired state

    for bad, why in [({"Bad Key": 1}, "config"), ({"x": 0.5}, "config"), ({"x": "y" * 4000, "z": "y" * 4000, "w": "y" * 400},
                                                                          "at most 8192")]:
        r = admin.patch("/api/v1/deployments/cam", json={"config": bad})
        assert r.status_code == 422 and why in r.text, r.text
    assert len(admin.get("/api/v1/deployments/cam/revisions").json()) == 3  # nothing stored for a refused one

    reported = {"modules": [{"name": "cam", "version": 1, "bundle": view["bundle"], "state": "running",
                             "config": config_digest(first), "accelerator": "CPUExecutionProvider"}]}
    desired = [{"name": "cam", "version": 1, "bundle": view["bundle"], "deployment": "cam", "config": first}]
    (shown,) = module_views(desired, reported)
    assert shown["config_applied"] == shown["config_digest"] and shown["accelerator"] == "CPUExecutionProvider"
