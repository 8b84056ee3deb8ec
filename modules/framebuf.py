"""Worker frames (``modules.workerwire``) received in place and sent without joining: the agent <-> worker hop.

A frame's body (a camera-sized tensor) is written once by the kernel into a buffer of its own size
(:class:`FrameReader`, fed by ``recv_into``/``readv`` or ``asyncio.BufferedProtocol``) and sent from
the caller's buffers with ``writev`` (:func:`write_all`): no concatenation, no ``bytes`` of slices.
Both ends import it: the agent (``agent.workerproc``) and the worker (``agent/worker.py``).
"""

from __future__ import annotations

import array
import os
import socket
import stat
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from modules.workerwire import LEN, MAX_HEADER, body_size, parse_header, unpack_body

if TYPE_CHECKING:
    from modules.runners import Batch

Frame = tuple[dict[str, Any], "Batch", bytes]
SCRATCH = 256 * 1024  # heads and small frames are read in pieces of up to this; larger bodies in place


class InPlaceBuffer:
    """Where a stream's next bytes go: the rest of a large body being received in place (``_body``, filled up to
    ``_filled``), else a scratch buffer whose bytes are appended to ``buf``. Shared by the frame and HTTP readers."""

    def __init__(self, scratch: int = SCRATCH) -> None:
        self.buf = bytearray()
        self._scratch = bytearray(scratch)
        self._body: Any = None  # a bytearray, or a caller's writable buffer (RequestReader's allocator)
        self._filled = 0

    def get_buffer(self) -> memoryview:
        """Where the next bytes from the connection go (``recv_into`` / ``asyncio.BufferedProtocol``)."""
        if self._body is not None:
            return memoryview(self._body)[self._filled:]
        return memoryview(self._scratch)

    def buffer_updated(self, n: int) -> None:
        """``n`` bytes were written into :meth:`get_buffer`'s buffer."""
        if self._body is not None:
            self._filled += n
        else:
            self.buf += memoryview(self._scratch)[:n]


class FrameReader(InPlaceBuffer):
    """Whole frames cut from a stream; a large body lands straight in a ``bytearray`` of its size."""

    def __init__(self) -> None:
        super().__init__()
        self._header: dict[str, Any] | None = None
        self.fds: deque[int] = deque()  # descriptors passed with the frames (SCM_RIGHTS), taken in order
        self._sock: socket.socket | None = None

    def fill(self, fd: int) -> int:
        """Read what ``fd`` has (blocking) into :meth:`get_buffer`, keeping passed descriptors; 0 at end of stream."""
        if self._sock is None and stat.S_ISSOCK(os.fstat(fd).st_mode):
            self._sock = socket.socket(fileno=os.dup(fd))
        if self._sock is None:  # a pipe (a worker run by hand): no descriptors can come
            n = os.readv(fd, [self.get_buffer()])
        else:
            n, ancillary, _, _ = self._sock.recvmsg_into([self.get_buffer()], socket.CMSG_SPACE(16 * 4))
            for level, kind, data in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    self.fds.extend(array.array("i", data[:len(data) - len(data) % 4]))
        if n:
            self.buffer_updated(n)
        return n

    def take(self) -> Frame | None:
        """The next whole frame; None while it is incomplete. ValueError: not a frame."""
        if self._body is not None:
            if self._filled < len(self._body):
                return None
            header, body = self._header, self._body
            self._header, self._body, self._filled = None, None, 0
            assert header is not None
            return (header, *unpack_body(header, body))  # type: ignore[arg-type]  # bytes-like
        if len(self.buf) < LEN.size:
            return None
        (n,) = LEN.unpack_from(self.buf)
        if n > MAX_HEADER:
            raise ValueError(f"worker header of {n} bytes")
        start = LEN.size + n
        if len(self.buf) < start:
            return None
        header = parse_header(bytes(self.buf[LEN.size:start]))
        size = body_size(header)
        if len(self.buf) >= start + size:
            with memoryview(self.buf) as view:
                body = bytes(view[start:start + size])
            del self.buf[:start + size]
            return (header, *unpack_body(header, body))
        if size > SCRATCH:  # the rest of the body comes straight into its own buffer
            self._header, self._body = header, bytearray(size)
            self._filled = len(self.buf) - start
            self._body[:self._filled] = memoryview(self.buf)[start:]
            self.buf.clear()
        return None


def write_all(fd: int, parts: Sequence[Any]) -> None:
    """Write ``parts`` (bytes-like) to a blocking ``fd`` with ``writev``, resuming after a short write."""
    views = [memoryview(p).cast("B") for p in parts if len(p)]
    while views:
        n = os.writev(fd, views[:1024])
        while views and n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        if n:
            views[0] = views[0][n:]
