"""The hub's side of the device protocol, for agent tests while the real hub is built elsewhere.

Signs bundles and desired states with fresh keys, answers BlobRequests from
memory (optionally tampering with chunks), and records what devices publish,
all over a real paho client on the real test broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.core import Agent
from agent.identity import Identity, save_identity
from modules.bundle import build_manifest, read_blocks, sign_release
from modules.chunking import bundle_spans, cut_files
from modules.examples import write_logreg_onnx, write_sample
from protocol.broker_url import parse_broker_url
from protocol.encoding import canonical_json
from protocol.manifest import Manifest, TensorSpec, split_chunks
from protocol.messages import (
    BlobRequest,
    DesiredModule,
    DesiredState,
    HubStatus,
    ReportedState,
    TelemetryBatch,
    decode,
)
from protocol.signing import Root, load_trusted_root, make_root, sign
from protocol.topics import HUB_STATUS_TOPIC, Channel, blob_topic, device_topic, parse_topic, root_topic

X_SPEC = [TensorSpec(name="x", dtype="float32", shape=[None, 4])]
P_SPEC = [TensorSpec(name="probability", dtype="float32", shape=[None, 1])]
FAILING_SCRIPT = "def run(inputs):\n    raise RuntimeError('this model is broken')\n"


@dataclass
class Bundle:
    manifest: Manifest
    envelope: dict[str, Any]
    chunks: dict[str, bytes]

    @property
    def digest(self) -> str:
        return self.manifest.digest()

    def desired(self, collect_rate_ppm: int = 0) -> DesiredModule:
        return DesiredModule(name=self.manifest.name, version=self.manifest.version, bundle=self.digest,
                             size=self.manifest.size, deployment="test", collect_rate_ppm=collect_rate_ppm)


class HubSide:
    def __init__(self, broker_url: str, workdir: Path) -> None:
        self.workdir = workdir
        self.root_key, self.release_key, self.director_key = (Ed25519PrivateKey.generate() for _ in range(3))
        self.root = make_root({"root": [self.root_key], "release": [self.release_key], "director": [self.director_key]},
                              [self.root_key])
        self.broker_url = broker_url
        self.bundles: dict[str, Bundle] = {}
        self.tamper: dict[str, int] = defaultdict(int)  # chunk digest -> how many more times to send bad bytes
        self.serve_manifest = True
        self.coalesce = 1.0  # like the hub: a part published less than this many seconds ago is not sent again
        self._sent: dict[tuple[str, str], float] = {}
        self.requests: list[BlobRequest] = []
        self.received: dict[tuple[str, str], list[bytes]] = defaultdict(list)
        self.chunk_bytes_sent: dict[str, int] = defaultdict(int)  # bundle -> bytes of chunks published
        self._cond = threading.Condition()
        b = parse_broker_url(broker_url)
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"hubside-{id(self)}", protocol=mqtt.MQTTv5)
        self.client.on_message = self._on_message
        connected = threading.Event()
        # Like the hub: subscribe, then say "online" (retained), or agents that heard a hub hold their outbox.
        self.client.on_connect = lambda *a: (self.client.subscribe("edgefleet/v1/devices/+/+", qos=1),
                                             self.client.publish(HUB_STATUS_TOPIC, HubStatus(online=True).encode(),
                                                                 qos=1, retain=True),
                                             connected.set())
        self.client.connect(b.host, b.port)
        self.client.loop_start()
        if not connected.wait(10):
            raise RuntimeError("hub side could not connect to the test broker")

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()

    def trusted_root(self) -> Root:
        """The verified root, as a device holds it after enrolment."""
        return load_trusted_root(self.root)

    # --- identity, bundles, desired states ---------------------------------------------------

    def identity(self, device_id: str, data_dir: Path) -> Identity:
        ident = Identity(device_id=device_id, mqtt_url=self.broker_url, mqtt_username=None, mqtt_password=None,
                         root=self.root)
        save_identity(data_dir, ident)
        return ident

    def build(self, name: str, version: int, *, failing: bool = False, pad_bytes: int = 0, pad_seed: int | None = None,
              collect_rate_ppm: int = 0, script: str | None = None, extra: dict[str, bytes] | None = None,
              model_seed: int | None = None, spans: bool = False, release_expires: int | None = None,
              model_file: tuple[Path, list[TensorSpec], list[TensorSpec]] | None = None) -> Bundle:
        """A logreg ONNX bundle; ``failing`` or ``script`` make it a Python module running that script instead,
        ``model_file`` (an .onnx or .tflite file, its inputs, its outputs) that model without a sample.

        ``spans`` lists content-defined spans in the release, as the real hub does; without, the release is
        in the format from before spans (fixed-size chunks only)."""
        if failing:
            script = FAILING_SCRIPT
        d = self.workdir / f"{name}-v{version}-{'ok' if script is None else abs(hash(script))}"
        d.mkdir(parents=True, exist_ok=True)
        files = {"sample.json": write_sample(d / "sample.json")}
        specs, sample = (X_SPEC, P_SPEC), "sample.json"
        if model_file is not None:
            runtime, model = model_file[0].suffix[1:], f"model{model_file[0].suffix}"
            files, specs, sample = {model: model_file[0]}, (model_file[1], model_file[2]), ""
        elif script is not None:
            (d / "main.py").write_text(script)
            files["main.py"] = d / "main.py"
            runtime, model = "python", "main.py"
        else:
            files["model.onnx"] = write_logreg_onnx(d / "model.onnx", seed=version if model_seed is None else model_seed)
            runtime, model = "onnx", "model.onnx"
        if pad_bytes:
            (d / "pad.bin").write_bytes(np.random.default_rng(version if pad_seed is None else pad_seed).bytes(pad_bytes))
            files["pad.bin"] = d / "pad.bin"
        for path, data in (extra or {}).items():
            (d / path).write_bytes(data)
            files[path] = d / path
        manifest = build_manifest(name, version, runtime, files, model=model, sample=sample, inputs=specs[0],
                                  outputs=specs[1], collect_rate_ppm=collect_rate_ppm)
        cut = bundle_spans(manifest, cut_files(files)) if spans else None
        expires = int(time.time()) + 3600 if release_expires is None else release_expires
        envelope = sign_release(manifest, [self.release_key], expires, cut)
        chunks: dict[str, bytes] = {}
        for entry in manifest.files:
            for digest, data in zip(entry.chunks, split_chunks(read_blocks(files[entry.path])), strict=True):
                chunks[digest] = data
            offset, data = 0, files[entry.path].read_bytes()
            for span in cut.files.get(entry.path, []) if cut else []:
                chunks[span.sha256] = data[offset:offset + span.size]
                offset += span.size
        bundle = Bundle(manifest, envelope, chunks)
        self.bundles[bundle.digest] = bundle
        return bundle

    def desired_envelope(self, device: str, revision: int, modules: list[DesiredModule], *,
                         key: Ed25519PrivateKey | None = None, expires: int | None = None) -> dict[str, Any]:
        state = DesiredState(device=device, revision=revision, modules=modules,
                             expires=int(time.time()) + 3600 if expires is None else expires)
        return sign(state.to_dict(), [key or self.director_key])

    def publish_desired(self, device: str, revision: int, modules: list[DesiredModule], **kw: Any) -> None:
        self.publish_raw(device_topic(device, Channel.DESIRED),
                         canonical_json(self.desired_envelope(device, revision, modules, **kw)), retain=True)

    def publish_raw(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(10)

    # --- serving blobs and recording devices -------------------------------------------------

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        t = parse_topic(msg.topic)
        channel = t.channel.value  # type: ignore[union-attr]
        device = t.device_id  # type: ignore[union-attr]
        if channel in ("desired", "cmd"):
            return
        with self._cond:
            self.received[(device, channel)].append(msg.payload)
            self._cond.notify_all()
        if channel == "blob-req":
            req = decode(Channel.BLOB_REQ, msg.payload)
            assert isinstance(req, BlobRequest)
            with self._cond:
                self.requests.append(req)
            self._serve(req)

    def _serve(self, req: BlobRequest) -> None:
        bundle = self.bundles.get(req.bundle)
        if bundle is None:
            return
        if req.manifest and self.serve_manifest and self._due(req.bundle, "manifest"):
            self.client.publish(blob_topic(req.bundle, "manifest"), canonical_json(bundle.envelope), qos=1)
        for digest in req.chunks:
            data = bundle.chunks.get(digest)
            if data is None or not self._due(req.bundle, digest):
                continue
            with self._cond:
                bad = self.tamper[digest] > 0
                self.tamper[digest] -= 1 if bad else 0
            if bad:
                data = bytes(b ^ 0xFF for b in data[:16]) + data[16:]
            with self._cond:
                self.chunk_bytes_sent[req.bundle] += len(data)
            self.client.publish(blob_topic(req.bundle, digest), data, qos=1)

    def _due(self, bundle: str, part: str) -> bool:
        now = time.monotonic()
        with self._cond:
            if now - self._sent.get((bundle, part), -1e9) < self.coalesce:
                return False
            self._sent[(bundle, part)] = now
            return True

    def messages(self, device: str, channel: Channel) -> list[bytes]:
        with self._cond:
            return list(self.received[(device, channel.value)])

    def reported(self, device: str) -> ReportedState | None:
        msgs = self.messages(device, Channel.REPORTED)
        return decode(Channel.REPORTED, msgs[-1]) if msgs else None  # type: ignore[return-value]

    def telemetry(self, device: str) -> list[TelemetryBatch]:
        return [decode(Channel.TELEMETRY, p) for p in self.messages(device, Channel.TELEMETRY)]  # type: ignore[misc]

    def chunk_requests(self, bundle: str) -> list[str]:
        with self._cond:
            return [c for r in self.requests if r.bundle == bundle for c in r.chunks]

    def module_state(self, device: str, name: str) -> str | None:
        rep = self.reported(device)
        mod = next((m for m in rep.modules if m.name == name), None) if rep else None
        return mod.state if mod else None


async def until(predicate: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
    """Wait on the event loop until ``predicate()`` is truthy, or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)


def clear_hub_retained(broker_url: str, root_versions: int = 9) -> None:
    """Clear what a stopped hub left retained (its status, its roots), so later tests on a shared broker (one per
    pytest worker) never hear a stranger's hub or root."""
    from hub.testing import MqttProbe

    probe = MqttProbe(broker_url)
    try:
        for topic in [HUB_STATUS_TOPIC, *(root_topic(v) for v in range(1, root_versions + 1))]:
            probe.publish(topic, b"", retain=True)
    finally:
        probe.close()


def new_device() -> str:
    """A fresh device id: retained desired states outlive a test on the session broker."""
    return f"dev-{uuid.uuid4().hex[:10]}"


@contextlib.asynccontextmanager
async def running_agent(hub: HubSide, device: str, data_dir: Path, **kw: Any) -> AsyncIterator[Agent]:
    """An agent for ``device`` running on this loop, connected before the body starts, stopped after."""
    async with agent_running(hub.identity(device, data_dir), data_dir, **kw) as agent:
        yield agent


@contextlib.asynccontextmanager
async def agent_running(identity: Identity, data_dir: Path, **kw: Any) -> AsyncIterator[Agent]:
    """An agent with ``identity`` running on this loop (fast test timings), connected first, stopped after."""
    kw.setdefault("telemetry_interval", 0.3)
    kw.setdefault("blob_retry", 0.5)
    agent = Agent(identity, data_dir, **kw)
    task = asyncio.create_task(agent.run())
    try:
        await until(lambda: agent.client.connected.is_set() or task.done(), 10, "agent connected")
        if task.done():
            task.result()
        yield agent
    finally:
        await agent.stop()
        await asyncio.wait_for(task, 10)


class RealHub:
    """The real hub (``hub.server.HubServer``) on a given broker, with helpers to enrol devices and deploy a model."""

    def __init__(self, broker_url: str, workdir: Path) -> None:
        from edgefleet.client import HubClient
        from hub import HubConfig, HubServer

        self.workdir = workdir
        from tests.pg import hub_db

        config = HubConfig(workdir / "hub", broker_url, mqtt_client_id=f"hub-{uuid.uuid4().hex[:8]}",
                           admin_token=f"test-admin-{uuid.uuid4().hex}", **hub_db(workdir / "hub"))
        self.server = HubServer(config).start()
        if not self.server.wait_mqtt(15):
            self.server.stop()
            raise RuntimeError("hub did not connect to the broker")
        self.url = self.server.url
        self.api = HubClient(self.server.url, self.server.admin_token)
        self._models = 0

    def close(self) -> None:
        url = self.server.hub.config.mqtt_url
        versions = self.server.hub.keys.root.version
        self.api.close()
        self.server.stop()
        clear_hub_retained(url, versions)

    def enroll(self, data_dir: Path, device_id: str | None = None) -> Identity:
        from agent.identity import enroll

        token = self.api.post("/api/v1/enrollment-tokens", {})["tokens"][0]
        return enroll(self.url, token, data_dir, device_id=device_id or new_device())

    def deploy(self, device_id: str, module: str = "classifier") -> dict[str, Any]:
        """Register a fresh logreg model, build ``module`` from it and deploy it to ``device_id``; the module record."""
        import json

        self._models += 1
        d = self.workdir / f"model{self._models}"
        d.mkdir(parents=True, exist_ok=True)
        model = self.api.register_model(f"{module}-model", [write_logreg_onnx(d / "logreg.onnx", seed=self._models)])
        sample = json.loads(write_sample(d / "sample.json").read_text())
        built = self.api.post("/api/v1/modules", {"name": module, "models": [f"{model['name']}:{model['version']}"],
                                                  "sample": sample})
        self.api.post("/api/v1/deployments", {"name": f"{module}-{device_id}", "module": f"{module}:{built['version']}",
                                              "target": device_id})
        return built
