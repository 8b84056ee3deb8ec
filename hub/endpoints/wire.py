"""Frames between the gateway and its workers: a 4-byte little-endian length, then a pickle.

Both ends are processes of one endpoint that trust each other, so pickle (protocol 5) is
fine, and it is the cheapest way to move bytes, small tuples and numpy arrays.
"""

from __future__ import annotations

import pickle
import socket
import struct
from typing import Any

HEADER = struct.Struct("<I")
MAX_FRAME = 1 << 30


def encode(message: Any) -> bytes:
    body = pickle.dumps(message, protocol=5)
    return HEADER.pack(len(body)) + body


class FrameReader:
    """Incremental decoder for the asyncio side: feed bytes, get whole messages."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[Any]:
        self._buf += data
        out = []
        while len(self._buf) >= HEADER.size:
            (size,) = HEADER.unpack_from(self._buf)
            if size > MAX_FRAME:
                raise ValueError(f"frame of {size} bytes is too large")
            end = HEADER.size + size
            if len(self._buf) < end:
                break
            out.append(pickle.loads(memoryview(self._buf)[HEADER.size:end]))
            del self._buf[:end]
        return out


def recv_exact(sock: socket.socket, n: int) -> bytes | None:
    """Blocking read of exactly ``n`` bytes; None at end of stream."""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            return None
        got += k
    return bytes(buf)


def recv(sock: socket.socket) -> Any:
    """Blocking read of one message; None when the peer closed the connection."""
    head = recv_exact(sock, HEADER.size)
    if head is None:
        return None
    (size,) = HEADER.unpack(head)
    body = recv_exact(sock, size)
    return None if body is None else pickle.loads(body)
