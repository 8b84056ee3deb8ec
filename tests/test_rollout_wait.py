"""`rollout status --wait` for CI: exit codes per outcome, plain lines off a terminal, NDJSON; the one-command deploys."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from modules.examples import write_logreg_onnx, write_sample
from tests.clirun import ROOT, as_json, cli


@pytest.fixture
def hub_options() -> dict:
    return {"rollout_tick_s": 0.1}


def follow(server, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "edgefleet", "--hub", server.url, "--token", server.admin_token,
                             "rollout", "status", *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def test_wait_exits_by_outcome_with_plain_lines_and_ndjson(server, admin, tmp_path):
    for k in (1, 2, 3, 4):  # set-up through the API (the CLI's own commands are tested elsewhere)
        path = write_logreg_onnx(tmp_path / f"m{k}.onnx", seed=k)
        admin.post("/api/v1/models", data={"name": "m"}, files=[("files", ("m.onnx", path.read_bytes()))])
        admin.post("/api/v1/modules", json={"name": "m", "models": [f"m:{k}"]}).raise_for_status()

    def deploy(module: str, bake: float = 0) -> None:
        admin.post("/api/v1/deployments", json={"name": "d", "module": module, "target": "site=nowhere",
                                                "bake_s": bake}).raise_for_status()

    # no device matches: the rollout succeeds at once; off a terminal --wait prints plain lines
    deploy("m:1")
    done = cli(server, "rollout", "status", "d", "--wait", "--timeout", "60")
    assert "d rollout 1 revision 1 (m:1): succeeded  no devices" in done.stdout
    assert done.stdout.rstrip().endswith("rollout 1 of d succeeded (exit 0)")
    watched = cli(server, "rollout", "status", "d", "--watch")  # --watch off a terminal prints too
    assert "succeeded" in watched.stdout and "\x1b[" not in watched.stdout

    # revision 2 bakes for a minute; the follower streams NDJSON until an operator rolls it back: exit 3
    deploy("m:2", bake=60)
    proc = follow(server, "d", "--wait", "--json", "--interval", "0.1")
    first = json.loads(proc.stdout.readline())  # the follower is running: now roll back
    assert first["phase"] == "baking" and first["module"] == "m:2" and first["from_module"] == "m:1"
    admin.post("/api/v1/rollouts/d/rollback").raise_for_status()
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 3
    last = json.loads(out.strip().splitlines()[-1])
    assert last["outcome"] == "rolled_back" and last["exit"] == 3 and "rolled back by" in last["reason"]

    # still baking when the time is up: exit 5, saying where it is
    deploy("m:3", bake=60)
    late = cli(server, "rollout", "status", "d", "--wait", "--timeout", "1", ok=False)
    assert late.returncode == 5 and "timed out after 1s" in late.stdout and "is still wave[1].baking" in late.stdout

    # aborted (as halted and superseded would be): exit 4; a rollout followed by --id keeps its own outcome
    rid = admin.get("/api/v1/rollouts/d").json()["id"]
    admin.post("/api/v1/rollouts/d/abort").raise_for_status()
    aborted = cli(server, "rollout", "status", "d", "--wait", ok=False)
    assert aborted.returncode == 4 and "aborted" in aborted.stdout
    deploy("m:4")
    assert cli(server, "rollout", "status", "d", "--wait", "--id", str(rid), ok=False).returncode == 4
    assert cli(server, "rollout", "status", "d", "--wait").returncode == 0

    # the hub goes away while a job waits: it says so and keeps waiting until its timeout
    deploy("m:1", bake=60)
    proc = follow(server, "d", "--wait", "--timeout", "5", "--interval", "0.2")
    assert "wave[1].baking" in proc.stdout.readline()
    server.stop()
    out, errors = proc.communicate(timeout=60)
    assert proc.returncode == 5 and "timed out after" in out
    assert "cannot reach the hub" in errors and "still waiting" in errors


def test_deploy_edge_and_web_from_a_model_file_in_one_command(server, admin, tmp_path):
    model = write_logreg_onnx(tmp_path / "churn.onnx")
    sample = write_sample(tmp_path / "sample.json")
    res = cli(server, "deploy", "edge", "churn-edge", "--model", str(model), "--sample", str(sample),
              "--target", "site=nowhere", "--strategy", "canary:1", "--json")
    steps = [line.split()[:2] for line in res.stderr.splitlines() if line.startswith("[")]
    assert steps == [["[1/4]", "register"], ["[2/4]", "build"], ["[3/4]", "sign"], ["[4/4]", "deploy"]]
    out = as_json(res)
    assert out["module"] == "churn-edge:1" and [s["step"] for s in out["steps"]] == ["register", "build", "sign",
                                                                                    "deploy"]
    assert admin.get("/api/v1/models/churn-edge/versions/1").json()["framework"] == "onnx"
    assert admin.get("/api/v1/modules/churn-edge/versions/1").json()["models"] == ["churn-edge:1"]
    assert admin.get("/api/v1/deployments/churn-edge").json()["module"] == "churn-edge:1"

    # the web: the same one step, then the endpoint answers what onnxruntime computes from the file
    web = as_json(cli(server, "deploy", "web", "churn-web", "--model", str(model), "--model-name", "churn",
                      "--sample", str(sample), "--json"))
    assert [s["step"] for s in web["steps"]] == ["register", "build", "sign", "deploy"] and web["steps"][1]["module"] \
        == "churn:1"
    x = np.random.default_rng(3).normal(size=(5, 4)).astype(np.float32)
    got = httpx.post(web["url"], json={"inputs": {"x": x.tolist()}}, headers={"api-key": web["keys"]["primary"]})
    assert got.status_code == 200
    want = ort.InferenceSession(str(model)).run(None, {"x": x})[0]
    assert np.allclose(np.asarray(got.json()["outputs"]["probability"]), want, atol=1e-6)
    # the web by alias too: resolved when deployed
    cli(server, "model", "alias", "set", "churn", "champion", "1")
    again = as_json(cli(server, "deploy", "web", "churn-web", "--module", "churn@champion", "--json"))
    assert again["requested"] == "churn@champion" and "resolved to churn:1" in again["resolved"]
    cli(server, "endpoint", "delete", "churn-web")

    both = cli(server, "deploy", "edge", "x", "--model", str(model), "--module", "churn:1", ok=False)
    assert both.returncode == 2 and "give --module" in " ".join(both.stderr.split())
