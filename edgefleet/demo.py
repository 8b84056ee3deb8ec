"""``edgefleet demo``: broker + hub + simulated fleet + a real ONNX model, deployed, with live telemetry.

Every step goes through the same public interfaces a user has: the hub's HTTP
API, MQTT between hub and devices, and real agents running the signed bundle.
"""

from __future__ import annotations

import json
import logging
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

from edgefleet.broker import LocalBroker, free_port
from edgefleet.client import HubClient
from hub.config import HubConfig
from hub.server import HubServer
from modules.examples import write_logreg_onnx, write_sample
from simulator.fleet import Fleet

log = logging.getLogger("edgefleet.demo")

MODEL_NAME = "demo-logreg"
MODULE_NAME = "demo-logreg"
DEPLOYMENT = "demo"


@dataclass
class DemoOptions:
    devices: int = 5
    duration: float | None = None
    data_dir: Path | None = None
    mqtt_url: str | None = None
    host: str = "127.0.0.1"
    port: int = 0
    rate: float = 5.0  # inferences per second per device
    telemetry_interval: float = 2.0


@dataclass
class Demo:
    """The running pieces; ``stop()`` undoes ``start()`` completely."""

    options: DemoOptions
    stack: ExitStack = field(default_factory=ExitStack)
    hub: HubServer | None = None
    broker: LocalBroker | None = None
    fleet: Fleet | None = None
    client: HubClient | None = None
    module_ref: str = ""

    def start(self) -> Demo:
        opts = self.options
        data = opts.data_dir or Path(tempfile.mkdtemp(prefix="edgefleet-demo-"))
        if opts.data_dir is None:
            self.stack.callback(shutil.rmtree, data, True)
        data.mkdir(parents=True, exist_ok=True)
        mqtt_url = opts.mqtt_url
        if mqtt_url is None:
            self.broker = LocalBroker(host="127.0.0.1").start()
            self.stack.callback(self.broker.stop)
            mqtt_url = self.broker.url
        self.hub = HubServer(HubConfig(data_dir=data / "hub", mqtt_url=mqtt_url, sandbox="auto"),
                             host=opts.host, port=opts.port or free_port(opts.host)).start()
        self.stack.callback(self.hub.stop)
        self.client = HubClient(self.hub.url, self.hub.admin_token)
        self.stack.callback(self.client.close)

        model_dir = data / "model"
        model_dir.mkdir(exist_ok=True)
        onnx_path = write_logreg_onnx(model_dir / "logreg.onnx")
        sample = json.loads(write_sample(model_dir / "sample.json").read_text())
        model = self.client.register_model(MODEL_NAME, [onnx_path], tags={"task": "classification", "demo": "true"},
                                           description="logistic regression trained at demo start")
        module = self.client.post("/api/v1/modules", {
            "name": MODULE_NAME, "models": [f"{model['name']}:{model['version']}"], "sample": sample,
            "collect_rate_ppm": 10_000})
        self.module_ref = f"{module['name']}:{module['version']}"
        self.client.post("/api/v1/deployments", {"name": DEPLOYMENT, "module": self.module_ref, "target": "*"})
        log.info("registered %s:%s, built module %s (%s), deployed to '*'",
                 model["name"], model["version"], self.module_ref, module["digest"][:12])

        self.fleet = Fleet(hub_url=self.hub.url, api_token=self.hub.admin_token, n=opts.devices,
                           data_root=data / "devices", mqtt_url=mqtt_url, rate=opts.rate,
                           telemetry_interval=opts.telemetry_interval, prefix="demo")
        self.fleet.start()
        self.stack.callback(self.fleet.stop)
        return self

    def devices(self) -> list[dict[str, Any]]:
        """What the hub knows of each device, in the demo's summary form."""
        assert self.client is not None
        rows = []
        for d in self.client.get("/api/v1/devices"):
            mods = d.get("modules") or []
            rows.append({
                "id": d["id"], "online": d.get("online", False), "state": d.get("state", "unknown"),
                "module": ", ".join(f"{m['name']}:{m['version']}" for m in mods) or None,
                "inferences": int(d.get("inferences") or 0), "errors": int(d.get("errors") or 0),
            })
        return sorted(rows, key=lambda r: r["id"])

    def summary(self) -> dict[str, Any]:
        assert self.hub is not None
        devices = self.devices()
        return {
            "hub": self.hub.url, "mqtt": self.broker.url if self.broker else self.options.mqtt_url,
            "module": self.module_ref, "devices": devices,
            "running": sum(d["state"] == "running" for d in devices),
            "inferences": sum(d["inferences"] for d in devices),
        }

    def stop(self) -> None:
        self.stack.close()


def run_demo(options: DemoOptions, as_json: bool, stop_event: threading.Event | None = None,
             console: Console | None = None) -> dict[str, Any]:
    """Run until ``duration`` passes, Ctrl-C or SIGTERM; return (and print) the final summary."""
    console = console or Console(stderr=True)
    stop_event = stop_event or threading.Event()
    with stop_on_signals(stop_event):
        return _run(options, as_json, stop_event, console)


@contextmanager
def stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """SIGINT and SIGTERM set ``stop`` (a second one interrupts at once), so the summary is still printed.

    Explicit handlers, not Python's default: a process started in the background by a shell inherits SIGINT
    ignored, and SIGTERM's default action would end it before anything is printed.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)


def _run(options: DemoOptions, as_json: bool, stop_event: threading.Event, console: Console) -> dict[str, Any]:
    demo = Demo(options)
    try:
        with console.status("starting broker, hub and fleet…"):
            demo.start()
        assert demo.hub is not None
        console.print(f"[bold]hub[/] {demo.hub.url}  (console {demo.hub.url}/console/, API docs {demo.hub.url}/docs)"
                      f"   [bold]admin token[/] {demo.hub.admin_token}")
        deadline = time.monotonic() + options.duration if options.duration else None

        def table() -> Table:
            s = demo.summary()
            t = Table(title=f"edgefleet demo — {s['module']} on {len(s['devices'])} devices, "
                            f"{s['running']} running, {s['inferences']} inferences reported")
            for col in ("device", "online", "state", "module", "inferences", "errors"):
                t.add_column(col)
            for d in s["devices"]:
                t.add_row(d["id"], "yes" if d["online"] else "no", d["state"], d["module"] or "-",
                          str(d["inferences"]), str(d["errors"]))
            return t

        try:
            with Live(table(), console=console, refresh_per_second=2, transient=as_json) as live:
                while not stop_event.is_set() and (deadline is None or time.monotonic() < deadline):
                    stop_event.wait(1.0)
                    live.update(table())
        except KeyboardInterrupt:
            console.print("stopping…")
        result = demo.summary()
    finally:
        demo.stop()
    if as_json:
        print(json.dumps(result, indent=2))
    return result
