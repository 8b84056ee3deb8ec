"""The endpoint's front end: one process per endpoint serving ``/endpoints/NAME/score`` to its worker pools.

It checks keys, picks a version by weight (smooth weighted round robin, so a 90/10 split
is exact over every 10 requests), optionally mirrors a share of traffic to another version
(answers discarded), and forwards raw bodies to the pools, which batch them to workers.
Parsing, validation, inference and encoding all happen in the workers, so this process
does little more than HTTP. Changes arrive as a whole new spec (``apply``): new versions
start on fresh workers and take traffic only once healthy; removed ones drain, then stop.

Run by the hub (``python -m hub.endpoints.gateway``, spec and control token on stdin) or
in the foreground by ``edgefleet serve``; both use :class:`Gateway`.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import json
import logging
import os
import secrets
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

from hub.endpoints.arena import Arena
from hub.endpoints.codec import JSON, NPY, dumps, loads, read_manifest
from hub.endpoints.httpserver import HttpProtocol, Request, bind, new_loop
from hub.endpoints.pool import Pool, PoolError, Response, Settings
from hub.endpoints.spec import Version, parse_spec
from hub.endpoints.telemetry import EndpointTelemetry
from hub.monitoring.prom import Exposition, LatencyHistogram, endpoint_families
from modules import oip
from modules.bundle import FILES_DIR, verify_pulled
from modules.httpwire import BadRequest, check_encoding, keep_large_buffers, refusal_doc
from modules.runners import load_sample, sample_request
from modules.sandbox import Sandbox
from protocol.encoding import ProtocolError
from protocol.manifest import TensorSpec
from protocol.schema import validate
from protocol.signing import load_trusted_root

log = logging.getLogger("edgefleet.endpoint.gateway")

CONTROL_HEADER = b"x-control-token"
_VERSION = "0.1.0"  # edgefleet's, in OIP v2 server metadata


def reply(status: int, doc: Any, *headers: tuple[str, str]) -> Response:
    return status, dumps(doc), JSON, tuple(headers)


_KEY_REQUIRED = "a valid endpoint key is required (Authorization: Bearer KEY or api-key: KEY)"
UNAUTHORIZED = reply(401, refusal_doc(_KEY_REQUIRED), ("www-authenticate", "Bearer"))


class Gateway:
    def __init__(self, name: str, root: dict[str, Any] | None, control_token: str | None = None,
                 sandbox: Sandbox | None = None, metrics: bool = False) -> None:
        self.name = name
        self.metrics = metrics  # serve /metrics (standalone; under the hub its /metrics carries the counters)
        self.sandbox = sandbox or Sandbox()  # where workers run the modules' code (modules/sandbox.py)
        self.root = root  # the pinned root envelope every bundle must verify against (None: trust the bundle's own)
        self.control_token = control_token.encode() if control_token else None
        self.keys: list[bytes] = []
        self.versions: list[Version] = []
        self.pools: dict[str, Pool] = {}
        self.settings = Settings()
        self.counts: dict[int, int] = {}
        self.latency: dict[str, LatencyHistogram] = {}  # per version label, for the hub's /metrics
        self.telemetry: EndpointTelemetry | None = None  # under the hub: counts into its telemetry store
        self._telemetry_task: asyncio.Task[None] | None = None
        self.mirrored = 0
        self._ids = itertools.count(1)
        self._id_prefix = secrets.token_hex(3)
        self._current: dict[str, float] = {}
        self._mirror_credit: dict[str, float] = {}
        self._lock = asyncio.Lock()
        self.score_path = f"/endpoints/{name}/score"
        self.info_path = f"/endpoints/{name}"
        self._server: asyncio.base_events.Server | None = None
        self.arena = Arena()  # large bodies, received in place and read there by the workers (arena.py)

    # --- lifecycle -----------------------------------------------------------------------------

    async def serve(self, sock: socket.socket) -> None:
        keep_large_buffers()  # camera-sized bodies pass through this process
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: HttpProtocol(self.handle, self.arena.alloc), sock=sock, backlog=2048)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        await asyncio.gather(*(p.drain_and_stop(10) for p in self.pools.values()))
        self.pools.clear()
        if self._telemetry_task is not None:
            self._telemetry_task.cancel()
        if self.telemetry is not None:  # the last interval too
            await asyncio.to_thread(self.telemetry.flush)
            self.telemetry.close()
        self.arena.close()

    async def _report(self, interval_s: float) -> None:
        assert self.telemetry is not None
        while True:
            await asyncio.sleep(interval_s)
            await asyncio.to_thread(self.telemetry.flush)

    async def apply(self, spec: dict[str, Any]) -> dict[str, Any]:
        """Move to ``spec``: start and health-check new versions first, then switch traffic, then drain the rest."""
        async with self._lock:
            versions, settings = parse_spec(spec)
            keys = [k.encode() for k in spec.get("keys", []) if k]
            started: list[Pool] = []
            try:
                for v in versions:
                    pool = self.pools.get(v.label)
                    if pool is None or str(pool.bundle_dir) != v.bundle_dir:
                        await asyncio.get_running_loop().run_in_executor(None, self.verify, Path(v.bundle_dir))
                        pool = Pool(self.name, v.label, Path(v.bundle_dir), Settings(**vars(settings)), self.sandbox,
                                    self.arena.read_only_fd)
                        started.append(pool)
                        await pool.start()
            except (PoolError, ProtocolError, OSError, ValueError) as exc:
                await asyncio.gather(*(p.drain_and_stop(1) for p in started))
                raise PoolError(str(exc)) from None
            new = {p.label: p for p in started}
            old = [p for label, p in self.pools.items() if label not in {v.label for v in versions} or label in new]
            pools = {v.label: new.get(v.label) or self.pools[v.label] for v in versions}
            # the switch: one synchronous step on the event loop, so every request sees the old or the new set
            self.pools, self.versions, self.keys, self.settings = pools, versions, keys, settings
            if settings.collect_db and self.telemetry is None:
                self.telemetry = EndpointTelemetry(self.name, settings.collect_db)
                self._telemetry_task = asyncio.create_task(self._report(float(spec.get("telemetry_interval_s", 5.0))))
            self._current = {v.label: 0.0 for v in versions}
            self._mirror_credit = {v.label: 0.0 for v in versions}
            for pool in pools.values():
                pool.settings.max_batch, pool.settings.max_wait_ms = settings.max_batch, settings.max_wait_ms
                pool.settings.queue_timeout_s = settings.queue_timeout_s
            await asyncio.gather(*(p.scale(settings.replicas) for p in pools.values() if p not in started))
            await asyncio.gather(*(p.drain_and_stop() for p in old))
            log.info("endpoint %s now serves %s", self.name, ", ".join(f"{v.label}={v.weight:g}" for v in versions))
            return self.status()

    def verify(self, bundle_dir: Path) -> None:
        """The bundle's signature and files, against the pinned root (through the root chain it ships)."""
        root_doc = self.root
        if root_doc is None:  # trust on first use: the root the bundle was pulled with
            root_doc = json.loads((bundle_dir / "root.json").read_text())
        verify_pulled(bundle_dir, load_trusted_root(root_doc))

    # --- requests ------------------------------------------------------------------------------

    def handle(self, req: Request) -> Response | asyncio.Future[Response]:
        try:
            check_encoding(req.headers.get(b"content-encoding", b"").decode("latin-1"))
            resp = self.route(req)
        except BadRequest as exc:
            resp = self.count(reply(exc.status, exc.doc()))
        self.arena.discard(req.body)  # a body in the arena that no worker will read (refused, not a score route)
        return resp

    def route(self, req: Request) -> Response | asyncio.Future[Response]:
        if req.path == self.score_path:
            if req.method != b"POST":
                return reply(405, {"detail": "use POST"}, ("allow", "POST"))
            if not self.authorized(req.headers):
                return self.count(UNAUTHORIZED)
            return self.score(req)
        if req.path == self.info_path:
            if not self.authorized(req.headers):
                return self.count(UNAUTHORIZED)
            return reply(200, self.describe())
        if req.path.startswith("/v2"):
            return self.oip(req)
        if req.path == "/metrics" and self.metrics:  # counts of this endpoint's traffic: for its key holders
            if not self.authorized(req.headers):
                return self.count(UNAUTHORIZED)
            out = Exposition()
            endpoint_families(out, [(self.name, self.status())])
            return 200, out.render().encode(), "text/plain; version=0.0.4; charset=utf-8", ()
        if req.path in ("/healthz", "/readyz"):
            ready = bool(self.pools) and all(p.ready for p in self.pools.values())
            return reply(200 if ready or req.path == "/healthz" else 503, {"status": "ready" if ready else "starting"})
        if req.path.startswith("/_control/"):
            return self.control(req)
        return reply(404, {"detail": f"no such path; score at POST {self.score_path}"})

    def authorized(self, headers: dict[bytes, bytes]) -> bool:
        given = headers.get(b"authorization", b"")
        if given[:7].lower() == b"bearer ":
            given = given[7:].strip()
        else:
            given = headers.get(b"api-key", b"")
        ok = False
        for key in self.keys:  # compare against both keys, in constant time, without an early exit
            ok |= hmac.compare_digest(given, key)
        return ok and bool(given)

    def count(self, resp: Response) -> Response:
        self.counts[resp[0]] = self.counts.get(resp[0], 0) + 1
        return resp

    def pick(self) -> str:
        """Smooth weighted round robin (as in nginx): deterministic, and exact over every sum-of-weights requests."""
        best, total = "", 0.0
        current = self._current
        for v in self.versions:
            current[v.label] += v.weight
            total += v.weight
            if not best or current[v.label] > current[best]:
                best = v.label
        current[best] -= total
        return best

    @property
    def ready(self) -> bool:
        return bool(self.pools) and all(p.ready for p in self.pools.values())

    def oip(self, req: Request) -> Response | asyncio.Future[Response]:
        """The Open Inference Protocol v2 (modules.oip): the endpoint is one model, named as the endpoint."""
        route = oip.parse_path(req.path)
        if route is None:
            return reply(404, oip.error(f"no such OIP v2 path; infer at POST /v2/models/{self.name}/infer"))
        if route.kind in ("live", "ready"):  # open, as /healthz is: for load balancers and probes
            ok = route.kind == "live" or self.ready
            return reply(200 if ok else 503, {route.kind: ok})
        if not self.authorized(req.headers):
            return self.count(UNAUTHORIZED)
        if route.kind == "server":
            return reply(200, oip.server_metadata(_VERSION))
        if route.model != self.name:
            return reply(404, oip.error(f"model {route.model!r} is not served here; this endpoint is {self.name!r}"))
        label = ""
        if route.version:
            label = next((v.label for v in self.versions if v.label.rsplit(":", 1)[-1] == route.version), "")
            if not label:
                return reply(404, oip.error(f"version {route.version} is not served here; versions: "
                                            f"{[v.label.rsplit(':', 1)[-1] for v in self.versions]}"))
        if route.kind == "model_ready":
            ok = self.pools[label].ready if label else self.ready
            return reply(200 if ok else 503, {"name": self.name, "ready": ok})
        if route.kind == "model":
            return reply(200, self.oip_metadata(label))
        if req.method != b"POST":
            return reply(405, oip.error("use POST"), ("allow", "POST"))
        hlen = req.headers.get(oip.HEADER_LENGTH.encode(), b"").strip()
        if hlen and not hlen.isdigit():
            return self.count(reply(400, oip.error(f"{oip.HEADER_LENGTH} {hlen[:20]!r} is not a number")))
        return self.score(req, "v2", int(hlen) if hlen else -1, label)

    def oip_metadata(self, label: str = "") -> dict[str, Any]:
        pool = self.pools.get(label) or next(iter(self.pools.values()), None)
        info = pool.info if pool is not None else {}
        runtime = read_manifest(pool.bundle_dir).runtime if pool is not None else ""
        specs = [[TensorSpec(name=s["name"], dtype=s["dtype"], shape=s["shape"]) for s in info.get(k, [])]
                 for k in ("inputs", "outputs")]
        versions = [label.rsplit(":", 1)[-1]] if label else [v.label.rsplit(":", 1)[-1] for v in self.versions]
        return oip.model_metadata(self.name, versions, runtime, *specs)

    def score(self, req: Request, kind: str = "v1", hlen: int = -1,
              label: str = "") -> Response | asyncio.Future[Response]:
        if not self.pools:
            return self.count(reply(503, {"detail": "the endpoint has no version yet"}, ("retry-after", "1")))
        request_id = f"{self._id_prefix}-{next(self._ids)}"
        ctype = req.headers.get(b"content-type", b"application/json").decode("latin-1")
        want_npy = NPY in req.headers.get(b"accept", b"").decode("latin-1")
        at, size = self.arena.ref(req.body) or (-1, 0)  # in the arena: the worker reads it there
        item = (request_id, ctype, req.body if at < 0 else b"", req.headers.get(b"x-input", b"").decode("latin-1"),
                want_npy, kind, hlen, at, size)
        label = label or self.pick()
        for v in self.versions:  # mirroring: the candidate sees real traffic, the client never sees its answers
            if v.mirror and v.label != label:
                self._mirror_credit[v.label] += v.mirror
                if self._mirror_credit[v.label] >= 1:
                    self._mirror_credit[v.label] -= 1
                    self.mirrored += 1
                    self._observe(v.label, self._submit(v.label, item, req.body))  # the candidate's own telemetry
        fut = self._submit(label, item, req.body)
        out: asyncio.Future[Response] = asyncio.get_running_loop().create_future()
        started = time.perf_counter()
        self._observe(label, fut, started)

        def done(f: asyncio.Future[Response]) -> None:
            status, body, ct, extra = f.result()
            self.counts[status] = self.counts.get(status, 0) + 1
            out.set_result((status, body, ct, (*extra, ("x-request-id", request_id), ("x-edgefleet-version", label))))

        fut.add_done_callback(done)
        return out

    def _submit(self, label: str, item: tuple[Any, ...], body: Any) -> asyncio.Future[Response]:
        """``item`` to the version's pool; a body in the arena is kept there until this answer is back."""
        fut = self.pools[label].submit(item)
        if self.arena.hold(body):
            fut.add_done_callback(lambda _: self.arena.release(body))
        return fut

    def _observe(self, label: str, fut: asyncio.Future[Response], started: float | None = None) -> None:
        """Latency into the /metrics histogram (successes) and the telemetry window, when ``fut`` completes."""
        t0 = time.perf_counter() if started is None else started

        def done(f: asyncio.Future[Response]) -> None:
            if f.cancelled():
                return
            status, ms = f.result()[0], (time.perf_counter() - t0) * 1000.0
            if status == 200:
                self.latency.setdefault(label, LatencyHistogram()).observe(ms)
            if self.telemetry is not None:
                self.telemetry.record(label, status, ms)

        fut.add_done_callback(done)

    # --- description, status, control ------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        pool = next(iter(self.pools.values()), None)
        inputs = pool.info.get("inputs", []) if pool else []
        sample = None
        if pool is not None:
            try:
                sample = load_sample(pool.bundle_dir / FILES_DIR, read_manifest(pool.bundle_dir))
            except (OSError, ValueError):
                sample = None
        if sample is None and inputs:  # built from the real signature: posting it gets 200
            sample = sample_request([validate(TensorSpec, s) for s in inputs])
        ready = self.ready
        return {
            "name": self.name, "status": "ready" if ready else "degraded" if self.pools else "starting",
            "scoring_uri": self.score_path,
            "versions": [{"label": v.label, "weight": v.weight, "mirror": v.mirror} for v in self.versions],
            "inputs": inputs, "outputs": pool.info.get("outputs", []) if pool else [],
            "batchable": bool(pool and pool.info.get("batchable")),
            "sample_request": {"inputs": (sample or {}).get("inputs", {})},
            "binary": {"content-type": NPY, "x-input": "input name (optional for single-input models)",
                       "accept": f"{NPY} for a .npy answer (single-output models)"},
            "oip_v2": {"infer": f"/v2/models/{self.name}/infer", "metadata": f"/v2/models/{self.name}",
                       "extensions": oip.EXTENSIONS},
            "auth": "Authorization: Bearer KEY, or api-key: KEY",
        }

    def status(self) -> dict[str, Any]:
        return {"name": self.name, "versions": [{"label": v.label, "weight": v.weight, "mirror": v.mirror,
                                                 **self.pools[v.label].status()} for v in self.versions
                                                if v.label in self.pools],
                "max_batch": self.settings.max_batch, "max_wait_ms": self.settings.max_wait_ms,
                "replicas": self.settings.replicas, "responses": {str(k): n for k, n in sorted(self.counts.items())},
                "latency_ms": {label: h.as_dict() for label, h in sorted(self.latency.items())},
                "mirrored": self.mirrored, "arena": self.arena.status()}

    def control(self, req: Request) -> Response | asyncio.Future[Response]:
        token = req.headers.get(CONTROL_HEADER, b"")
        if self.control_token is None or not hmac.compare_digest(token, self.control_token):
            return reply(403, {"detail": "control token required"})
        if req.path == "/_control/status":
            return reply(200, self.status())
        if req.path == "/_control/spec" and req.method == b"PUT":
            out: asyncio.Future[Response] = asyncio.get_running_loop().create_future()
            try:  # now: a large body is in the arena, whose slot is free again once this returns
                spec = loads(req.body)
            except ValueError as exc:
                return reply(422, {"detail": f"the spec is not JSON: {exc}"})

            async def run() -> None:
                try:
                    out.set_result(reply(200, await self.apply(spec)))
                except (PoolError, ValueError, KeyError) as exc:
                    out.set_result(reply(422, {"detail": str(exc)}))

            asyncio.get_running_loop().create_task(run())
            return out
        return reply(404, {"detail": "unknown control path"})


async def _hub_main() -> None:
    """Under the hub: settings on stdin's first line; stdin's end (the hub gone) stops the gateway."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    boot = json.loads(await reader.readline())
    root = json.loads(Path(boot["root_file"]).read_text()) if boot.get("root_file") else None
    gateway = Gateway(boot["name"], root, boot["control_token"], Sandbox.from_dict(boot.get("sandbox")))
    try:
        sock = bind(boot.get("host", "127.0.0.1"), int(boot.get("port", 0)))
    except OSError:  # the remembered port is taken: any free one
        sock = bind(boot.get("host", "127.0.0.1"), 0)
    await gateway.serve(sock)
    print(json.dumps({"port": sock.getsockname()[1], "pid": os.getpid()}), flush=True)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    eof = loop.create_task(reader.read())
    waiter = loop.create_task(stop.wait())
    await asyncio.wait([eof, waiter], return_when=asyncio.FIRST_COMPLETED)
    await gateway.close()


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="gateway %(levelname)s %(name)s: %(message)s")
    loop = new_loop()
    asyncio.set_event_loop(loop)
    loop.run_until_complete(_hub_main())


if __name__ == "__main__":
    main()
