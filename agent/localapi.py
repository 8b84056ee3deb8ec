"""The local inference API for applications on the device: a lean HTTP/1.1 server on 127.0.0.1.

    POST /v1/modules/{name}/predict  {"inputs": {...}} -> {"module", "version", "outputs": {...}}
                                     404 unknown module, 422 inputs not matching the signature (named)
    GET  /healthz                    200 healthy / 503 not, with the reasons
    GET  /metrics                    Prometheus text

An asyncio Protocol with keep-alive and pipelining, no framework: the device pays for no web stack,
and a request costs little more than the inference itself (see bench/agent_bench.py). A bad
request gets 400/411/413/431 with the reason, counted in ``rejected["local_api"]``, and the connection closes. The body goes to the
module's worker as it came (``InferenceFront.infer_json``): the agent neither parses the inputs nor builds arrays.
The parsing and the answers are ``modules.httpwire``'s, shared with each worker's direct socket
(``DATA/run/<module>.sock``, ``agent/worker.py``), which serves the predict route without this loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections import Counter
from collections.abc import Callable, Coroutine, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from agent.procstat import rss_bytes
from modules.httpwire import Answer, BadRequest, RequestReader, encode_answer, json_answer, predict_target, predicted

if TYPE_CHECKING:
    from agent.inference import ActiveModule, Answered

log = logging.getLogger("edgefleet.agent.api")


class Host(Protocol):
    """What the local API needs of the agent (``agent.core.Agent``): its inference front and its health."""

    @property
    def active(self) -> Mapping[str, ActiveModule]: ...
    @property
    def rejected(self) -> Counter[str]: ...
    async def infer_json(self, active: ActiveModule, body: bytes) -> bytes: ...
    def infer_json_now(self, active: ActiveModule, body: bytes, done: Answered) -> bool: ...
    def health(self) -> dict[str, float]: ...
    def snapshot(self) -> dict[str, Any]: ...
    def worker_stats(self) -> dict[str, float]: ...


class LocalApi:
    def __init__(self, agent: Host, host: str = "127.0.0.1", port: int = 8765) -> None:
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
        name = predict_target(path)
        path = path.split("?", 1)[0]
        if name is not None:
            if method != "POST":
                return json_answer(405, {"detail": "use POST"})
            active = self.agent.active.get(name)
            if active is None:
                return json_answer(404, {"detail": f"module {name!r} is not running here", "modules": sorted(self.agent.active)})
            if self.agent.infer_json_now(active, body, lambda out, exc: later(_predicted(active, out, exc))):
                return None
            return self._predict(active, body)
        if path == "/healthz" and method == "GET":
            health = self.agent.health()
            ok = health["healthy"] == 1.0
            return json_answer(200 if ok else 503, {"ok": ok, **self.agent.snapshot()})
        if path == "/metrics" and method == "GET":
            return 200, "text/plain; version=0.0.4", self.metrics().encode()
        return json_answer(404, {"detail": f"no route {method} {path}"})

    async def _predict(self, active: ActiveModule, body: bytes) -> Answer:
        try:
            return _predicted(active, await self.agent.infer_json(active, body), None)
        except Exception as exc:
            return _predicted(active, None, exc)

    # --- metrics -----------------------------------------------------------------------------

    def metrics(self) -> str:
        a = self.agent
        snap = a.snapshot()
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
            f"edgefleet_agent_outbox_rows {snap['outbox']}",
            "# TYPE edgefleet_agent_outbox_dropped_total counter",
            f"edgefleet_agent_outbox_dropped_total {snap['outbox_dropped']}",
            "# TYPE edgefleet_agent_rss_bytes gauge",
            f"edgefleet_agent_rss_bytes {rss_bytes()}",
            "# TYPE edgefleet_agent_connected gauge",
            f"edgefleet_agent_connected {1 if snap['connected'] else 0}",
            "# TYPE edgefleet_agent_healthy gauge",
            f"edgefleet_agent_healthy {a.health()['healthy']:g}",
            "# TYPE edgefleet_agent_worker gauge",
            *(f'edgefleet_agent_worker{{metric="{k[k.rindex(".") + 1:]}",module="{k[7:k.rindex(".")]}"}} {v:g}'
              for k, v in a.worker_stats().items()),  # keys are worker.<module>.<metric>
        ]
        return "\n".join(lines) + "\n"


def _predicted(active: ActiveModule, out: bytes | None, exc: Exception | None) -> Answer:
    return predicted(active.name, active.version, out, exc)


class _Connection(asyncio.Protocol):
    """One client connection: requests parsed from the bytes as they arrive, answered in order, one at a time.

    A Protocol rather than a StreamReader: the head is cut at its blank line and parsed in one go
    (no coroutine per header line), and answers that need no module are written from the callback.
    """

    def __init__(self, api: LocalApi) -> None:
        self.api = api
        self.transport: asyncio.Transport | None = None
        self._reader = RequestReader()
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
        self._reader.buf += data
        if not self._busy:
            self._serve()

    def _serve(self) -> None:
        while self.transport is not None and not self._busy:
            try:
                request = self._reader.take()
            except BadRequest as exc:
                self.api.agent.rejected["local_api"] += 1
                self._reply(json_answer(exc.status, {"detail": str(exc)}), keep=False)
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
        if self._reader.buf:  # pipelined requests that came meanwhile
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
        self.transport.write(encode_answer(answer, keep))
        if not keep:
            self.transport.close()
