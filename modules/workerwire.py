"""The frames between the agent and a module worker: pure packing and unpacking, no I/O.

A frame is a 4-byte big-endian header length, a JSON header, the raw bytes of each array the header
lists (``{"name", "dtype", "shape", "nbytes"}``), then ``blob`` opaque bytes (JSON). Arrays travel as
raw buffers, never pickled, so a misbehaving module cannot make the agent unpickle anything. Nothing
here loads NumPy at import time, and a frame with no arrays (the agent's ``predict_json``) is packed
and unpacked without it. Like ``modules.httpwire``, it lives here so that both ends import it: the
agent (``agent.workerproc``) and the worker (``agent/worker.py``, run by path without the agent package).
"""

from __future__ import annotations

import json
import struct
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from modules.runners import Batch

LEN = struct.Struct(">I")
MAX_HEADER = 16 * 2**20


def pack_parts(header: dict[str, Any], arrays: Batch | None = None, *blobs: Any) -> list[Any]:
    """One frame as buffers to write in order (``os.writev``): the length and header, each array's bytes (views
    of C-contiguous arrays, not copies), the blobs (bytes-like, counted as one blob)."""
    parts: list[Any] = []
    descs = []
    for name, a in (arrays or {}).items():
        if a.dtype.kind in "OUS":
            raise ValueError(f"array {name!r} has dtype {a.dtype}: only numeric and bool tensors cross the worker pipe")
        descs.append({"name": name, "dtype": a.dtype.str, "shape": list(a.shape), "nbytes": a.nbytes})
        parts.append(memoryview(a.reshape(-1) if a.flags.c_contiguous else a.ravel()).cast("B"))  # C order
    head = json.dumps({**header, "arrays": descs, "blob": sum(len(b) for b in blobs)}).encode()
    return [LEN.pack(len(head)) + head, *parts, *blobs]


def pack(header: dict[str, Any], arrays: Batch | None = None, blob: bytes = b"") -> bytes:
    """One frame: header (with the arrays' descriptions and the blob's size added), the arrays' bytes, the blob."""
    return b"".join(pack_parts(header, arrays, blob))


def parse_header(raw: bytes) -> dict[str, Any]:
    header = json.loads(raw)
    if not isinstance(header, dict):
        raise ValueError("worker frame header is not an object")
    return header


def body_size(header: dict[str, Any]) -> int:
    return sum(int(d["nbytes"]) for d in header.get("arrays", [])) + int(header.get("blob", 0))


def unpack_body(header: dict[str, Any], body: bytes) -> tuple[Batch, bytes]:
    """A frame body's arrays and blob."""
    descs = header.get("arrays", [])
    offset = sum(int(d["nbytes"]) for d in descs)
    return (_arrays(descs, body) if descs else {}), body if offset == 0 else bytes(body[offset:])


def take_frame(buf: bytearray) -> tuple[dict[str, Any], Batch, bytes] | None:
    """The first whole frame in ``buf``, removed from it; None while it is incomplete. ValueError: not a frame."""
    if len(buf) < LEN.size:
        return None
    (n,) = LEN.unpack_from(buf)
    if n > MAX_HEADER:
        raise ValueError(f"worker header of {n} bytes")
    start = LEN.size + n
    if len(buf) < start:
        return None
    header = parse_header(bytes(buf[LEN.size:start]))
    end = start + body_size(header)
    if len(buf) < end:
        return None  # parsed again when more comes: headers are small, bodies come in few reads
    with memoryview(buf) as view:  # one copy of the body, not two (a slice, then bytes of it)
        body = bytes(view[start:end])
    del buf[:end]
    return (header, *unpack_body(header, body))


def _arrays(descs: list[dict[str, Any]], body: bytes) -> Batch:
    import numpy as np  # only a frame that carries arrays needs it: the agent's JSON requests never do

    out: Batch = {}
    offset = 0
    for d in descs:
        n = int(d["nbytes"])
        dtype = np.dtype(d["dtype"])
        out[d["name"]] = np.frombuffer(body, dtype=dtype, count=n // dtype.itemsize, offset=offset).reshape(d["shape"])
        offset += n
    return out
