"""The local inference API for applications on the device: a lean HTTP/1.1 server on 127.0.0.1.

    POST /v1/modules/{name}/predict  {"inputs": {...}} -> {"module", "version", "outputs": {...}}
                                     404 unknown module, 422 inputs not matching the signature (named)
    GET  /healthz                    200 healthy / 503 not, with the reasons
    GET  /metrics                    Prometheus text

An asyncio Protocol with keep-alive and pipelining, no framework: the device pays for no web stack,
and a request costs little more than the inference itself (see bench/agent_bench.py). A bad
request gets 400/411/413/431 with the reason, counted in ``rejected["local_api"]``, and the connection closes. The body goes to the
module's worker as it came (Agent.infer_json): the agent neither parses the inputs nor builds arrays.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

import psutil

from modules.errors import BodyError, InputError

if TYPE_CHECKING:
    from agent.core import ActiveModule, Agent

Answer = tuple[int, str, bytes]  # status, content type, body

log = logging.getLogger("edgefleet.agent.api")

MAX_BODY = 16 * 2**20
MAX_HEAD = 64 * 1024
MAX_HEADER_LINES = 100
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 411: "Length Required",
            413: "Payload Too Large", 422: "Unprocessable Entity", 431: "Request Header Fields Too Large",
            500: "Internal Server Error", 503: "Service Unavailable"}
_PROC = psutil.Process()


class LocalApi:
    def __init__(self, agent: Agent, host: str = "127.0.0.1", port: int = 8765) -> None:
        self.agent, self.host, self.port = agent, host, port
        self._server: asyncio.Server | None = None
        self.requests = 0

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Connection(self), self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]  # the real one when 0 was asked
        log.info("local inference API on http://%s:%d", self.host, self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)

    # --- routes ------------------------------------------------------------------------------

    def route(self, method: str, path: str, body: bytes,
              later: Callable[[Answer], None]) -> Answer | Coroutine[Any, Any, Answer] | None:
        """An answer at once; or None: a prediction is on its way to a worker and ``later`` gets the answer;
        or a coroutine that makes the answer (a worker restarting, in-process isolation)."""
        self.requests += 1
        path = path.split("?", 1)[0]
        if path.startswith("/v1/modules/") and path.endswith("/predict"):
            if method != "POST":
                return _json(405, {"detail": "use POST"})
            name = path[len("/v1/modules/"):-len("/predict")]
            active = self.agent.active.get(name)
            if active is None:
                return _json(404, {"detail": f"module {name!r} is not running here", "modules": sorted(self.agent.active)})
            if self.agent.infer_json_now(active, body, lambda out, exc: later(_predicted(active, out, exc))):
                return None
            return self._predict(active, body)
        if path == "/healthz" and method == "GET":
            health = self.agent.health()
            ok = health["healthy"] == 1.0
            return _json(200 if ok else 503, {"ok": ok, **self.agent.snapshot()})
        if path == "/metrics" and method == "GET":
            return 200, "text/plain; version=0.0.4", self.metrics().encode()
        return _json(404, {"detail": f"no route {method} {path}"})

    async def _predict(self, active: ActiveModule, body: bytes) -> Answer:
        try:
            return _predicted(active, await self.agent.infer_json(active, body), None)
        except Exception as exc:
            return _predicted(active, None, exc)

    # --- metrics -----------------------------------------------------------------------------

    def metrics(self) -> str:
        a = self.agent
        lines = [
            "# TYPE edgefleet_agent_inferences_total counter",
            *(f'edgefleet_agent_inferences_total{{module="{n}"}} {m.stats.total}' for n, m in a.active.items()),
            "# TYPE edgefleet_agent_inference_errors_total counter",
            *(f'edgefleet_agent_inference_errors_total{{module="{n}"}} {m.stats.errors_total}' for n, m in a.active.items()),
            "# TYPE edgefleet_agent_inference_latency_ms summary",
            *(f'edgefleet_agent_inference_latency_ms_sum{{module="{n}"}} {m.stats.latency_ms_sum:.3f}'
              for n, m in a.active.items()),
            *(f'edgefleet_agent_inference_latency_ms_count{{module="{n}"}} {m.stats.total}' for n, m in a.active.items()),
            "# TYPE edgefleet_agent_rejected_messages_total counter",
            *(f'edgefleet_agent_rejected_messages_total{{kind="{k}"}} {v}' for k, v in sorted(a.rejected.items())),
            "# TYPE edgefleet_agent_outbox_rows gauge",
            f"edgefleet_agent_outbox_rows {len(a.outbox)}",
            "# TYPE edgefleet_agent_outbox_dropped_total counter",
            f"edgefleet_agent_outbox_dropped_total {a.outbox.dropped}",
            "# TYPE edgefleet_agent_rss_bytes gauge",
            f"edgefleet_agent_rss_bytes {_PROC.memory_info().rss}",
            "# TYPE edgefleet_agent_connected gauge",
            f"edgefleet_agent_connected {1 if a.client.connected.is_set() else 0}",
            "# TYPE edgefleet_agent_healthy gauge",
            f"edgefleet_agent_healthy {a.health()['healthy']:g}",
            "# TYPE edgefleet_agent_worker gauge",
            *(f'edgefleet_agent_worker{{metric="{k[k.rindex(".") + 1:]}",module="{k[7:k.rindex(".")]}"}} {v:g}'
              for k, v in a.worker_stats().items()),  # keys are worker.<module>.<metric>
        ]
        return "\n".join(lines) + "\n"


def _predicted(active: ActiveModule, out: bytes | None, exc: Exception | None) -> Answer:
    """A prediction's answer: 200 with the outputs, 400 not JSON, 422 not the signature, 500 the module's own failure."""
    if isinstance(exc, BodyError):
        return _json(400, {"detail": str(exc)})
    if isinstance(exc, InputError):
        return _json(422, {"detail": str(exc)})
    if exc is not None or out is None:
        return _json(500, {"detail": str(exc) or repr(exc)})
    # the worker's JSON as it is, inside the envelope (not parsed and encoded again)
    return 200, "application/json", b'{"module": %s, "version": %d, "outputs": %s}' % (
        json.dumps(active.name).encode(), active.version, out)


def _json(status: int, obj: Any) -> Answer:
    return status, "application/json", json.dumps(obj).encode()


class BadRequest(ValueError):
    """Not an HTTP/1.x request this server takes: answered with ``status`` and the connection closed."""

    def __init__(self, detail: str, status: int = 400) -> None:
        super().__init__(detail)
        self.status = status


class _Connection(asyncio.Protocol):
    """One client connection: requests parsed from the bytes as they arrive, answered in order, one at a time.

    A Protocol rather than a StreamReader: the head is cut at its blank line and parsed in one go
    (no coroutine per header line), and answers that need no module are written from the callback.
    """

    def __init__(self, api: LocalApi) -> None:
        self.api = api
        self.transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._head: tuple[int, str, str, bool, int] | None = None  # a parsed head whose body is still arriving
        self._busy = False  # a prediction is being answered: later requests wait in the buffer, answered in order
        self._task: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def pause_writing(self) -> None:  # a client that sends but does not read: stop reading its requests
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None:
            self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        self._buf += data
        if not self._busy:
            self._serve()

    def _serve(self) -> None:
        while self.transport is not None and not self._busy:
            try:
                request = self._take()
            except BadRequest as exc:
                self.api.agent.rejected["local_api"] += 1
                self._reply(_json(exc.status, {"detail": str(exc)}), keep=False)
                return
            if request is None:
                return
            method, path, keep, body = request
            self._busy = True
            answer = self.api.route(method, path, body, functools.partial(self._later, keep))
            if answer is None:
                return  # _later answers (it may have already)
            if isinstance(answer, tuple):
                self._busy = False
                self._reply(answer, keep)
            else:
                self._task = asyncio.get_running_loop().create_task(self._finish(answer, keep))

    def _later(self, keep: bool, answer: Answer) -> None:
        self._busy = False
        self._reply(answer, keep)
        if self._buf:  # pipelined requests that came meanwhile
            self._serve()

    async def _finish(self, pending: Coroutine[Any, Any, Answer], keep: bool) -> None:
        try:
            answer = await pending
        finally:
            self._task = None
        self._later(keep, answer)

    def _reply(self, answer: Answer, keep: bool) -> None:
        if self.transport is None:
            return
        status, ctype, payload = answer
        self.transport.write(b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n%s\r\n%s" % (
            status, _REASONS.get(status, "").encode(), ctype.encode(), len(payload),
            b"" if keep else b"Connection: close\r\n", payload))
        if not keep:
            self.transport.close()

    def _take(self) -> tuple[str, str, bool, bytes] | None:
        """The next whole request off the buffer (method, path, keep-alive, body); None until it has arrived."""
        if self._head is None:
            end = self._buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buf) > MAX_HEAD:
                    raise BadRequest(f"request head over {MAX_HEAD} bytes", 431)
                return None
            self._head = (end + 4, *_parse_head(bytes(self._buf[:end])))
        start, method, path, keep, length = self._head
        if len(self._buf) < start + length:
            return None
        body = bytes(self._buf[start:start + length])
        del self._buf[:start + length]
        self._head = None
        return method, path, keep, body


def _parse_head(head: bytes) -> tuple[str, str, bool, int]:
    """Method, path, keep-alive and Content-Length of a request head (without its blank line)."""
    lines = head.decode("latin-1").split("\r\n")
    if len(lines) > MAX_HEADER_LINES:
        raise BadRequest(f"more than {MAX_HEADER_LINES} header lines", 431)
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise BadRequest(f"not an HTTP/1.x request line: {lines[0][:80]!r}")
    method, path, version = parts
    keep, length = version != "HTTP/1.0", 0
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep:
            raise BadRequest(f"malformed header line {line[:80]!r}")
        name = name.strip().lower()
        if name == "content-length":
            if not value.strip().isdigit():
                raise BadRequest(f"Content-Length {value.strip()[:20]!r} is not a number")
            length = int(value)
        elif name == "connection":
            keep = value.strip().lower() == "keep-alive" if version == "HTTP/1.0" else value.strip().lower() != "close"
        elif name == "transfer-encoding":
            raise BadRequest("Transfer-Encoding is not supported: send the body with a Content-Length", 411)
    if length > MAX_BODY:
        raise BadRequest(f"body of {length} bytes; at most {MAX_BODY}", 413)
    return method, path, keep, length
