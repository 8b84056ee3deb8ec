"""The web gateway's HTTP/1.1 (hub/endpoints/httpserver.py) against a raw socket client, on a real uvloop server.

The handler answers some requests at once and some later (futures resolved out of order), so the tests see
what a client sees: answers in request order, however they complete; a pipelining client that reads nothing
is not read from past 64 owed answers, then served in full once it reads; large bodies arrive whole into the
allocator's buffer; refusals close the connection.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import Iterator

import pytest

from hub.endpoints.httpserver import MAX_PIPELINED, HttpProtocol, Request, bind, new_loop
from modules.httpwire import CONTINUE


class Server:
    """HttpProtocol on its own loop in a thread; even-numbered paths answered at once, odd ones 5 ms later."""

    def __init__(self) -> None:
        self.loop = new_loop()
        self.sock = bind("127.0.0.1", 0)
        self.port = self.sock.getsockname()[1]
        self.allocated: list[int] = []
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def alloc(self, length: int, headers: dict[str, str]) -> bytearray:
        self.allocated.append(length)
        return bytearray(length)

    def handle(self, req: Request):
        n = int(req.path.strip("/") or 0)
        body = json.dumps({"n": n, "size": len(req.body), "sum": sum(req.body[:1000])}).encode()
        resp = (200, body, "application/json", ())
        if n % 2 == 0:
            return resp
        fut = self.loop.create_future()
        self.loop.call_later(0.005, fut.set_result, resp)
        return fut

    def __enter__(self) -> Server:
        async def start() -> None:
            await self.loop.create_server(lambda: HttpProtocol(self.handle, self.alloc), sock=self.sock)

        self.thread.start()
        asyncio.run_coroutine_threadsafe(start(), self.loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def server() -> Iterator[Server]:
    with Server() as s:
        yield s


def request(n: int, body: bytes = b"", extra: bytes = b"") -> bytes:
    return b"POST /%d HTTP/1.1\r\nHost: t\r\n%sContent-Length: %d\r\n\r\n%s" % (n, extra, len(body), body)


def answers(sock: socket.socket, count: int) -> list[tuple[int, dict]]:
    buf, out = b"", []
    while len(out) < count:
        end = buf.find(b"\r\n\r\n")
        if end >= 0:
            head = buf[:end].decode()
            length = int(head.lower().split("content-length: ")[1].split("\r\n")[0])
            if len(buf) >= end + 4 + length:
                out.append((int(head.split(" ")[1]), json.loads(buf[end + 4:end + 4 + length])))
                buf = buf[end + 4 + length:]
                continue
        chunk = sock.recv(1 << 16)
        assert chunk, f"closed after {len(out)} answers"
        buf += chunk
    return out


def test_pipelined_answers_come_in_request_order_however_they_complete(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(b"".join(request(n, b"x" * n) for n in range(20)))
        got = answers(sock, 20)
    assert [doc["n"] for _, doc in got] == list(range(20)) and [doc["size"] for _, doc in got] == list(range(20))


def test_a_client_that_does_not_read_is_paused_then_served_in_full(server):
    count = MAX_PIPELINED * 3
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # its answers back up quickly
        sock.sendall(b"".join(request(n) for n in range(count)))
        got = answers(sock, count)
    assert [doc["n"] for _, doc in got] == list(range(count)) and {s for s, _ in got} == {200}


def test_a_large_body_lands_whole_in_the_allocators_buffer(server):
    body = bytes(range(256)) * 4096  # 1 MiB
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(request(2, body) + request(4, b"small"))
        (s1, big), (s2, small) = answers(sock, 2)
    assert (s1, big["size"], big["sum"]) == (200, len(body), sum(body[:1000])) and (s2, small["size"]) == (200, 5)
    assert server.allocated == [len(body)]  # small bodies come with the head, not through the allocator


def test_expect_100_continue_is_answered_before_the_body_and_only_while_it_is_awaited(server):
    body = bytes(range(256)) * 1024  # 256 KB: received in place
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(request(2, extra=b"Expect: 100-continue\r\n").replace(b"Content-Length: 0", b"Content-Length: %d"
                                                                           % len(body)))
        got = b""
        while len(got) < len(CONTINUE):  # the client holds its body until this comes (curl: for a second)
            chunk = sock.recv(len(CONTINUE) - len(got))
            assert chunk, "closed instead of 100 Continue"
            got += chunk
        assert got == CONTINUE
        sock.sendall(body)
        # a client that sent its body without waiting gets no 100, only the answer
        sock.sendall(request(4, b"small", extra=b"Expect: 100-continue\r\n"))
        (s1, big), (s2, small) = answers(sock, 2)
    assert (s1, big["size"], big["sum"]) == (200, len(body), sum(body[:1000])) and (s2, small["size"]) == (200, 5)


def test_a_head_request_gets_the_head_alone_and_the_next_answer_follows_it(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(b"HEAD /2 HTTP/1.1\r\nHost: t\r\n\r\n" + request(4, b"abc"))
        buf = b""
        while buf.count(b"\r\n\r\n") < 2 or not buf.endswith(b"}"):
            chunk = sock.recv(65536)
            assert chunk, buf
            buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and b"content-length: " in head  # the length GET's body would have
    assert rest.startswith(b"HTTP/1.1 200 ") and rest.endswith(b'"size": 3, "sum": 294}')  # no body in between


@pytest.mark.parametrize("raw, status", [
    (b"POST /2 HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 411),
    (b"POST /2 HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nContent-Length: 50\r\n\r\nhello", 400),
    (b"POST /2 HTTP/1.1\r\nHost: t\r\nContent-Length: 99999999999\r\n\r\n", 413),
    (b"GARBAGE\r\n\r\n", 400),
    (b"POST /2 HTTP/1.1\r\nHost: t\r\nExpect: tea\r\nContent-Length: 0\r\n\r\n", 417),
    (b"GET /2 HTTP/1.1\r\nX: " + b"a" * 70000 + b"\r\n\r\n", 431),
])
def test_a_refused_request_gets_its_status_and_the_connection_closes(server, raw, status):
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(request(2) + raw + request(4))
        got = answers(sock, 2)
        assert [s for s, _ in got] == [200, status] and "detail" in got[1][1]
        assert sock.recv(1024) == b""  # closed: the request after it is not answered
