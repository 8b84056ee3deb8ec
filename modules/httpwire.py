"""The predict route's HTTP/1.1 wire format, shared by the agent's local API and each module worker's direct socket.

Pure parsing and encoding, no I/O and no NumPy: the agent (``agent.localapi``) and the worker
(``agent/worker.py``, run by path without the agent package) import it, so both answer the same
requests with the same status codes and the same words.
"""

from __future__ import annotations

import json
from typing import Any

from modules.errors import BodyError, InputError

Answer = tuple[int, str, bytes]  # status, content type, body

MAX_BODY = 16 * 2**20
MAX_HEAD = 64 * 1024
MAX_HEADER_LINES = 100
REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 411: "Length Required",
           413: "Payload Too Large", 422: "Unprocessable Entity", 431: "Request Header Fields Too Large",
           500: "Internal Server Error", 503: "Service Unavailable"}
_PREFIX, _SUFFIX = "/v1/modules/", "/predict"


class BadRequest(ValueError):
    """Not an HTTP/1.x request this server takes: answered with ``status`` and the connection closed."""

    def __init__(self, detail: str, status: int = 400) -> None:
        super().__init__(detail)
        self.status = status


def predict_target(path: str) -> str | None:
    """The module a ``/v1/modules/{name}/predict`` path names (query string ignored); None for any other path."""
    path = path.split("?", 1)[0]
    if path.startswith(_PREFIX) and path.endswith(_SUFFIX):
        return path[len(_PREFIX):-len(_SUFFIX)]
    return None


def json_answer(status: int, obj: Any) -> Answer:
    return status, "application/json", json.dumps(obj).encode()


def predicted(name: str, version: int, out: bytes | None, exc: BaseException | None) -> Answer:
    """A prediction's answer: 200 with the outputs, 400 not JSON, 422 not the signature, 500 the module's own failure."""
    if isinstance(exc, BodyError):
        return json_answer(400, {"detail": str(exc)})
    if isinstance(exc, InputError):
        return json_answer(422, {"detail": str(exc)})
    if exc is not None or out is None:
        return json_answer(500, {"detail": str(exc) or repr(exc)})
    # the worker's JSON as it is, inside the envelope (not parsed and encoded again)
    return 200, "application/json", b'{"module": %s, "version": %d, "outputs": %s}' % (
        json.dumps(name).encode(), version, out)


def encode_answer(answer: Answer, keep: bool) -> bytes:
    status, ctype, payload = answer
    return b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n%s\r\n%s" % (
        status, REASONS.get(status, "").encode(), ctype.encode(), len(payload),
        b"" if keep else b"Connection: close\r\n", payload)


class RequestReader:
    """Requests cut from a connection's bytes as they arrive: the head at its blank line, parsed in one go."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self._head: tuple[int, str, str, bool, int] | None = None  # a parsed head whose body is still arriving
        self.head = b""  # the head of the request last parsed (the one ``take`` returns next): its other headers

    def take(self) -> tuple[str, str, bool, bytes] | None:
        """The next whole request (method, path, keep-alive, body); None until it has arrived. BadRequest: refuse it."""
        if self._head is None:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buf) > MAX_HEAD:
                    raise BadRequest(f"request head over {MAX_HEAD} bytes", 431)
                return None
            self.head = bytes(self.buf[:end])
            self._head = (end + 4, *parse_head(self.head))
        start, method, path, keep, length = self._head
        if len(self.buf) < start + length:
            return None
        body = bytes(self.buf[start:start + length])
        del self.buf[:start + length]
        self._head = None
        return method, path, keep, body


def bearer(head: bytes) -> str:
    """The token of a head's ``Authorization: Bearer`` header, or ""."""
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"authorization":
            scheme, _, token = value.strip().partition(b" ")
            return token.strip().decode("latin-1") if scheme.lower() == b"bearer" else ""
    return ""


def parse_head(head: bytes) -> tuple[str, str, bool, int]:
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
