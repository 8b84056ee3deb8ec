"""Frames between the gateway and its workers: a 4-byte little-endian length, then one MessagePack message.

Workers run operator code in the sandbox (modules/sandbox.py), so the gateway decodes what they send
as hostile input: exactly the messages below, typed and bounded by msgspec, nothing that executes
(this used to be pickle, which would have handed a worker the gateway). A frame that does not decode
ends that worker. Messages are tagged arrays, as cheap to move as pickle was.
"""

from __future__ import annotations

import socket
import struct
from typing import Annotated, Any

import msgspec

from protocol.manifest import TensorSpec

HEADER = struct.Struct("<I")
MAX_FRAME = 1 << 30
MAX_TEXT = 64 * 1024
REUSE_MAX = 16 << 20

# one request as the gateway forwards it: (request id, content type, body, input name for .npy bodies, wants npy,
# "v1" or "v2" (OIP), the OIP binary extension's JSON header length or -1, and for a body in the shared arena
# (arena.py; the body field then empty) its offset and size there, else -1 and 0)
Item = tuple[str, str, bytes, str, bool, str, int, int, int]
Status = Annotated[int, msgspec.Meta(ge=100, le=599)]
ContentType = Annotated[str, msgspec.Meta(pattern=r"^[!-~][ -~]{0,127}$")]  # printable ASCII: no header injection
Result = tuple[Status, bytes, ContentType, int]  # (HTTP status, body, content type, OIP header length or -1)


class Run(msgspec.Struct, array_like=True, tag="run"):
    batch: int
    items: list[Item]


# ``Run`` as a worker decodes it: each body a view of the received frame (no copy of a camera frame)
ItemView = tuple[str, str, memoryview, str, bool, str, int, int, int]


class RunView(msgspec.Struct, array_like=True, tag="run"):
    batch: int
    items: list[ItemView]


class Ready(msgspec.Struct, array_like=True, tag="ready"):
    """Sent once the bundle loaded and passed its health check."""

    pid: int
    batchable: bool
    inputs: Annotated[list[TensorSpec], msgspec.Meta(max_length=1024)]
    outputs: Annotated[list[TensorSpec], msgspec.Meta(max_length=1024)]


class Fail(msgspec.Struct, array_like=True, tag="fail"):
    reason: Annotated[str, msgspec.Meta(max_length=MAX_TEXT)]


class Results(msgspec.Struct, array_like=True, tag="res"):
    batch: int
    results: list[Result]
    samples: list[tuple[str, str, str]] = []  # (inputs, outputs as JSON, request id), sampled for data collection


FromWorker = Ready | Fail | Results

_encoder = msgspec.msgpack.Encoder()


def encode(message: Any) -> bytearray:
    """The frame: written once, after room for its length (no second copy to put the length in front)."""
    buf = bytearray(HEADER.size)
    _encoder.encode_into(message, buf, HEADER.size)
    HEADER.pack_into(buf, 0, len(buf) - HEADER.size)
    return buf


class FrameReader:
    """Incremental decoder for the asyncio side: feed bytes, get whole messages of ``kind``.

    Raises ``ValueError`` (``msgspec.DecodeError`` is one) on an oversized or malformed frame.
    """

    def __init__(self, kind: Any) -> None:
        self._buf = bytearray()
        self._decoder = msgspec.msgpack.Decoder(kind)
        self._scratch = bytearray(256 * 1024)
        self._big = bytearray()  # large frames up to REUSE_MAX, reused (_room)
        self._frame: memoryview | None = None  # a large frame being received in place, and how much has come
        self._filled = 0

    def _room(self, size: int) -> memoryview:
        """Where a large frame is received: one buffer kept across frames, not a fresh zero-filled one each time
        (a memset of every answer's size). Safe because every message a worker sends decodes into copies (bytes,
        str), never views of the frame; a frame over ``REUSE_MAX`` gets its own, so one huge answer is not kept."""
        if size > REUSE_MAX:
            return memoryview(bytearray(size))
        if len(self._big) < size:
            self._big = bytearray(size)
        return memoryview(self._big)[:size]

    def get_buffer(self) -> memoryview:
        """Where the next bytes go (``asyncio.BufferedProtocol``): the rest of a large frame, else a scratch buffer."""
        if self._frame is not None:
            return memoryview(self._frame)[self._filled:]
        return memoryview(self._scratch)

    def buffer_updated(self, n: int) -> list[Any]:
        if self._frame is None:
            return self.feed(memoryview(self._scratch)[:n])
        self._filled += n
        if self._filled < len(self._frame):
            return []
        frame, self._frame = self._frame, None
        return [self._decoder.decode(frame)]

    def feed(self, data: Any) -> list[Any]:
        self._buf += data
        out = []
        while len(self._buf) >= HEADER.size:
            (size,) = HEADER.unpack_from(self._buf)
            if size > MAX_FRAME:
                raise ValueError(f"frame of {size} bytes is too large")
            end = HEADER.size + size
            if len(self._buf) < end:
                if size > len(self._scratch):  # the rest comes straight into a buffer of the frame's size
                    self._frame = self._room(size)
                    self._filled = len(self._buf) - HEADER.size
                    self._frame[:self._filled] = memoryview(self._buf)[HEADER.size:]
                    self._buf.clear()
                break
            out.append(self._decoder.decode(memoryview(self._buf)[HEADER.size:end]))
            del self._buf[:end]
        return out


def recv_exact(sock: socket.socket, n: int) -> bytearray | None:
    """Blocking read of exactly ``n`` bytes into a buffer of their own; None at end of stream."""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            return None
        got += k
    return buf


def recv(sock: socket.socket, decoder: msgspec.msgpack.Decoder[Any]) -> Any:
    """Blocking read of one message; None when the peer closed the connection."""
    head = recv_exact(sock, HEADER.size)
    if head is None:
        return None
    (size,) = HEADER.unpack(head)
    if size > MAX_FRAME:
        raise ValueError(f"frame of {size} bytes is too large")
    body = recv_exact(sock, size)
    return None if body is None else decoder.decode(body)
