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

_LEN = struct.Struct(">I")
MAX_HEADER = 16 * 2**20


def pack(header: dict[str, Any], arrays: Batch | None = None, blob: bytes = b"") -> bytes:
    """One frame: header (with the arrays' descriptions and the blob's size added), the arrays' bytes, the blob."""
    bufs = []
    descs = []
    for name, a in (arrays or {}).items():
        if a.dtype.kind in "OUS":
            raise ValueError(f"array {name!r} has dtype {a.dtype}: only numeric and bool tensors cross the worker pipe")
        descs.append({"name": name, "dtype": a.dtype.str, "shape": list(a.shape), "nbytes": a.nbytes})
        bufs.append(a.tobytes())  # C order, whatever the array's layout
    head = json.dumps({**header, "arrays": descs, "blob": len(blob)}).encode()
    return b"".join([_LEN.pack(len(head)), head, *bufs, blob])


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
    return (_arrays(descs, body) if descs else {}), body[offset:]


def take_frame(buf: bytearray) -> tuple[dict[str, Any], Batch, bytes] | None:
    """The first whole frame in ``buf``, removed from it; None while it is incomplete. ValueError: not a frame."""
    if len(buf) < _LEN.size:
        return None
    (n,) = _LEN.unpack_from(buf)
    if n > MAX_HEADER:
        raise ValueError(f"worker header of {n} bytes")
    start = _LEN.size + n
    if len(buf) < start:
        return None
    header = parse_header(bytes(buf[_LEN.size:start]))
    end = start + body_size(header)
    if len(buf) < end:
        return None  # parsed again when more comes: headers are small, bodies come in few reads
    body = bytes(buf[start:end])
    del buf[:end]
    return (header, *unpack_body(header, body))


def _arrays(descs: list[dict[str, Any]], body: bytes) -> Batch:
    import numpy as np  # only a frame that carries arrays needs it: the agent's JSON requests never do

    out: Batch = {}
    offset = 0
    for d in descs:
        n = int(d["nbytes"])
        out[d["name"]] = np.frombuffer(body[offset:offset + n], dtype=np.dtype(d["dtype"])).reshape(d["shape"])
        offset += n
    return out
