"""`edgefleet demo`: the README's first command, run as a user runs it."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]


def listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.3)
        return s.connect_ex(("127.0.0.1", port)) == 0


def descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def test_demo_json_every_device_runs_and_reports(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "edgefleet", "demo", "--devices", "3", "--duration", "25", "--json"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout)
    devices = result["devices"]
    assert len(devices) == 3
    for d in devices:
        assert {"id", "state", "module", "inferences"} <= d.keys()
        assert d["state"] == "running", d
        assert d["inferences"] > 0, d
        assert d["module"].startswith("demo-logreg:")
    # Everything it started is gone: the hub's and the broker's ports are closed.
    hub_port = int(result["hub"].rsplit(":", 1)[1])
    broker_port = int(result["mqtt"].rsplit(":", 1)[1])
    assert not listening(hub_port) and not listening(broker_port)


def test_demo_ctrl_c_stops_everything(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgefleet", "demo", "--devices", "2"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    hub_url = None
    deadline = time.monotonic() + 90
    assert proc.stderr is not None
    for line in proc.stderr:  # the demo prints the hub URL once everything is up
        m = re.search(r"hub (http://127\.0\.0\.1:\d+)", line)
        if m:
            hub_url = m.group(1)
            break
        assert time.monotonic() < deadline, "demo did not start in time"
    assert hub_url, "demo never printed its hub URL"
    children = descendants(proc.pid)
    assert children, "the demo should have started a broker process"
    hub_port = int(hub_url.rsplit(":", 1)[1])
    assert listening(hub_port)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=60)
    assert proc.returncode == 0
    assert not listening(hub_port)
    gone, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, f"left behind: {[p.cmdline() for p in alive]}"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_demo_json_without_duration_prints_its_summary_when_stopped(tmp_path, sig):
    """``demo --json`` until Ctrl-C or SIGTERM; started as a shell's background job, so SIGINT comes in ignored."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgefleet", "demo", "--devices", "2", "--json"], cwd=ROOT, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))  # what `cmd &` in a script does
    try:
        assert proc.stderr is not None
        deadline = time.monotonic() + 90
        for line in proc.stderr:
            if re.search(r"hub http://127\.0\.0\.1:\d+", line):
                break
            assert time.monotonic() < deadline, "demo did not start in time"
        children = descendants(proc.pid)
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0
        summary = json.loads(out)
        assert len(summary["devices"]) == 2 and summary["module"].startswith("demo-logreg:")
        gone, alive = psutil.wait_procs(children, timeout=10)
        assert not alive, f"left behind: {[p.cmdline() for p in alive]}"
    finally:
        if proc.poll() is None:
            for child in descendants(proc.pid):
                child.kill()
            proc.kill()
            proc.wait(10)
