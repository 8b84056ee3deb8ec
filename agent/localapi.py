"""The local inference API for applications on the device: a lean HTTP/1.1 server on a Unix socket or 127.0.0.1.

    POST /v1/modules/{name}/predict  {"inputs": {...}} -> {"module", "version", "outputs": {...}}
                                     or a .npy body (Content-Type: application/x-npy, X-Input: NAME) and
                                     Accept: application/x-npy for a .npy answer
                                     404 unknown module, 422 inputs not matching the signature (named)
    POST /v1/labels                  {"labels": [{"id": "req-1", "label": 1}]} -> 202: ground truth for earlier
                                     predictions whose request body carried that "id" (sent with the data)
    /v2/...                          the Open Inference Protocol v2 (modules.oip): health, metadata,
                                     POST /v2/models/{name}/infer in JSON or the binary-data extension
    GET  /healthz                    200 healthy / 503 not, with the reasons
    GET  /metrics                    Prometheus text
    POST /v1/defer  {"seconds": N, "reason": "..."}  hold installs (the agent bounds it: agent/deferral.py)
    DELETE /v1/defer                 release the hold;  GET /v1/defer: the hold now

An asyncio Protocol with keep-alive and pipelining, no framework: the device pays for no web stack,
and a request costs little more than the inference itself (see bench/agent_bench.py). A bad
request gets 400/411/413/431 with the reason, counted in ``rejected["local_api"]``, and the connection closes. The body goes to the
module's worker as it came (``InferenceFront.infer_json``, or ``infer_form`` with the headers that say how to
read it, ``modules.tensors``): the agent neither parses the inputs nor builds arrays.
The parsing and the answers are ``modules.httpwire``'s, shared with each worker's direct socket
(``DATA/run/<module>.sock``, ``agent/worker.py``), which serves the predict route without this loop.

Who may call it: on the Unix socket (``DATA/run/api.sock``, the daemon's default) whoever the file's mode
(0660) and group let connect; on TCP (off unless ``--api-port``) any local user could connect, so every
request there needs ``Authorization: Bearer <token>`` with one of the per-app tokens in ``DATA/api-tokens``
(``name token`` per line, 0600; re-read when it changes or on SIGHUP: ``agent.apitokens``); a missing or unknown
token is a 401, counted in ``rejected["local_api_auth"]``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import shutil
from collections import Counter
from collections.abc import Callable, Coroutine, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from agent.procstat import rss_bytes
from agent.shmem import SharedMemory
from modules import oip
from modules.httpwire import (
    CONTINUE,
    Answer,
    BadRequest,
    Headers,
    RequestReader,
    Served,
    bearer,
    binary_answer,
    check_encoding,
    encode_answer,
    encode_head,
    enlarge,
    failed,
    form_of,
    json_answer,
    keep_large_buffers,
    oip_answer,
    peer_uid,
    plain_json,
    predict_target,
    predicted,
    refusal_doc,
)

if TYPE_CHECKING:
    from agent.apitokens import ApiTokens
    from agent.inference import ActiveModule, Answered
    from agent.supervisor import Reply
    from agent.workerproc import WorkerProcess

_VERSION = "0.1.0"  # the agent's, in OIP v2 server metadata
SHM_EXTENSIONS = [*oip.EXTENSIONS, "system_shared_memory"]  # the local API maps regions (agent/shmem.py)

log = logging.getLogger("edgefleet.agent.api")


TOKEN_REQUIRED = "the local API on TCP needs 'Authorization: Bearer <token>' with a token from DATA/api-tokens"


class Host(Protocol):
    """What the local API needs of the agent (``agent.core.Agent``): its inference front and its health."""

    @property
    def active(self) -> Mapping[str, ActiveModule]: ...
    @property
    def rejected(self) -> Counter[str]: ...
    async def infer_json(self, active: ActiveModule, body: bytes) -> bytes: ...
    def infer_json_now(self, active: ActiveModule, body: bytes, done: Answered) -> bool: ...
    async def infer_form(self, active: ActiveModule, form: dict[str, Any], body: bytes) -> Reply: ...
    def infer_form_now(self, active: ActiveModule, form: dict[str, Any], body: bytes,
                       done: Callable[[Reply | None, Exception | None], None]) -> bool: ...
    def health(self) -> dict[str, float]: ...
    def snapshot(self) -> dict[str, Any]: ...
    def worker_stats(self) -> dict[str, float]: ...
    def defer(self, seconds: float | None, reason: str = "") -> tuple[dict[str, Any], str | None]: ...
    def hold_view(self) -> dict[str, Any]: ...
    def add_labels(self, body: bytes) -> int: ...


SOCKET_MODE = 0o660


class LocalApi:
    """One listener: TCP on ``host:port`` (with ``tokens``, each request must carry one), or the Unix socket ``path``."""

    def __init__(self, agent: Host, host: str = "127.0.0.1", port: int = 8765, *,
                 tokens: ApiTokens | None = None, path: Path | None = None, group: str | None = None) -> None:
        self.agent, self.host, self.port = agent, host, port
        self.tokens, self.path, self.group = tokens, path, group
        self._server: asyncio.Server | None = None
        self.requests = 0
        self.shm = SharedMemory()

    async def start(self) -> None:
        keep_large_buffers()  # camera-sized bodies pass through this process
        loop = asyncio.get_running_loop()
        if self.path is not None:
            self._server = await self._start_unix(self.path)
            log.info("local inference API on unix:%s (mode %o%s)", self.path, SOCKET_MODE,
                     f", group {self.group}" if self.group else "")
            return
        self._server = await loop.create_server(lambda: _Connection(self), self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]  # the real one when 0 was asked
        log.info("local inference API on http://%s:%d (%s)", self.host, self.port,
                 "per-app tokens required" if self.tokens is not None else "no token: open to every local user")

    async def _start_unix(self, path: Path) -> asyncio.Server:
        """Bound aside, given its mode (and group) and only then renamed into place: never reachable more widely."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.unlink(missing_ok=True)
        server = await asyncio.get_running_loop().create_unix_server(lambda: _Connection(self), str(tmp))
        try:
            os.chmod(tmp, SOCKET_MODE)
            if self.group:
                shutil.chown(tmp, group=self.group)
            os.replace(tmp, path)
        except BaseException:
            server.close()
            tmp.unlink(missing_ok=True)
            raise
        return server

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
        if self.path is not None:
            self.path.unlink(missing_ok=True)
        self.shm.close()

    def app_of(self, head: bytes, peer_uid: int | None = None) -> str | None:
        """Who asks: the app whose token a TCP request carries (compared in constant time), ``uid:N`` on the Unix
        socket, ``local`` on TCP without tokens; None: a TCP request with tokens configured that carries none."""
        if self.tokens is None:
            return f"uid:{peer_uid}" if peer_uid is not None else "local"
        app = self.tokens.app(bearer(head))  # in the file now (agent/apitokens.py), compared in constant time
        return None if app is None else f"token:{app}"  # never a uid's, whatever the file calls it

    def share_regions(self, worker: WorkerProcess) -> None:
        """Every uid's regions to ``worker`` as it takes (or has just taken) its module's direct socket, where that
        uid's connections may name them (``agent/worker.py``); a token's regions stay on this API."""
        for app in [a for a in self.shm.apps if a.startswith("uid:")]:
            self.shm.pass_to(worker, app)

    def authorized(self, head: bytes) -> bool:
        """A TCP request with tokens configured must carry one that is in the file now (agent/apitokens.py)."""
        return self.app_of(head) is not None

    # --- routes ------------------------------------------------------------------------------

    def route(self, method: str, path: str, body: bytes, later: Callable[[Answer], None],
              headers: Headers | None = None, app: str = "local",
              owner: int | None = None) -> Answer | Coroutine[Any, Any, Answer] | None:
        """An answer at once; or None: a prediction is on its way to a worker and ``later`` gets the answer;
        or a coroutine that makes the answer (a worker restarting, in-process isolation)."""
        self.requests += 1
        headers = headers or {}
        check_encoding(headers.get("content-encoding"))  # BadRequest: answered by the connection
        shm = self.shm.route(method, path.split("?", 1)[0], body, app, os.geteuid() if owner is None else owner)
        if shm is not None:  # the shared memory extension (agent/shmem.py)
            if app.startswith("uid:"):  # a uid's regions: usable on every module's direct socket too
                for active in self.agent.active.values():
                    self.shm.pass_to(getattr(active.runner, "process", None), app)
            return shm
        route = oip.parse_path(path)
        if route is not None:
            answer = oip_answer(method, route, self.served(), self.agent.health()["healthy"] == 1.0, _VERSION,
                                SHM_EXTENSIONS)
            if answer is not None:
                return answer
            active = self.agent.active[route.model]
            if app in self.shm.apps:  # its regions go to the worker ahead of the request (and named in its form)
                self.shm.pass_to(getattr(active.runner, "process", None), app)
            return self._infer(active, {**form_of("v2", headers), "app": app}, body, later)
        name = predict_target(path)
        path = path.split("?", 1)[0]
        if name is not None:
            if method != "POST":
                return json_answer(405, {"detail": "use POST"})
            active = self.agent.active.get(name)
            if active is None:
                return json_answer(404, {"detail": f"module {name!r} is not running here", "modules": sorted(self.agent.active)})
            form = form_of("v1", headers)
            if not plain_json(form):
                return self._infer(active, form, body, later)
            if self.agent.infer_json_now(active, body, lambda out, exc: later(_predicted(active, out, exc))):
                return None
            return self._predict(active, body)
        if path == "/v1/labels" and method == "POST":
            try:
                return json_answer(202, {"queued": self.agent.add_labels(body)})
            except ValueError as exc:
                self.agent.rejected["local_api"] += 1
                return json_answer(400, {"detail": str(exc)})
        if path == "/healthz" and method == "GET":
            health = self.agent.health()
            ok = health["healthy"] == 1.0
            return json_answer(200 if ok else 503, {"ok": ok, **self.agent.snapshot()})
        if path == "/v1/defer":
            return self._defer(method, body)
        if path == "/metrics" and method == "GET":
            return 200, "text/plain; version=0.0.4", self.metrics().encode()
        return json_answer(404, {"detail": f"no route {method} {path}"})

    def _defer(self, method: str, body: bytes) -> Answer:
        if method == "GET":
            return json_answer(200, self.agent.hold_view())
        if method == "DELETE":
            return json_answer(200, self.agent.defer(None)[0])
        if method != "POST":
            return json_answer(405, {"detail": "use GET, POST or DELETE"})
        try:
            req = json.loads(body or b"{}")
            seconds, reason = req["seconds"], req.get("reason", "")
            if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not isinstance(reason, str):
                raise TypeError
        except (ValueError, KeyError, TypeError, AttributeError):
            self.agent.rejected["local_api"] += 1
            return json_answer(400, {"detail": 'want {"seconds": N, "reason": "..."}'})
        view, why = self.agent.defer(float(seconds), reason)
        return json_answer(409 if why else 200, {"detail": why, **view} if why else view)
    def served(self) -> dict[str, Served]:
        """The running modules as the OIP v2 metadata routes tell them (ready: the worker is serving)."""
        out = {}
        for name, m in self.agent.active.items():
            runtime = getattr(getattr(m.runner, "manifest", None), "runtime", "")
            ready = getattr(m.runner, "state", "serving") == "serving"
            out[name] = Served(m.version, runtime, m.runner.inputs, m.runner.outputs, ready)
        return out

    def _infer(self, active: ActiveModule, form: dict[str, Any], body: bytes,
               later: Callable[[Answer], None]) -> Answer | Coroutine[Any, Any, Answer] | None:
        v2 = form["kind"] == "v2"

        def answered(reply: Reply | None, exc: Exception | None) -> None:
            later(binary_answer(*reply[:3]) if reply is not None else failed(exc or RuntimeError("no answer"), v2))

        if self.agent.infer_form_now(active, form, body, answered):
            return None
        return self._infer_awaited(active, form, body)

    async def _infer_awaited(self, active: ActiveModule, form: dict[str, Any], body: bytes) -> Answer:
        try:
            return binary_answer(*(await self.agent.infer_form(active, form, body))[:3])
        except Exception as exc:
            return failed(exc, form["kind"] == "v2")

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


class _Connection(asyncio.BufferedProtocol):
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
        self._peer_uid: int | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        enlarge(sock)
        self._peer_uid = peer_uid(sock)  # on the Unix socket their uid is their app

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def pause_writing(self) -> None:  # a client that sends but does not read: stop reading its requests
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None:
            self.transport.resume_reading()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._reader.get_buffer()  # a large body is received in place (no copies of camera frames)

    def buffer_updated(self, nbytes: int) -> None:
        self._reader.buffer_updated(nbytes)
        if not self._busy:
            self._serve()

    def _serve(self) -> None:
        while self.transport is not None and not self._busy:
            try:
                request = self._reader.take()
            except BadRequest as exc:
                self.api.agent.rejected["local_api"] += 1
                self._reply(json_answer(exc.status, exc.doc()), keep=False)
                return
            if request is None:
                if self._reader.continue_due():  # nothing is owed ahead of it: not busy
                    self.transport.write(CONTINUE)
                return
            method, path, keep, body, headers = request
            head = method == "HEAD"  # answered as GET is, without the body
            app = self.api.app_of(self._reader.head, self._peer_uid)
            if app is None:
                self.api.agent.rejected["local_api_auth"] += 1
                self._reply(json_answer(401, refusal_doc(TOKEN_REQUIRED)), keep=False, head=head)
                return
            self._busy = True
            try:
                answer = self.api.route("GET" if head else method, path, body,
                                        functools.partial(self._later, keep, head=head), headers, app, self._peer_uid)
            except BadRequest as exc:  # a header the route refuses (Inference-Header-Content-Length, Content-Encoding)
                answer = json_answer(exc.status, exc.doc())
            if answer is None:
                return  # _later answers (it may have already)
            if isinstance(answer, tuple):
                self._busy = False
                self._reply(answer, keep, head)
            else:
                self._task = asyncio.get_running_loop().create_task(self._finish(answer, keep, head))

    def _later(self, keep: bool, answer: Answer, head: bool = False) -> None:
        self._busy = False
        self._reply(answer, keep, head)
        if self._reader.pending():  # pipelined requests that came meanwhile
            self._serve()

    async def _finish(self, pending: Coroutine[Any, Any, Answer], keep: bool, head: bool) -> None:
        try:
            answer = await pending
        finally:
            self._task = None
        self._later(keep, answer, head)

    def _reply(self, answer: Answer, keep: bool, head: bool = False) -> None:
        if self.transport is None:
            return
        if head:  # HEAD: the head alone (a body would be read as the next answer's start)
            self.transport.write(encode_head(answer, keep))
        elif len(answer[2]) > 65536:  # a tensor answer: its buffer sent as it is, after the head
            self.transport.write(encode_head(answer, keep))
            self.transport.write(answer[2])
        else:
            self.transport.write(encode_answer(answer, keep))
        if not keep:
            self.transport.close()
