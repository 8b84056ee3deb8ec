"""The registry, module, bundle and keys commands, run as `python -m edgefleet` against a real hub."""

from __future__ import annotations

from modules.examples import write_logreg_onnx, write_sample
from tests.clirun import as_json, cli


def test_model_commands_register_list_show_tag_download_delete(server, tmp_path):
    model = write_logreg_onnx(tmp_path / "model.onnx")
    first = as_json(cli(server, "model", "register", "fraud", str(model), "--tag", "stage=dev", "--description", "v1",
                        "--json"))
    assert first["name"] == "fraud" and first["version"] == 1
    second = as_json(cli(server, "model", "register", "fraud", str(model), "--tag", "stage=prod", "--tag", "team=risk",
                         "--parent", "fraud:1", "--dataset", "ds-42", "--property", "auc=0.93", "--json"))
    assert second["version"] == 2 and second["lineage"]["parent"] == "fraud:1"

    listed = as_json(cli(server, "model", "list", "--tag", "stage=prod", "--tag", "team=risk", "--json"))
    assert [(m["name"], m["version"]) for m in listed] == [("fraud", 2)]
    assert len(as_json(cli(server, "model", "list", "--name", "fraud", "--json"))) == 2

    shown = as_json(cli(server, "model", "show", "fraud", "--json"))  # no version: the newest
    assert shown["version"] == 2 and shown["properties"] == {"auc": "0.93"}
    assert "fraud:1" in cli(server, "model", "show", "fraud:1").stdout

    tagged = as_json(cli(server, "model", "tag", "fraud:2", "owner=ana", "--remove", "team", "--json"))
    assert tagged["tags"] == {"stage": "prod", "owner": "ana"}

    out = tmp_path / "downloaded"
    files = as_json(cli(server, "model", "download", "fraud:1", "--out", str(out), "--json"))
    assert (out / "model.onnx").read_bytes() == model.read_bytes() and files[0]["size"] == model.stat().st_size

    refused = cli(server, "model", "show", "fraud:9", ok=False)
    assert refused.returncode == 1 and "fraud:9 does not exist" in refused.stderr


def test_delete_refused_while_deployed_names_the_deployment(server, tmp_path):
    model = write_logreg_onnx(tmp_path / "model.onnx")
    cli(server, "model", "register", "churn", str(model))
    built = as_json(cli(server, "module", "build", "churn-svc", "--model", "churn:1", "--sample",
                        str(write_sample(tmp_path / "sample.json")), "--json"))
    assert built["version"] == 1 and len(built["digest"]) == 64
    cli(server, "deploy", "edge", "eu-fleet", "--module", "churn-svc:1", "--target", "site=eu")

    refused = cli(server, "model", "delete", "churn:1", ok=False)
    assert refused.returncode == 1
    assert "in use by edge deployment 'eu-fleet' (module churn-svc:1)" in " ".join(refused.stderr.split())
    server.hub.deployments.delete("eu-fleet")
    deleted = as_json(cli(server, "model", "delete", "churn:1", "--json"))
    assert deleted["deleted"] is True


def test_module_build_from_toml_spec_with_entry_script(server, tmp_path):
    model = write_logreg_onnx(tmp_path / "model.onnx")
    cli(server, "model", "register", "logreg", str(model))
    write_sample(tmp_path / "sample.json")
    (tmp_path / "post.py").write_text("def postprocess(out):\n    return {'label': (out['probability'] > 0.5)}\n")
    (tmp_path / "module.toml").write_text('models = ["logreg:1"]\nentry = "post.py"\nsample = "sample.json"\n'
                                          'collect_rate_ppm = 5000\n[resources]\nmemory_mb = 64\n')
    built = as_json(cli(server, "module", "build", "labeller", "--spec", str(tmp_path / "module.toml"), "--json"))
    again = as_json(cli(server, "module", "build", "labeller", "--spec", str(tmp_path / "module.toml"), "--json"))
    assert again == built  # reproducible: same inputs, same version and digest
    info = server.hub.modules.get("labeller", 1)
    manifest = info["envelope"]["signed"]["manifest"]
    assert manifest["entry"] == "post.py" and manifest["collect_rate_ppm"] == 5000
    assert sorted(f["path"] for f in manifest["files"]) == ["model.onnx", "post.py", "sample.json"]
    assert server.hub.modules.resources("labeller", 1) == {"memory_mb": 64}
    assert server.hub.modules.sources("labeller", 1) == ["logreg:1"]
