"""The local inference API for applications on the device: a lean HTTP/1.1 server on 127.0.0.1.

    POST /v1/modules/{name}/predict  {"inputs": {...}} -> {"module", "version", "outputs": {...}}
                                     404 unknown module, 422 inputs not matching the signature (named)
    GET  /healthz                    200 healthy / 503 not, with the reasons
    GET  /metrics                    Prometheus text

asyncio streams with keep-alive, no framework: the device pays for no web stack, and a request
costs little more than the inference itself (see bench/agent_bench.py). The body goes to the
module's worker as it came (Agent.infer_json): the agent neither parses the inputs nor builds arrays.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import TYPE_CHECKING, Any

import psutil

from modules.errors import BodyError, InputError

if TYPE_CHECKING:
    from agent.core import Agent

log = logging.getLogger("edgefleet.agent.api")

MAX_BODY = 16 * 2**20
MAX_HEADER_LINES = 100
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 413: "Payload Too Large",
            422: "Unprocessable Entity", 500: "Internal Server Error", 503: "Service Unavailable"}
_PROC = psutil.Process()


class LocalApi:
    def __init__(self, agent: Agent, host: str = "127.0.0.1", port: int = 8765) -> None:
        self.agent, self.host, self.port = agent, host, port
        self._server: asyncio.Server | None = None
        self.requests = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._client, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]  # the real one when 0 was asked
        log.info("local inference API on http://%s:%d", self.host, self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)

    # --- HTTP --------------------------------------------------------------------------------

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                request = await self._read_request(reader)
                if request is None:
                    break
                method, path, headers, body = request
                status, ctype, payload = await self._route(method, path, body)
                keep = headers.get("connection", "").lower() != "close"
                writer.write(b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n%s\r\n" % (
                    status, _REASONS.get(status, "").encode(), ctype.encode(), len(payload),
                    b"" if keep else b"Connection: close\r\n") + payload)
                await writer.drain()
                if not keep:
                    break
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            pass  # a client that hangs up or speaks garbage: drop the connection
        finally:
            writer.close()

    async def _read_request(self, reader: asyncio.StreamReader) -> tuple[str, str, dict[str, str], bytes] | None:
        line = await reader.readline()
        if not line:
            return None
        method, path, _ = line.decode("latin-1").split(" ", 2)
        headers: dict[str, str] = {}
        for _ in range(MAX_HEADER_LINES):
            h = await reader.readline()
            if h in (b"\r\n", b"\n", b""):
                break
            k, _, v = h.decode("latin-1").partition(":")
            headers[k.strip().lower()] = v.strip()
        n = int(headers.get("content-length", "0") or 0)
        if n > MAX_BODY:
            raise ValueError("body too large")
        body = await reader.readexactly(n) if n else b""
        return method, path, headers, body

    async def _route(self, method: str, path: str, body: bytes) -> tuple[int, str, bytes]:
        self.requests += 1
        path = path.split("?", 1)[0]
        if path.startswith("/v1/modules/") and path.endswith("/predict"):
            if method != "POST":
                return _json(405, {"detail": "use POST"})
            return await self._predict(path[len("/v1/modules/"):-len("/predict")], body)
        if path == "/healthz" and method == "GET":
            health = self.agent.health()
            ok = health["healthy"] == 1.0
            return _json(200 if ok else 503, {"ok": ok, **self.agent.snapshot()})
        if path == "/metrics" and method == "GET":
            return 200, "text/plain; version=0.0.4", self.metrics().encode()
        return _json(404, {"detail": f"no route {method} {path}"})

    async def _predict(self, name: str, body: bytes) -> tuple[int, str, bytes]:
        active = self.agent.active.get(name)
        if active is None:
            return _json(404, {"detail": f"module {name!r} is not running here",
                               "modules": sorted(self.agent.active)})
        try:
            out = await self.agent.infer_json(active, body)
        except BodyError as exc:
            return _json(400, {"detail": str(exc)})
        except InputError as exc:
            return _json(422, {"detail": str(exc)})
        except Exception as exc:  # the module's own failure: the caller gets the reason
            return _json(500, {"detail": str(exc) or repr(exc)})
        # the worker's JSON as it is, inside the envelope (not parsed and encoded again)
        return 200, "application/json", b'{"module": %s, "version": %d, "outputs": %s}' % (
            json.dumps(active.name).encode(), active.version, out)

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


def _json(status: int, obj: Any) -> tuple[int, str, bytes]:
    return status, "application/json", json.dumps(obj).encode()
