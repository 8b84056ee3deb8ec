"""The Kubernetes manifests (deploy/k8s) parse, fit together, and only use commands, options and settings that exist.

No cluster here: this checks what a cluster would reject or silently ignore (a resource kustomize cannot
find, a probe on a port the container does not expose, a command-line option or an environment setting
the edgefleet command does not read).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from typer.main import get_command

from edgefleet.cli import app

K8S = Path(__file__).resolve().parents[1] / "deploy" / "k8s"
ENV_READ_ELSEWHERE = {"EDGEFLEET_ADMIN_TOKEN"}  # read by the hub itself (hub/trust/tokens.py), not by an option
LIBPQ = {"PGPASSWORD", "PGSSLMODE"}  # psycopg (libpq) reads these


def documents() -> dict[str, list[dict[str, Any]]]:
    return {p.name: [d for d in yaml.safe_load_all(p.read_text()) if d] for p in sorted(K8S.glob("*.yaml"))}


def resolve(args: list[str]) -> tuple[Any, list[Any]]:
    """The (click) command ``edgefleet ARGS`` runs, and every parameter on its way (global options included)."""
    cmd = get_command(app)
    params = list(cmd.params)
    for word in args:
        if hasattr(cmd, "commands") and word in cmd.commands:
            cmd = cmd.commands[word]
            params += cmd.params
    return cmd, params


def test_the_manifests_parse_and_kustomize_finds_every_resource():
    docs = documents()
    kustomization = docs.pop("kustomization.yaml")[0]
    assert sorted(kustomization["resources"]) == sorted(n for n in docs if n != "secret.example.yaml")
    kinds = {(d["kind"], d["metadata"]["name"]) for ds in docs.values() for d in ds}
    assert {("Deployment", "edgefleet-hub"), ("Deployment", "edgefleet-ingest"), ("Service", "edgefleet-hub"),
            ("Deployment", "edgefleet-endpoint-scorer"), ("ConfigMap", "edgefleet"), ("Secret", "edgefleet"),
            ("PersistentVolumeClaim", "edgefleet-shared")} <= kinds


def test_every_container_runs_a_real_command_with_real_options_and_settings():
    docs = [d for ds in documents().values() for d in ds]
    config = {k for d in docs if d["kind"] in ("ConfigMap", "Secret") for k in (d.get("data") or d.get("stringData"))}
    deployments = [d for d in docs if d["kind"] == "Deployment"]
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    read_by_some_command: set[str] = set()
    for dep in deployments:
        spec = dep["spec"]["template"]["spec"]
        assert dep["spec"]["selector"]["matchLabels"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
        for c in spec.get("initContainers", []) + spec["containers"]:
            cmd, params = resolve(c["args"])
            assert not hasattr(cmd, "commands"), f"{dep['metadata']['name']}: {c['args']} is not a command"
            known = {o for p in params for o in p.opts}
            used = [a.split("=")[0] for a in c["args"] if a.startswith("--")]
            assert set(used) <= known, (c["name"], set(used) - known)
            envvars = {p.envvar for p in params if p.envvar}
            read_by_some_command |= envvars
            for e in c.get("env", []):
                assert e["name"] in envvars | LIBPQ, (c["name"], e["name"])
            ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
            for probe in ("readinessProbe", "livenessProbe"):
                if probe in c:
                    assert c[probe]["httpGet"]["port"] in ports, (c["name"], probe)
    for name in config:
        assert name in read_by_some_command | ENV_READ_ELSEWHERE | LIBPQ, f"nothing reads {name}"
    hub = next(d for d in deployments if d["metadata"]["name"] == "edgefleet-hub")
    container = hub["spec"]["template"]["spec"]["containers"][0]
    assert hub["spec"]["replicas"] >= 2
    assert container["readinessProbe"]["httpGet"]["path"] == container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert services["edgefleet-hub"]["spec"]["selector"] == hub["spec"]["selector"]["matchLabels"]
