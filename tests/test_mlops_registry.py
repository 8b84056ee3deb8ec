"""Registry aliases, recorded evaluations and deploying by alias, over a real hub and the real CLI."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from sklearn import metrics as skm

from modules.examples import N_FEATURES, synthetic_inputs, write_logreg_onnx, write_sample
from tests.clirun import as_json, cli

TRUE_W = np.array([1.5, -2.0, 0.5, 1.0])


def write_eval_csv(path: Path, n: int = 600, seed: int = 11) -> Path:
    """Rows drawn like the example model's training data, with their true label ``y``."""
    rng = np.random.default_rng(seed)
    x = synthetic_inputs(rng, n)
    y = (x @ TRUE_W + 0.3 * rng.normal(size=n) > 0).astype(int)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow([f"x{i}" for i in range(N_FEATURES)] + ["y"])
        for row, label in zip(x.round(5).tolist(), y.tolist()):
            w.writerow(row + [label])
    return path


def write_flipped_model(path: Path) -> Path:
    """The example model with its weights negated: a registered, loadable, much worse model."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(write_logreg_onnx(path)))
    for init in model.graph.initializer:
        init.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(init), init.name))
    path.write_bytes(model.SerializeToString())
    return path


def test_aliases_move_only_when_told_and_guard_their_version(server, admin, tmp_path):
    model = write_logreg_onnx(tmp_path / "model.onnx")
    for _ in range(3):
        cli(server, "model", "register", "churn", str(model))
    assert cli(server, "model", "alias", "set", "churn", "champion", "1").stdout.strip() == "churn@champion -> churn:1 (new)"
    moved = as_json(cli(server, "model", "alias", "set", "churn", "champion", "2", "--expect", "1", "--json"))
    assert moved == {"name": "churn", "alias": "champion", "version": 2, "previous": 1, "moved": True}
    # a promotion that looked at version 1 lost the race: refused, nothing moves
    stale = cli(server, "model", "alias", "set", "churn", "champion", "3", "--expect", "1", ok=False)
    assert stale.returncode == 1 and "names version 2, not version 1" in " ".join(stale.stderr.split())
    assert cli(server, "model", "alias", "get", "churn", "champion").stdout.strip() == "2"
    cli(server, "model", "alias", "set", "churn", "challenger", "3", "--expect", "none")

    shown = as_json(cli(server, "model", "show", "churn:2", "--json"))
    assert shown["aliases"] == ["champion"]
    listed = {m["version"]: m["aliases"] for m in as_json(cli(server, "model", "list", "--name", "churn", "--json"))}
    assert listed == {3: ["challenger"], 2: ["champion"], 1: []}
    assert [a["alias"] for a in admin.get("/api/v1/models/churn/aliases").json()] == ["challenger", "champion"]
    assert admin.get("/api/v1/models/churn/aliases/latest").json()["version"] == 3

    # refusals, each with its reason
    assert admin.put("/api/v1/models/churn/aliases/champion", json={"version": 9}).status_code == 404
    assert admin.put("/api/v1/models/churn/aliases/latest", json={"version": 1}).status_code == 422
    assert admin.put("/api/v1/models/churn/aliases/v2", json={"version": 1}).status_code == 422
    refused = admin.delete("/api/v1/models/churn/versions/2")
    assert refused.status_code == 409 and "alias churn@champion" in refused.json()["detail"]
    cli(server, "model", "alias", "delete", "churn", "challenger")
    assert admin.delete("/api/v1/models/churn/versions/3").status_code == 200

    moves = [(e["action"], e["detail"].get("version"), e["detail"].get("previous"))
             for e in reversed(admin.get("/api/v1/audit", params={"action": "alias.*"}).json())]
    assert moves == [("alias.moved", 1, None), ("alias.moved", 2, 1), ("alias.moved", 3, None),
                     ("alias.deleted", None, 3)]


def test_deploy_by_alias_resolves_now_and_records_the_version(server, admin, tmp_path):
    model = write_logreg_onnx(tmp_path / "model.onnx")
    sample = write_sample(tmp_path / "sample.json")
    for k in (1, 2):
        cli(server, "model", "register", "churn", str(write_logreg_onnx(tmp_path / f"m{k}.onnx", seed=k)))
    cli(server, "model", "alias", "set", "churn", "champion", "1")
    built = as_json(cli(server, "module", "build", "churn-svc", "--model", "churn@champion", "--sample", str(sample),
                        "--json"))
    assert built["version"] == 1 and built["models"] == ["churn:1"]
    cli(server, "module", "build", "churn-svc", "--model", "churn:2", "--sample", str(sample))

    res = as_json(cli(server, "deploy", "edge", "eu", "--module", "churn-svc@champion", "--target", "site=none",
                      "--json"))
    assert res["module"] == "churn-svc:1" and res["requested"] == "churn-svc@champion"
    assert res["resolved"] == "churn-svc@champion resolved to churn-svc:1 (built from churn:1)"
    revision = admin.get("/api/v1/deployments/eu/revisions").json()[0]
    assert revision["module"] == "churn-svc:1"
    audit = admin.get("/api/v1/audit", params={"action": "deployment.revision"}).json()[0]
    assert audit["detail"]["note"] == res["resolved"]

    # the alias moves: the deployment does not follow by itself, a new deploy by alias does
    cli(server, "model", "alias", "set", "churn", "champion", "2")
    assert admin.get("/api/v1/deployments/eu").json()["module"] == "churn-svc:1"
    res = as_json(cli(server, "deploy", "edge", "eu", "--module", "churn-svc@champion", "--target", "site=none",
                      "--json"))
    assert res["module"] == "churn-svc:2" and res["revision"] == 2

    # an alias naming a version no module was built from: refused with what to do
    cli(server, "model", "register", "churn", str(model))
    cli(server, "model", "alias", "set", "churn", "champion", "3")
    refused = cli(server, "deploy", "edge", "eu", "--module", "churn-svc@champion", ok=False)
    assert refused.returncode == 1
    assert "no version of module 'churn-svc' is built from it" in " ".join(refused.stderr.split())


def test_evaluate_runs_the_model_records_metrics_and_gates_on_the_champion(server, admin, tmp_path):
    data = write_eval_csv(tmp_path / "eval.csv")
    good = write_logreg_onnx(tmp_path / "good.onnx")
    cli(server, "model", "register", "churn", str(good))
    cli(server, "model", "register", "churn", str(write_flipped_model(tmp_path / "flipped.onnx")))

    # version 1 alone: the metrics equal scikit-learn's on onnxruntime's own outputs
    res = cli(server, "model", "evaluate", "churn:1", "--data", str(data), "--label", "y", "--metric", "accuracy",
              "--metric", "f1", "--metric", "auc", "--metric", "log_loss", "--threshold", "accuracy>=0.85", "--json")
    got = as_json(res)
    table = np.loadtxt(data, delimiter=",", skiprows=1)
    x, y = table[:, :N_FEATURES].astype(np.float32), table[:, N_FEATURES].astype(int)
    p = ort.InferenceSession(str(good)).run(None, {"x": x})[0].reshape(-1)
    assert got["metrics"]["accuracy"] == pytest.approx(skm.accuracy_score(y, p >= 0.5), abs=1e-9)
    assert got["metrics"]["f1"] == pytest.approx(skm.f1_score(y, p >= 0.5), abs=1e-9)
    assert got["metrics"]["auc"] == pytest.approx(skm.roc_auc_score(y, p), abs=1e-9)
    assert got["metrics"]["log_loss"] == pytest.approx(skm.log_loss(y, p), rel=1e-5)
    assert got["passed"] and got["metrics"]["accuracy"] >= 0.85 and got["dataset"]["rows"] == 600

    recorded = admin.get("/api/v1/models/churn/versions/1/metrics").json()
    assert len(recorded) == 1 and recorded[0]["metrics"] == got["metrics"]
    assert recorded[0]["dataset"]["sha256"] == got["dataset"]["sha256"]
    assert as_json(cli(server, "model", "show", "churn:1", "--json"))["metrics"] == got["metrics"]

    # the flipped version against the champion: worse on every metric, exit 3, alias untouched
    cli(server, "model", "alias", "set", "churn", "champion", "1")
    bad = cli(server, "model", "evaluate", "churn:2", "--data", str(data), "--label", "y", "--metric", "accuracy",
              "--metric", "auc", "--against", "champion", ok=False)
    assert bad.returncode == 3, bad.stderr
    assert "worse" in bad.stdout and "FAILED" in bad.stdout
    assert "recorded on the same data" in bad.stdout  # version 1's metrics were measured on this very file
    assert admin.get("/api/v1/models/churn/aliases/champion").json()["version"] == 1
    assert admin.get("/api/v1/models/churn/versions/2/metrics").json()[0]["metrics"]["accuracy"] < 0.2

    # a metric the champion has no record of on this data: measured now, on the same rows, and recorded
    again = as_json(cli(server, "model", "evaluate", "churn@champion", "--data", str(data), "--label", "y",
                        "--metric", "precision", "--against", "churn:2", "--json"))
    assert again["against"]["source"] == "measured now on the same data" and again["rows"][0]["verdict"] == "better"
    assert "precision" in admin.get("/api/v1/models/churn/versions/2/metrics").json()[0]["metrics"]

    # thresholds hold or fail by themselves
    high = cli(server, "model", "evaluate", "churn:1", "--data", str(data), "--label", "y",
               "--threshold", "accuracy>=0.999", "--no-record", ok=False)
    assert high.returncode == 3 and "fails threshold" in high.stdout
    bad_label = cli(server, "model", "evaluate", "churn:1", "--data", str(data), "--label", "target", ok=False)
    assert bad_label.returncode == 1 and "label column 'target' is not in the table" in bad_label.stderr


def test_metrics_api_refuses_what_a_comparison_could_not_use(server, admin, tmp_path):
    cli(server, "model", "register", "m", str(write_logreg_onnx(tmp_path / "model.onnx")))
    url = "/api/v1/models/m/versions/1/metrics"
    assert admin.post(url, json={"metrics": {}}).status_code == 422
    assert admin.post(url, json={"metrics": {"bad name": 1.0}}).status_code == 422
    assert admin.post(url, content=json.dumps({"metrics": {"acc": float("nan")}}).replace("NaN", "NaN"),
                      headers={"Content-Type": "application/json"}).status_code == 422
    assert admin.post(url, json={"metrics": {"acc": 1.0}, "dataset": {"sha256": "xyz"}}).status_code == 422
    assert admin.post("/api/v1/models/m/versions/7/metrics", json={"metrics": {"acc": 1.0}}).status_code == 404
    assert admin.post(url, json={"metrics": {"acc": 0.5}}).status_code == 201


def test_version_flag():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "edgefleet", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("edgefleet ") and out.stdout.split()[1][0].isdigit()
