"""A minimal HTTP/1.1 server: keep-alive, pipelining in order, bounded heads and bodies.

The scoring path needs none of a framework's routing, validation or middleware, and on a
2-core machine every microsecond of the front end is throughput (docs/endpoints.md). Requests
are cut by the device's parser (``modules.httpwire.RequestReader``): a camera-sized body is
received in place, written once by the kernel into a buffer of its own size, never joined from
pieces. A request it refuses (not HTTP/1.x, a chunked body, a head over 64 KB, a body over
64 MB, a malformed or repeated Content-Length) gets its status and the connection closes.
A handler returns a response tuple at once or a future of one.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

from hub.endpoints.pool import Response
from modules.httpwire import CONTINUE, BadRequest, RequestReader, enlarge

REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}
MAX_PIPELINED = 64  # answers owed on one connection before it is no longer read from


@dataclass
class Request:
    method: bytes
    path: str
    headers: dict[bytes, bytes]
    body: bytes = b""
    query: str = field(default="")


Handler = Callable[[Request], "Response | asyncio.Future[Response]"]


def render(resp: Response, keep_alive: bool) -> bytes:
    return render_head(resp, keep_alive) + resp[1]


def render_head(resp: Response, keep_alive: bool) -> bytes:
    """The status line and headers; the body is written after them as it is."""
    status, body, ctype, extra = resp
    head = [b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\ncontent-length: %d\r\n" % (
        status, REASONS.get(status, b"Unknown"), ctype.encode(), len(body))]
    for name, value in extra:
        head.append(f"{name}: {value}\r\n".encode())
    if not keep_alive:
        head.append(b"connection: close\r\n")
    head.append(b"\r\n")
    return b"".join(head)


def all_headers(head: bytes) -> dict[bytes, bytes]:
    """Every header of a request head (already checked by ``parse_head``), by lower-case name."""
    headers: dict[bytes, bytes] = {}
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    return headers


class HttpProtocol(asyncio.BufferedProtocol):
    def __init__(self, handler: Handler, alloc: Callable[[int, dict[str, str]], Any] | None = None) -> None:
        self.handler = handler
        self.reader = RequestReader(alloc) if alloc is not None else RequestReader()
        self.transport: asyncio.Transport | None = None
        # answers owed, in request order: (answer, keep-alive, a HEAD request's: the head without the body)
        self._responses: deque[tuple[Response | asyncio.Future[Response], bool, bool]] = deque()
        self._done = False  # a request said Connection: close, or was refused: nothing more is read
        self._paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        enlarge(transport.get_extra_info("socket"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.reader.get_buffer()  # the rest of a large body, in place

    def buffer_updated(self, nbytes: int) -> None:
        self.reader.buffer_updated(nbytes)
        self._take()

    def _take(self) -> None:
        while not self._done and not self._paused:
            try:
                request = self.reader.take()
            except BadRequest as exc:
                self._done = True
                self._queue((exc.status, json.dumps(exc.doc()).encode(), "application/json", ()), False)
                return
            if request is None:
                if self.reader.continue_due() and not self._responses and self.transport is not None:
                    self.transport.write(CONTINUE)  # else answers are owed ahead of it: the client's timeout sends it
                return
            method, target, keep_alive, body, _ = request
            path, _, query = target.partition("?")
            req = Request(method.encode("latin-1"), path, all_headers(self.reader.head), body, query)
            try:
                resp = self.handler(req)
            except Exception:  # a bug in a handler must not kill the connection silently
                resp = (500, b'{"detail":"internal error"}', "application/json", ())
            self._done = not keep_alive
            self._queue(resp, keep_alive, method == "HEAD")
            if len(self._responses) >= MAX_PIPELINED and self.transport is not None:
                self._paused = True  # a client that does not read its answers is not read from until it does
                self.transport.pause_reading()

    # --- responses, in request order ---------------------------------------------------------

    def _queue(self, resp: Response | asyncio.Future[Response], keep_alive: bool, head_only: bool = False) -> None:
        if not isinstance(resp, asyncio.Future) and not self._responses:
            self._write(resp, keep_alive, head_only)  # the common case: nothing pending ahead of it
            return
        self._responses.append((resp, keep_alive, head_only))
        if isinstance(resp, asyncio.Future):
            resp.add_done_callback(self._flush)
        else:
            self._flush()

    def _flush(self, _: object = None) -> None:
        while self._responses:
            resp, keep_alive, head_only = self._responses[0]
            if isinstance(resp, asyncio.Future):
                if not resp.done():
                    break
                resp = resp.result() if not resp.cancelled() else (503, b"", "text/plain", ())
            self._responses.popleft()
            self._write(resp, keep_alive, head_only)
        if self._paused and len(self._responses) < MAX_PIPELINED // 2 and self.transport is not None \
                and not self.transport.is_closing():
            self._paused = False
            self.transport.resume_reading()
            self._take()  # requests that arrived before the pause

    def _write(self, resp: Response, keep_alive: bool, head_only: bool = False) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        if head_only:  # HEAD: the answer's head (its Content-Length the body's) and no body, or framing breaks
            self.transport.write(render_head(resp, keep_alive))
        elif len(resp[1]) > 65536:  # a tensor answer: not copied into one buffer with its head, yet one writev
            self.transport.writelines((render_head(resp, keep_alive), resp[1]))  # (two writes: two wakeups)
        else:
            self.transport.write(render(resp, keep_alive))
        if not keep_alive:
            self.transport.close()


def bind(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def new_loop() -> asyncio.AbstractEventLoop:
    try:  # uvloop's loop and transports are markedly cheaper per request than asyncio's
        import uvloop

        return uvloop.new_event_loop()
    except ImportError:  # pragma: no cover
        return asyncio.new_event_loop()
