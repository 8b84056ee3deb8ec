"""`deploy web`, `endpoint …` and `serve` as `python -m edgefleet`: a real hub, real gateway and worker processes."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys

import httpx
import pytest

from modules.examples import write_logreg_onnx, write_sample
from tests.clirun import ROOT, as_json, cli


@pytest.fixture
def module(server, tmp_path) -> str:
    cli(server, "model", "register", "lr", str(write_logreg_onnx(tmp_path / "model.onnx")))
    cli(server, "model", "register", "lr", str(write_logreg_onnx(tmp_path / "model.onnx", seed=2)))
    sample = write_sample(tmp_path / "sample.json")
    cli(server, "module", "build", "lrmod", "--model", "lr:1", "--sample", str(sample))
    cli(server, "module", "build", "lrmod", "--model", "lr:2", "--sample", str(sample))
    return "lrmod:1"


def test_deploy_web_and_the_endpoint_commands(server, module):
    ep = as_json(cli(server, "deploy", "web", "scoring", "--module", module, "--replicas", "2", "--max-batch", "8",
                "--max-wait-ms", "1", "--json"))
    assert ep["url"].endswith("/endpoints/scoring/score") and set(ep["keys"]) == {"primary", "secondary"}
    body = {"inputs": {"x": [[0.1, 0.2, 0.3, 0.4]]}}
    assert httpx.post(ep["url"], json=body, headers={"api-key": ep["keys"]["primary"]}).status_code == 200

    listed = as_json(cli(server, "endpoint", "list", "--json"))
    assert [(e["name"], e["replicas"], e["max_batch"]) for e in listed] == [("scoring", 2, 8)]
    shown = as_json(cli(server, "endpoint", "show", "scoring", "--json"))
    assert len(shown["status"]["versions"][0]["workers"]) == 2 and "keys" not in shown

    keys = as_json(cli(server, "endpoint", "keys", "scoring", "--regenerate", "secondary", "--json"))
    assert keys["primary"] == ep["keys"]["primary"] and keys["secondary"] != ep["keys"]["secondary"]
    assert httpx.post(ep["url"], json=body, headers={"api-key": ep["keys"]["secondary"]}).status_code == 401
    assert httpx.post(ep["url"], json=body, headers={"api-key": keys["secondary"]}).status_code == 200

    cli(server, "deploy", "web", "scoring", "--module", "lrmod:2", "--traffic", "25")
    split = as_json(cli(server, "endpoint", "traffic", "scoring", "lrmod:1=60", "lrmod:2=40", "--json"))
    assert {v["module"]: v["weight"] for v in split["versions"]} == {"lrmod:1": 60.0, "lrmod:2": 40.0}

    refused = cli(server, "model", "delete", "lr:2", ok=False)
    assert refused.returncode == 1 and "web endpoint 'scoring'" in " ".join(refused.stderr.split())
    cli(server, "endpoint", "delete", "scoring")
    assert as_json(cli(server, "endpoint", "list", "--json")) == []
    cli(server, "model", "delete", "lr:2")


def test_serve_runs_a_pulled_bundle_without_the_hub(server, module, tmp_path):
    bundle = tmp_path / "bundle"
    cli(server, "bundle", "pull", module, str(bundle))
    root = server.config.data_dir / "keys" / "root.json"
    proc = subprocess.Popen([sys.executable, "-m", "edgefleet", "serve", str(bundle), "--root", str(root), "--host",
                             "127.0.0.1", "--port", "0", "--workers", "2", "--threads", "2", "--key", "k-one", "--json"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        ready = json.loads(proc.stdout.readline())  # printed once verified, loaded, health-checked and listening
        url = ready["url"]
        assert url.endswith("/endpoints/lrmod/score") and ready["keys"] == ["k-one"]
        r = httpx.post(url, json={"inputs": {"x": [[0.1, 0.2, 0.3, 0.4]]}}, headers={"Authorization": "Bearer k-one"})
        assert r.status_code == 200 and f'{r.json()["module"]}:{r.json()["version"]}' == module
        assert r.headers["x-edgefleet-version"] == module
        assert httpx.post(url, json={"inputs": {"x": [[0.1]]}}, headers={"api-key": "k-one"}).status_code == 422
        assert httpx.post(url, json={"inputs": {"x": [[0.1, 0.2, 0.3, 0.4]]}}).status_code == 401
        assert httpx.get(url.rsplit("/endpoints", 1)[0] + "/readyz").status_code == 200
        # Prometheus: this endpoint's own counters, for its key holders (a hub's /metrics carries the hub's endpoints)
        metrics = url.rsplit("/endpoints", 1)[0] + "/metrics"
        assert httpx.get(metrics).status_code == 401
        text = httpx.get(metrics, headers={"Authorization": "Bearer k-one"}).text
        for line in ('edgefleet_hub_endpoint_up{endpoint="lrmod"} 1',
                     'edgefleet_hub_endpoint_responses_total{endpoint="lrmod",code="200"} 1',
                     'edgefleet_hub_endpoint_responses_total{endpoint="lrmod",code="422"} 1',
                     f'edgefleet_hub_endpoint_latency_ms_count{{endpoint="lrmod",version="{module}"}} 1'):
            assert line in text.splitlines(), (line, text)
        # the gateway's HTTP/1.1 as a raw client sees it: pipelined answers in order, refusals that close
        port, path = int(url.split(":")[2].split("/")[0]), "/endpoints/lrmod/score"
        ok, bad = (b'{"inputs": {"x": [[0.1, 0.2, 0.3, 0.4]]}}', b'{"inputs": {"x": [[0.1]]}}')
        req = [b"POST %s HTTP/1.1\r\nHost: t\r\napi-key: k-one\r\nContent-Length: %d\r\n\r\n%s" % (path.encode(), len(b), b)
               for b in (ok, bad, ok)]
        answers = raw(port, b"".join(req), 3)
        assert [a.split(b" ")[1] for a in answers] == [b"200", b"422", b"200"]
        chunked = b"POST %s HTTP/1.1\r\nHost: t\r\napi-key: k-one\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
        assert raw(port, chunked % path.encode(), 1)[0].startswith(b"HTTP/1.1 411 ")
        two = b"POST %s HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nContent-Length: 50\r\n\r\nhello" % path.encode()
        assert raw(port, two, 1)[0].startswith(b"HTTP/1.1 400 ")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, proc.stderr.read() if proc.stderr else ""


def raw(port: int, data: bytes, answers: int) -> list[bytes]:
    """Send ``data`` on one connection; the first ``answers`` HTTP answers (heads and bodies), cut by Content-Length."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(data)
        buf, out = b"", []
        while len(out) < answers:
            end = buf.find(b"\r\n\r\n")
            length = int(buf[:end].lower().split(b"content-length: ")[1].split(b"\r\n")[0]) if end >= 0 else -1
            if end >= 0 and len(buf) >= end + 4 + length:
                out.append(buf[:end + 4 + length])
                buf = buf[end + 4 + length:]
                continue
            chunk = sock.recv(65536)
            assert chunk, f"the connection closed after {len(out)} answer(s): {buf[:200]!r}"
            buf += chunk
        return out


def test_serve_refuses_a_tampered_bundle(server, module, tmp_path):
    bundle = tmp_path / "bundle"
    cli(server, "bundle", "pull", module, str(bundle))
    (bundle / "files" / "model.onnx").write_bytes(b"not the signed model")
    proc = subprocess.run([sys.executable, "-m", "edgefleet", "serve", str(bundle), "--root",
                           str(server.config.data_dir / "keys" / "root.json"), "--port", "0", "--key", "k"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "model.onnx" in proc.stderr
