"""A minimal edgefleet device written only from docs/protocol.md: the outsider's check that the document suffices.

It enrols over HTTP (§8), connects to the broker with that identity (§1, §2), walks the root chain (§7, §10),
verifies desired states (§5, §7a, §7b) and releases (§6), fetches the chosen chunk lists over MQTT (§6), writes
the bundle files under ``out_dir/{module}/{version}/`` and reports status, state and telemetry (§4). It does not
run models: a module is reported ``running`` once its files are verified and written. Nothing here imports the
project's own packages, on purpose.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import queue
import re
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import paho.mqtt.client as mqtt
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

log = logging.getLogger("docdevice")
P = "edgefleet/v1/"
CHUNK = 262_144  # §6: fixed chunk size
MAX_JSON = 512 * 1024  # §3
MAX_CHUNK = 1024 * 1024  # §6: spans up to 1 MiB accepted
MAX_LIFETIME = 2_678_400  # §5 check 3: 31 days
NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,63}$")  # §3
HEX64 = re.compile(r"^[0-9a-f]{64}$")
Doc = dict[str, Any]


class Refused(Exception):
    """A document failed a check; the message is the reason reported to the hub."""


def canonical(doc: Any) -> bytes:
    """§3: keys sorted by code point, no white space, UTF-8 not escaped, no NaN."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def parse_json(payload: bytes) -> Doc:
    """§3: at most 512 KiB, UTF-8, a JSON object (``v`` is checked where the document is read)."""
    if len(payload) > MAX_JSON:
        raise Refused(f"message of {len(payload)} bytes is over 512 KiB")
    try:
        doc = json.loads(payload.decode("utf-8"), parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
    except (UnicodeDecodeError, ValueError) as exc:
        raise Refused(f"not UTF-8 JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise Refused("not a JSON object")
    return doc


# --- §7: roots and signatures (pure) --------------------------------------------------------------------------


def check_root_shape(signed: Doc) -> None:
    if signed.get("type") != "root" or signed.get("v") != 1:
        raise Refused("not a version-1 root")
    for field in ("version", "expires"):
        if not is_int(signed.get(field)) or signed[field] < 1:
            raise Refused(f"root {field} is not a positive integer")
    keys = signed.get("keys")
    if not isinstance(keys, dict):
        raise Refused("root keys is not an object")
    for kid, key in keys.items():
        if not isinstance(key, dict) or key.get("keytype") != "ed25519" or not HEX64.match(str(key.get("public"))):
            raise Refused(f"root key {kid} is not a hex ed25519 key")
        if sha256(bytes.fromhex(key["public"])) != kid:
            raise Refused(f"root key id {kid} is not the sha256 of its public key")
    for role in ("root", "release", "director"):
        r = signed.get("roles", {}).get(role)
        if not isinstance(r, dict) or not isinstance(r.get("keyids"), list):
            raise Refused(f"root lacks the {role} role")
        ids = r["keyids"]
        if len(set(ids)) != len(ids) or any(k not in keys for k in ids):
            raise Refused(f"root role {role} lists a key twice or one it lacks")
        if not is_int(r.get("threshold")) or not 1 <= r["threshold"] <= len(ids):
            raise Refused(f"root role {role} has a bad threshold")


def signed_by(root: Doc, role: str, envelope: Doc) -> bool:
    """§7 threshold rule: distinct public keys of ``role`` with a valid signature over canonical ``signed``."""
    r, keys = root["roles"][role], root["keys"]
    payload, good = canonical(envelope.get("signed")), set()
    for s in envelope.get("signatures") or []:
        if not isinstance(s, dict) or s.get("keyid") not in r["keyids"]:
            continue
        public = keys[s["keyid"]]["public"]
        try:
            Ed25519PublicKey.from_public_bytes(bytes.fromhex(public)).verify(bytes.fromhex(str(s.get("sig"))), payload)
            good.add(public)
        except (InvalidSignature, ValueError):
            continue
    return len(good) >= r["threshold"]


def load_root(envelope: Doc) -> Doc:
    """The root got at enrolment: shape and self-signature only, expiry not judged (§7, §7a.1)."""
    signed = envelope.get("signed")
    if not isinstance(signed, dict):
        raise Refused("root is not an envelope")
    check_root_shape(signed)
    if not signed_by(signed, "root", envelope):
        raise Refused("root is not signed by a threshold of its own root keys")
    return signed


def next_root(trusted: Doc, envelope: Doc) -> Doc:
    """§7 rotation: version N+1, signed by a threshold of N's root keys and of its own."""
    signed = load_root(envelope)
    if signed["version"] != trusted["version"] + 1:
        raise Refused(f"root version {signed['version']} does not follow {trusted['version']}")
    if not signed_by(trusted, "root", envelope):
        raise Refused(f"root version {signed['version']} is not signed by root version {trusted['version']}'s keys")
    return signed


# --- §5, §7a, §7b: desired states and releases (pure) ---------------------------------------------------------


def root_alive(root: Doc, now: float) -> None:
    if root["expires"] <= now:
        raise Refused(f"root expired: trusted root version {root['version']} expired at {root['expires']} "
                      f"(now {int(now)}); new states are refused until a newer root arrives")


def check_expiry(what: str, expires: Any, now: float, max_ahead: int | None = None) -> None:
    if not is_int(expires) or expires <= now:
        raise Refused(f"{what} expired at {expires} (now {int(now)})")
    if max_ahead is not None and expires > now + max_ahead:
        raise Refused(f"{what} expires at {expires}, more than {max_ahead} s ahead of now {int(now)}")


def forbidden(policy: Doc | None, name: str, version: int) -> str | None:
    rule = (policy or {}).get("modules", {}).get(name)
    if rule and (version in rule.get("revoked", []) or version < rule.get("min_version", 0)):
        return f"{name} version {version} is forbidden by release policy version {policy['version']}"  # type: ignore[index]
    return None


def check_policy(root: Doc, envelope: Doc, held: Doc | None, now: float) -> Doc:
    """§7b: release-signed, not expired, no older than the held policy, an equal version byte-identical."""
    signed = envelope.get("signed")
    if not isinstance(signed, dict) or signed.get("type") != "release-policy" or not signed_by(root, "release", envelope):
        raise Refused("release policy is not signed by the release role")
    check_expiry("release policy", signed.get("expires"), now)
    if held is not None and (signed["version"] < held["version"] or
                             (signed["version"] == held["version"] and canonical(signed) != canonical(held))):
        raise Refused(f"release policy version {signed['version']} would roll back version {held['version']}")
    return signed


def check_desired(root: Doc, envelope: Doc, device: str, floor: int, policy: Doc | None,
                  now: float) -> tuple[Doc, Doc | None]:
    """§5 checks 1-6 in §7a's order; the state's ``signed`` part and the policy it makes current."""
    root_alive(root, now)
    signed = envelope.get("signed")
    if not isinstance(signed, dict) or not signed_by(root, "director", envelope):
        raise Refused("desired state is not signed by a threshold of the director role")
    if signed.get("type") != "desired" or signed.get("v") != 1:
        raise Refused("unsupported schema version" if signed.get("type") == "desired" else "not a desired state")
    check_expiry("desired state", signed.get("expires"), now, MAX_LIFETIME)
    if signed.get("device") != device:
        raise Refused(f"desired state is for device {signed.get('device')!r}, this is {device!r}")
    if not is_int(signed.get("revision")) or signed["revision"] <= floor:
        raise Refused(f"desired revision {signed.get('revision')} is not above {floor}")
    if "policy" in signed:
        policy = check_policy(root, signed["policy"], policy, now)
    for m in signed.get("modules", []):
        if not NAME.match(str(m.get("name"))):
            raise Refused(f"invalid module name {m.get('name')!r}")
        if reason := forbidden(policy, m["name"], m["version"]):
            raise Refused(reason)
    return signed, policy


def fixed_sizes(size: int) -> list[int]:
    return [min(CHUNK, size - off) for off in range(0, size, CHUNK)]


def check_release(root: Doc, envelope: Doc, bundle: str, module: Doc, policy: Doc | None, now: float) -> Doc:
    """§6 step 2: the release envelope for ``bundle`` as named by the desired ``module`` entry."""
    root_alive(root, now)
    signed = envelope.get("signed")
    if not isinstance(signed, dict) or not signed_by(root, "release", envelope):
        raise Refused("release is not signed by a threshold of the release role")
    if signed.get("type") != "release" or signed.get("v") != 1:
        raise Refused("not a version-1 release")
    check_expiry("release", signed.get("expires"), now)
    manifest = signed.get("manifest")
    if not isinstance(manifest, dict) or sha256(canonical(manifest)) != bundle or signed.get("bundle") != bundle:
        raise Refused("release manifest does not hash to its bundle digest")
    if (manifest.get("name"), manifest.get("version")) != (module["name"], module["version"]):
        raise Refused(f"release is {manifest.get('name')}:{manifest.get('version')}, "
                      f"the state names {module['name']}:{module['version']}")
    if reason := forbidden(policy, manifest["name"], manifest["version"]):
        raise Refused(reason)
    if sum(f.get("size", 0) for f in manifest.get("files", [])) != module["size"]:
        raise Refused(f"release holds another size than the state's {module['size']} bytes")
    for f in manifest.get("files", []):
        parts = str(f.get("path")).split("/")
        if not 1 <= len(parts) <= 8 or not all(NAME.match(p) for p in parts):
            raise Refused(f"unsafe bundle path {f.get('path')!r}")
        if len(f.get("chunks", [])) != len(fixed_sizes(f["size"])):
            raise Refused(f"{f['path']}: {len(f['chunks'])} chunks for {f['size']} bytes")
    return signed


def chunk_lists(release: Doc, have: set[str]) -> dict[str, list[tuple[str, int]]]:
    """§6 spans: each file's (digest, size) list, spans when valid and no more bytes are missing than fixed."""
    files = release["manifest"]["files"]
    fixed = {f["path"]: list(zip(f["chunks"], fixed_sizes(f["size"]), strict=True)) for f in files}
    spans: dict[str, list[tuple[str, int]]] = {}
    try:
        sizes = {d: s for lst in fixed.values() for d, s in lst}
        listed = (release.get("spans") or {}).get("files", {})
        for path, items in listed.items():
            lst = [(str(i["sha256"]), i["size"]) for i in items]
            if path not in fixed or sum(s for _, s in lst) != sum(s for _, s in fixed[path]):
                raise ValueError(f"spans of {path} do not match the manifest")
            for d, s in lst:
                if not HEX64.match(d) or not is_int(s) or not 1 <= s <= MAX_CHUNK or sizes.setdefault(d, s) != s:
                    raise ValueError(f"bad span {d} of {path}")
            spans[path] = lst
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        log.warning("spans refused, using fixed chunks: %s", exc)
        spans = {}

    def missing(lst: list[tuple[str, int]]) -> int:
        return sum(s for d, s in lst if d not in have)

    return {p: spans[p] if p in spans and missing(spans[p]) <= missing(lst) else lst for p, lst in fixed.items()}


# --- the device: I/O ------------------------------------------------------------------------------------------


class DocDevice:
    """Enrol, connect, verify, fetch, write, report. ``refused`` counts refusals by topic kind."""

    def __init__(self, hub_url: str, token: str, device_id: str, out_dir: Path, facts: dict[str, str]) -> None:
        self.out_dir, self.facts = out_dir, facts
        r = httpx.post(f"{hub_url}/api/v1/enroll", json={"token": token, "device_id": device_id, "facts": facts},
                       timeout=30)
        r.raise_for_status()
        ident = r.json()
        self.id, self.password = ident["device_id"], ident["mqtt_password"]
        self.username = ident.get("mqtt_username") or self.id
        self.mqtt_url, self.root = ident["mqtt_url"], load_root(ident["root"])
        self.lock = threading.RLock()
        self.applied: Doc | None = None  # applied desired envelope (§7a)
        self.held_refused: Doc | None = None
        self.policy: Doc | None = None
        self.pending_roots: dict[int, Doc] = {}
        self.error, self.reports, self.seq = "", [], 0
        self.refused: Counter[str] = Counter()
        self.chunks: dict[str, bytes] = {}  # the local chunk store, by digest
        self.fetches: dict[str, queue.Queue[tuple[str, bytes]]] = {}  # bundle -> parts arriving for it
        self.spans_used: set[str] = set()  # files fetched by content-defined spans
        self.installed: dict[str, str] = {}  # module -> bundle written and reported running
        self.hub_online: bool | None = None
        self.stopping = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.id, protocol=mqtt.MQTTv5)
        self.client.username_pw_set(self.username, self.password)
        self.client.will_set(self.topic("status"), self.status(False), qos=1, retain=True)
        self.client.on_connect, self.client.on_message = self._on_connect, self._on_message

    def topic(self, channel: str) -> str:
        return f"{P}devices/{self.id}/{channel}"

    def status(self, online: bool) -> bytes:
        return canonical({"v": 1, "device": self.id, "online": online, "ts": time.time()})

    def start(self, telemetry_interval: float = 1.0) -> DocDevice:
        url = urlsplit(self.mqtt_url)
        if url.scheme == "mqtts":
            self.client.tls_set()  # the system's CAs; a private CA comes as the enrolment's broker_ca (not handled)
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        self.client.reconnect_delay_set(1, 30)
        self.client.connect(url.hostname or "localhost", url.port or (8883 if url.scheme == "mqtts" else 1883), clean_start=False, properties=props)
        self.client.loop_start()
        threading.Thread(target=self._telemetry, args=(telemetry_interval,), daemon=True).start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        self.client.publish(self.topic("status"), self.status(False), qos=1, retain=True).wait_for_publish(5)
        self.client.disconnect()
        self.client.loop_stop()

    def _on_connect(self, client: mqtt.Client, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        if rc.is_failure:
            log.warning("connect refused: %s", rc)
            return
        # §7a.2 and §10: roots with (here: before) the state; presence; the outbox waits for the hub.
        client.subscribe([(f"{P}root/+", 1), (self.topic("desired"), 1), (f"{P}hub/status", 1)])
        client.publish(self.topic("status"), self.status(True), qos=1, retain=True)
        self.hub_online = None if self.hub_online is None else False
        self._report()

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        self.handle(msg.topic, msg.payload)

    def handle(self, topic: str, payload: bytes) -> None:
        """Dispatch one message; a bad one is refused, counted and logged, and the device keeps running (§9)."""
        levels = topic.removeprefix(P).split("/")
        kind = levels[0] if levels[0] in ("root", "blobs", "hub") else levels[-1]
        try:
            if topic.startswith(f"{P}blobs/"):
                _, bundle, part = topic.removeprefix(P).split("/")
                if (inbox := self.fetches.get(bundle)) is not None:
                    inbox.put((part, payload))
                return
            doc = parse_json(payload)
            if topic.startswith(f"{P}root/"):
                self._on_root(doc)
            elif topic == f"{P}hub/status":
                self.hub_online = doc.get("online") is True
            elif topic == self.topic("desired"):
                self._on_desired(doc)
        except Refused as exc:
            self.refused[kind] += 1
            log.warning("refused %s: %s", topic, exc)

    def _on_root(self, envelope: Doc) -> None:
        with self.lock:
            version = (envelope.get("signed") or {}).get("version")
            if not is_int(version) or version <= self.root["version"]:
                return  # §10: versions it already has are ignored
            if len(self.pending_roots) < 64:
                self.pending_roots[version] = envelope
            while (nxt := self.pending_roots.pop(self.root["version"] + 1, None)) is not None:
                self.root = next_root(self.root, nxt)
                held = (self.applied or {}).get("signed", {}).get("policy")
                if self.policy is not None and (held is None or not signed_by(self.root, "release", held)):
                    self.policy = None  # §7b: the root stopped trusting the policy's keys
                if self.held_refused is not None:  # §7a.4: judge the refused state again
                    with contextlib.suppress(Refused):
                        self._on_desired(self.held_refused)

    def floor(self) -> int:
        """§7a.5: the applied revision while the trusted root still accepts its director signatures."""
        if self.applied is None or not signed_by(self.root, "director", self.applied):
            return 0
        return int(self.applied["signed"]["revision"])

    def _on_desired(self, envelope: Doc) -> None:
        with self.lock:
            if self.applied is not None and canonical(envelope) == canonical(self.applied):
                return  # §5: the retained copy of the applied state, re-sent on every (re)subscription
            try:
                signed, policy = check_desired(self.root, envelope, self.id, self.floor(), self.policy, time.time())
            except Refused as exc:
                self.held_refused, self.error = envelope, str(exc)
                self._report()
                raise
            self.applied, self.policy, self.held_refused, self.error = envelope, policy, None, ""
            self.reports = [_report_for(m, "pending") for m in signed.get("modules", [])]
            self._report()
            threading.Thread(target=self._install, args=(signed,), daemon=True).start()

    def _install(self, state: Doc) -> None:
        for i, module in enumerate(state.get("modules", [])):
            if self.installed.get(module["name"]) == module["bundle"]:
                self._set(state, i, "running")  # a re-signed state naming what already runs
                continue
            try:
                self._set(state, i, "downloading")
                files = self._fetch(module)
                target = self.out_dir / module["name"] / str(module["version"])
                for path, data in files.items():  # §6 step 5: already checked; the path again before writing
                    dest = target.joinpath(*path.split("/"))
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    dest.write_bytes(data)
                self.installed[module["name"]] = module["bundle"]
                self._set(state, i, "running")
            except (Refused, TimeoutError) as exc:
                self.refused["install"] += 1
                self._set(state, i, "failed", str(exc))

    def _set(self, state: Doc, i: int, st: str, error: str = "") -> None:
        with self.lock:
            if self.applied is not None and self.applied["signed"] is state:
                self.reports[i] = _report_for(state["modules"][i], st, error, 1.0 if st == "running" else 0.0)
                self._report()

    def _fetch(self, module: Doc, timeout: float = 60) -> dict[str, bytes]:
        """§6 over MQTT: subscribe, ask for the release, verify it, ask for missing chunks with backoff, assemble."""
        bundle, deadline, backoff = module["bundle"], time.monotonic() + timeout, 2.0
        inbox = self.fetches[bundle] = queue.Queue()
        self.client.subscribe(f"{P}blobs/{bundle}/+", qos=1)  # before asking: parts are not retained
        release: Doc | None = None
        lists: dict[str, list[tuple[str, int]]] = {}
        want: dict[str, int] = {}  # digest -> size, of the chosen lists
        got: dict[str, bytes] = {}
        while release is None or len(got) < len(want):
            check_deadline(deadline, f"bundle {bundle}: {'chunks' if release else 'the release'}")
            missing = [d for d in want if d not in got]
            for i in range(0, max(len(missing), 1), 64):  # the release first, then 64 chunks per request
                self._request(bundle, release is None, missing[i:i + 64])
            until = time.monotonic() + backoff
            while (release is None or len(got) < len(want)) and (left := until - time.monotonic()) > 0:
                try:
                    part, payload = inbox.get(timeout=left)
                except queue.Empty:
                    break
                if part == "manifest" and release is None:
                    try:
                        with self.lock:
                            release = check_release(self.root, parse_json(payload), bundle, module, self.policy,
                                                    time.time())
                    except Refused as exc:  # anyone might publish here: wait for a genuine one
                        self.refused["release"] += 1
                        log.warning("release refused: %s", exc)
                        continue
                    lists = chunk_lists(release, set(self.chunks))
                    want = {d: n for lst in lists.values() for d, n in lst}
                    got = {d: self.chunks[d] for d in want if d in self.chunks}
                    fixed = {e["path"]: e["chunks"] for e in release["manifest"]["files"]}
                    self.spans_used.update(p for p, lst in lists.items() if [d for d, _ in lst] != fixed[p])
                elif part in want and len(payload) == want[part] and sha256(payload) == part:
                    got[part] = payload  # §6 step 3: its digest, chosen and of the size the list gives
                elif part != "manifest":  # simpler than §6: another device's choice is counted as bad ones are
                    self.refused["chunk"] += 1
            backoff = min(backoff * 2, 30)
        self.fetches.pop(bundle, None)
        self.client.unsubscribe(f"{P}blobs/{bundle}/+")
        self.chunks.update(got)
        files = {}
        for entry in release["manifest"]["files"]:  # §6 step 5
            data = b"".join(got[d] for d, _ in lists[entry["path"]])
            if len(data) != entry["size"] or sha256(data) != entry["sha256"]:
                raise Refused(f"{entry['path']}: assembled file does not match the manifest")
            files[entry["path"]] = data
        return files

    def _request(self, bundle: str, manifest: bool, chunks: list[str]) -> None:
        req = {"v": 1, "device": self.id, "bundle": bundle, "manifest": manifest, "chunks": chunks}
        self.client.publish(self.topic("blob-req"), canonical(req), qos=1)

    def _report(self) -> None:
        with self.lock:
            revision = self.applied["signed"]["revision"] if self.applied else 0
            doc = {"v": 1, "device": self.id, "revision": revision, "modules": list(self.reports),
                   "error": self.error, "facts": self.facts, "ts": time.time(), "source": "hub"}
        self.client.publish(self.topic("reported"), canonical(doc), qos=1, retain=True)

    def _telemetry(self, interval: float) -> None:
        """One batch per interval, once the hub has said it is online (§10); points for running modules."""
        while not self.stopping.wait(interval):
            if self.hub_online is False or not self.client.is_connected():
                continue
            with self.lock:
                now = time.time()
                points = [{"ts": now, "module": m["name"], "version": m["version"], "inferences": 0, "errors": 0,
                           "latency_ms": {"p50": 0.0, "p95": 0.0, "p99": 0.0}}
                          for m in self.reports if m["state"] == "running"]
                self.seq += 1
                batch = {"v": 1, "device": self.id, "seq": self.seq, "ts": now, "points": points, "agent": {}}
            self.client.publish(self.topic("telemetry"), canonical(batch), qos=1)


def check_deadline(deadline: float, what: str) -> None:
    if time.monotonic() > deadline:
        raise TimeoutError(f"timed out fetching {what}")


def _report_for(m: Doc, state: str, error: str = "", progress: float = 0.0) -> Doc:
    return {"name": m["name"], "version": m["version"], "bundle": m["bundle"], "state": state, "error": error,
            "progress": progress, "config": "", "accelerator": "", "shadow": None}
