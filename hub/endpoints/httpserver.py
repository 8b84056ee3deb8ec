"""A minimal HTTP/1.1 server on httptools: keep-alive, pipelining in order, bounded bodies.

The scoring path needs none of a framework's routing, validation or middleware, and on a
2-core machine every microsecond of the front end is throughput (docs/endpoints.md).
A handler returns a response tuple at once or a future of one.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus

import httptools

from hub.endpoints.pool import Response
from modules.httpwire import enlarge

MAX_BODY = 64 * 1024 * 1024
REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}


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


class HttpProtocol(asyncio.Protocol):
    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self._responses: deque[tuple[Response | asyncio.Future[Response], bool]] = deque()
        self._url = b""
        self._headers: dict[bytes, bytes] = {}
        self._body: list[bytes] = []
        self._size = 0
        self._too_large = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        enlarge(transport.get_extra_info("socket"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(400, b"upgrades are not supported")
        except httptools.HttpParserError:
            self._fail(400, b"malformed HTTP request")

    def _fail(self, status: int, text: bytes) -> None:
        if self.transport is not None:
            self.transport.write(render((status, text, "text/plain", ()), False))
            self.transport.close()

    # --- httptools callbacks -----------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._url, self._headers, self._body, self._size, self._too_large = b"", {}, [], 0, False

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.lower()] = value

    def on_body(self, body: bytes) -> None:
        self._size += len(body)
        if self._size > MAX_BODY:
            self._too_large = True
            self._body = []
        elif not self._too_large:
            self._body.append(body)

    def on_message_complete(self) -> None:
        keep_alive = self.parser.should_keep_alive()
        if self._too_large:
            self._queue((413, b'{"detail":"body too large"}', "application/json", ()), False)
            return
        path, _, query = self._url.decode("latin-1").partition("?")
        req = Request(self.parser.get_method(), path, self._headers, b"".join(self._body), query)
        try:
            resp = self.handler(req)
        except Exception:  # a bug in a handler must not kill the connection silently
            resp = (500, b'{"detail":"internal error"}', "application/json", ())
        self._queue(resp, keep_alive)

    # --- responses, in request order ---------------------------------------------------------

    def _queue(self, resp: Response | asyncio.Future[Response], keep_alive: bool) -> None:
        if not isinstance(resp, asyncio.Future) and not self._responses:
            self._write(resp, keep_alive)  # the common case: nothing pending ahead of it
            return
        self._responses.append((resp, keep_alive))
        if isinstance(resp, asyncio.Future):
            resp.add_done_callback(self._flush)
        else:
            self._flush()

    def _flush(self, _: object = None) -> None:
        while self._responses:
            resp, keep_alive = self._responses[0]
            if isinstance(resp, asyncio.Future):
                if not resp.done():
                    return
                resp = resp.result() if not resp.cancelled() else (503, b"", "text/plain", ())
            self._responses.popleft()
            self._write(resp, keep_alive)

    def _write(self, resp: Response, keep_alive: bool) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        if len(resp[1]) > 65536:  # a tensor answer: not copied into one buffer with its head
            self.transport.write(render_head(resp, keep_alive))
            self.transport.write(resp[1])
        else:
            self.transport.write(render(resp, keep_alive))
        if not keep_alive:
            self.transport.close()
