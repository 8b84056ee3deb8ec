"""The device's HTTP/1.1 wire format, shared by the agent's local API and each module worker's direct socket.

Pure parsing and encoding, no I/O and no NumPy: the agent (``agent.localapi``) and the worker
(``agent/worker.py``, run by path without the agent package) import it, so both answer the same
requests with the same status codes and the same words.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from modules import oip
from modules.errors import BodyError, InputError, NotAcceptable
from modules.framebuf import InPlaceBuffer
from modules.oip import Route
from protocol.manifest import TensorSpec

NPY = "application/x-npy"

Answer = tuple[int, str, bytes]  # status, content type, body
Headers = dict[str, str]  # the request headers a route reads (``KEPT``), by lower-case name

MAX_BODY = 64 * 2**20  # a 512x512x3 float image is 3 MB in binary, 16.5 MB as JSON
KEPT = ("content-type", "accept", "x-input", "inference-header-content-length", "content-encoding")
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"  # the interim answer to ``Expect: 100-continue`` (RequestReader)
MAX_HEAD = 64 * 1024
MAX_HEADER_LINES = 100
REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 406: "Not Acceptable",
           411: "Length Required", 413: "Payload Too Large", 415: "Unsupported Media Type", 417: "Expectation Failed",
           422: "Unprocessable Entity", 431: "Request Header Fields Too Large", 500: "Internal Server Error",
           503: "Service Unavailable"}
_PREFIX, _SUFFIX = "/v1/modules/", "/predict"


class BadRequest(ValueError):
    """Not an HTTP/1.x request this server takes: answered with ``status`` and the connection closed."""

    def __init__(self, detail: str, status: int = 400) -> None:
        super().__init__(detail)
        self.status = status

    def doc(self) -> dict[str, str]:
        return refusal_doc(str(self))


def refusal_doc(text: str) -> dict[str, str]:
    """A refusal's JSON on any route: ``detail`` as the v1 routes answer, ``error`` as OIP v2 clients read it."""
    return {"detail": text, "error": text}


def predict_target(path: str) -> str | None:
    """The module a ``/v1/modules/{name}/predict`` path names (query string ignored); None for any other path."""
    path = path.split("?", 1)[0]
    if path.startswith(_PREFIX) and path.endswith(_SUFFIX):
        return path[len(_PREFIX):-len(_SUFFIX)]
    return None


def json_answer(status: int, obj: Any) -> Answer:
    return status, "application/json", json.dumps(obj).encode()


def check_encoding(encoding: str | None) -> None:
    """BadRequest 415 for a body sent compressed (``Content-Encoding``, as tritonclient's
    ``request_compression_algorithm`` sends it), which read as if it were not would fail later with a misleading
    parse error. Raised by a route, after the body was read whole (its Content-Length frames it), so the
    connection goes on."""
    if encoding and encoding.strip().lower() != "identity":
        raise BadRequest(f"Content-Encoding {encoding.strip()[:20]!r} is not supported: send the body uncompressed",
                         415)


def error_status(exc: BaseException) -> int:
    """400 a body that is not JSON, 406 an answer form that cannot be given, 422 not the signature, 500 the module."""
    if isinstance(exc, BodyError):
        return 400
    if isinstance(exc, NotAcceptable):
        return 406
    return 422 if isinstance(exc, InputError) else 500


def failed(exc: BaseException, v2: bool = False) -> Answer:
    """A request's failure: ``{"detail": ...}`` on the v1 routes, ``{"error": ...}`` on OIP v2's."""
    return json_answer(error_status(exc), {"error" if v2 else "detail": str(exc) or repr(exc)})


def predicted(name: str, version: int, out: bytes | None, exc: BaseException | None) -> Answer:
    """A JSON prediction's answer: 200 with the outputs, or :func:`failed`'s."""
    if exc is not None or out is None:
        return failed(exc or RuntimeError("no answer"))
    # the worker's JSON as it is, inside the envelope (not parsed and encoded again)
    return 200, "application/json", b'{"module": %s, "version": %d, "outputs": %s}' % (
        json.dumps(name).encode(), version, out)


def binary_answer(ctype: str, header_length: int, body: bytes) -> Answer:
    """A 200 answer whose content type carries the OIP header length when there is one (``encode_answer`` splits it)."""
    return 200, ctype if header_length < 0 else f"{ctype}\r\nInference-Header-Content-Length: {header_length}", body


def encode_head(answer: Answer, keep: bool) -> bytes:
    """An answer's status line and headers; its body follows as it is (large ones are not copied into one buffer)."""
    status, ctype, payload = answer
    return b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n%s\r\n" % (
        status, REASONS.get(status, "").encode(), ctype.encode(), len(payload),
        b"" if keep else b"Connection: close\r\n")


def encode_answer(answer: Answer, keep: bool) -> bytes:
    return encode_head(answer, keep) + answer[2]


def form_of(kind: str, headers: Headers) -> dict[str, Any]:
    """The request's form (``modules.tensors.Form.to_dict``) from its headers; BadRequest on a malformed length."""
    hlen = headers.get("inference-header-content-length", "").strip()
    if hlen and not hlen.isdigit():
        raise BadRequest(f"Inference-Header-Content-Length {hlen[:20]!r} is not a number")
    return {"kind": kind, "ctype": headers.get("content-type", "application/json"), "accept": headers.get("accept", ""),
            "hlen": int(hlen) if hlen else -1, "input": headers.get("x-input", "")}


def plain_json(form: dict[str, Any]) -> bool:
    """A v1 JSON request that wants JSON back: the fast path, whose outputs the worker writes as they are."""
    return form["kind"] == "v1" and not form["ctype"].startswith(NPY) and NPY not in form["accept"]


BIG_BUFFER = 4 * 2**20  # socket buffers for camera-sized bodies: a 3 MB image crosses in one go, not in 200 KB turns


def enlarge(sock: Any) -> None:
    """Ask for ``BIG_BUFFER`` send and receive buffers (the kernel caps them at its maximum): on a busy machine
    every turn the sender waits for the receiver to drain a small buffer costs a scheduling delay."""
    import socket  # here: this module does no I/O of its own

    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, BIG_BUFFER)
        except (OSError, AttributeError):
            pass


def peer_uid(sock: Any) -> int | None:
    """The uid of the process on the other end of a Unix socket (SO_PEERCRED); None where it cannot be told.

    In a user namespace that maps only some uids (an unprivileged agent's sandboxed worker), every unmapped
    peer shows as the overflow uid: that uid is nobody in particular there, so it is None too.
    """
    import socket
    import struct

    if sock is None or sock.family != socket.AF_UNIX or not hasattr(socket, "SO_PEERCRED"):
        return None
    try:
        uid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[1]
    except OSError:
        return None
    return None if uid == _unmapped_uid() else uid


@functools.cache
def _unmapped_uid() -> int | None:
    """The uid unmapped peers show as, if this process is in a user namespace that does not map them all."""
    try:
        with open("/proc/self/uid_map") as f:
            if f.read().split() == ["0", "0", "4294967295"]:  # the initial namespace: every uid is itself
                return None
        with open("/proc/sys/kernel/overflowuid") as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


def keep_large_buffers() -> None:
    """glibc: take buffers up to 32 MiB from the heap and keep up to 64 MiB of freed heap mapped.

    By default each multi-megabyte body is a fresh mmap, faulted in page by page and unmapped after
    the request; in a VM a page fault costs tens of microseconds, so a 3 MB image paid milliseconds for
    every copy. Called once by each process on the serving path (agent, its workers, gateway, endpoint
    workers). A no-op where glibc is not the C library.
    """
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 * 2**20)  # M_MMAP_THRESHOLD (its maximum on 64-bit glibc)
        libc.mallopt(-1, 64 * 2**20)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


class RequestReader(InPlaceBuffer):
    """Requests cut from a connection's bytes as they arrive: the head at its blank line, parsed in one go.

    A large body is received in place: once its head is parsed, :meth:`get_buffer` hands out the rest of a
    buffer of the body's size (``recv_into`` / ``asyncio.BufferedProtocol``), so the body's bytes are
    written once by the kernel and never copied here. Small bodies and heads go through ``buf``.
    """

    def __init__(self, alloc: Callable[[int, Headers], Any] = lambda length, headers: bytearray(length)) -> None:
        super().__init__(65536)  # a large body is received in place (``_body``, ``_filled``)
        self._alloc = alloc  # a large body's buffer (the web gateway's: shared memory, hub/endpoints/arena.py)
        self._head: tuple[int, str, str, bool, int, Headers] | None = None  # a parsed head whose body is still arriving
        self.head = b""  # the head of the request last parsed (the one ``take`` returns next): its other headers
        self._continue = False  # the parsed head asked for 100 Continue and its body has not all come yet

    def continue_due(self) -> bool:
        """True once after a head that asked ``Expect: 100-continue`` was parsed and its body is still to come:
        the server then writes :data:`CONTINUE`, and the client sends the body at once instead of after a
        timeout. A body that already came whole (the client did not wait) is not answered 100."""
        due, self._continue = self._continue, False
        return due

    def pending(self) -> bool:
        """A next request has (partly) arrived (pipelined): its bytes, or its parsed head with the body coming in place."""
        return bool(self.buf) or self._head is not None

    def feed(self, data: bytes) -> None:
        """Bytes read some other way (``asyncio.Protocol.data_received``)."""
        if self._body is not None:
            n = min(len(data), len(self._body) - self._filled)
            self._body[self._filled:self._filled + n] = memoryview(data)[:n]
            self._filled += n
            data = memoryview(data)[n:]
        if data:
            self.buf += data

    def take(self) -> tuple[str, str, bool, bytes, Headers] | None:
        """The next whole request (method, path, keep-alive, body, headers); None until it has arrived. BadRequest: refuse it.

        The body is ``bytes``, or the allocator's buffer (a ``bytearray`` of its own) when it was received in place."""
        if self._body is not None:
            if self._filled < len(self._body):
                return None
            assert self._head is not None
            body: bytes = self._body  # type: ignore[assignment]  # bytes-like, owned by this request alone
            self._body, self._filled = None, 0
            _, method, path, keep, _, headers = self._head
            self._head, self._continue = None, False
            return method, path, keep, body, headers
        if self._head is None:
            end = self.buf.find(b"\r\n\r\n", 0, MAX_HEAD + 4)
            if end < 0:  # also a head that came whole in one read but is longer than allowed
                if len(self.buf) > MAX_HEAD:
                    raise BadRequest(f"request head over {MAX_HEAD} bytes", 431)
                return None
            self.head = bytes(self.buf[:end])
            self._head = (end + 4, *parse_head(self.head))
            self._continue = "expect" in self._head[5]
        start, method, path, keep, length, headers = self._head
        if len(self.buf) < start + length:
            if length > len(self._scratch):  # the rest comes straight into a buffer of the body's size
                self._body = self._alloc(length, headers)
                self._filled = len(self.buf) - start
                self._body[:self._filled] = memoryview(self.buf)[start:]
                self.buf.clear()
            return None
        with memoryview(self.buf) as view:  # one copy of the body, not two (a slice, then bytes of it)
            body = bytes(view[start:start + length])
        del self.buf[:start + length]
        self._head = None
        self._continue = False
        return method, path, keep, body, headers


def bearer(head: bytes) -> str:
    """The token of a head's ``Authorization: Bearer`` header, or ""."""
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"authorization":
            scheme, _, token = value.strip().partition(b" ")
            return token.strip().decode("latin-1") if scheme.lower() == b"bearer" else ""
    return ""


def parse_head(head: bytes) -> tuple[str, str, bool, int, Headers]:
    """Method, path, keep-alive, Content-Length and the kept headers of a request head (without its blank line)."""
    lines = head.decode("latin-1").split("\r\n")
    if len(lines) > MAX_HEADER_LINES:
        raise BadRequest(f"more than {MAX_HEADER_LINES} header lines", 431)
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise BadRequest(f"not an HTTP/1.x request line: {lines[0][:80]!r}")
    method, path, version = parts
    keep, length, seen_length = version != "HTTP/1.0", 0, False
    headers: Headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep:
            raise BadRequest(f"malformed header line {line[:80]!r}")
        name = name.strip().lower()
        if name == "content-length":
            if not value.strip().isdigit():
                raise BadRequest(f"Content-Length {value.strip()[:20]!r} is not a number")
            if seen_length and int(value) != length:  # two lengths: where this body ends is ambiguous (smuggling)
                raise BadRequest("two different Content-Length headers")
            length, seen_length = int(value), True
        elif name == "connection":
            keep = value.strip().lower() == "keep-alive" if version == "HTTP/1.0" else value.strip().lower() != "close"
        elif name == "transfer-encoding":
            raise BadRequest("Transfer-Encoding is not supported: send the body with a Content-Length", 411)
        elif name == "expect":  # curl asks it for bodies over 1 MB, then waits a second for the answer
            if value.strip().lower() != "100-continue":
                raise BadRequest(f"Expect {value.strip()[:20]!r} is not supported (only 100-continue)", 417)
            headers[name] = "100-continue"
        elif name in KEPT:
            headers[name] = value.strip()
    if length > MAX_BODY:
        raise BadRequest(f"body of {length} bytes; at most {MAX_BODY}", 413)
    return method, path, keep, length, headers


@dataclass(frozen=True)
class Served:
    """What the OIP v2 metadata and readiness routes tell of one module serving here."""

    version: int
    runtime: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    ready: bool = True


def oip_answer(method: str, route: Route, models: Mapping[str, Served], ready: bool, server: str,
               extensions: list[str] = oip.EXTENSIONS) -> Answer | None:
    """The answer to an OIP v2 route, or None for an inference the caller runs (the module and version exist)."""
    if route.kind == "infer":
        if method != "POST":
            return json_answer(405, oip.error("use POST"))
    elif method != "GET":
        return json_answer(405, oip.error("use GET"))
    if route.kind == "server":
        return json_answer(200, oip.server_metadata(server, extensions))
    if route.kind == "live":
        return json_answer(200, {"live": True})
    if route.kind == "ready":
        return json_answer(200 if ready else 503, {"ready": ready})
    served = models.get(route.model)
    if served is None:
        return json_answer(404, oip.error(f"model {route.model!r} is not served here; models: {sorted(models)}"))
    if route.version and route.version != str(served.version):
        return json_answer(404, oip.error(f"model {route.model!r} version {route.version} is not served here; "
                                          f"version {served.version} is"))
    if route.kind == "model":
        return json_answer(200, oip.model_metadata(route.model, [str(served.version)], served.runtime, served.inputs,
                                                   served.outputs))
    if route.kind == "model_ready":
        return json_answer(200 if served.ready else 503, {"name": route.model, "ready": served.ready})
    return None
