"""The module worker: one child process per running module, serving predict and health checks over a socket.

``python agent/worker.py`` reads framed requests on stdin and answers on stdout; the agent makes
both one end of a socketpair (``agent.supervisor``), a bare script run works on pipes. A frame is
a 4-byte big-endian header length, a JSON header, the raw bytes of each array the header
lists (``{"name", "dtype", "shape", "nbytes"}``), then ``blob`` opaque bytes (JSON). Arrays
travel as raw buffers, never pickled, so a misbehaving module cannot make the agent unpickle anything.

Requests: ``load`` (first; ``files``, ``manifest``, ``limits``), ``predict_json`` (blob: a JSON
body ``{"inputs": {...}}``; answer blob: the outputs object as JSON), ``predict`` (arrays in and
out), ``health`` (run the bundle's sample). Answers: ``{"ok": true, ...}`` or ``{"ok": false,
"kind": "body"|"input"|"model", "error": text}``. The worker exits on stdin EOF, and on Linux also
when the agent dies (PR_SET_PDEATHSIG), so a kill -9 of the agent leaves no orphan.

The agent imports this file for the framing: nothing here loads NumPy at import time, and a frame
with no arrays (the agent's ``predict_json``) is packed and unpacked without it.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import signal
import struct
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

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


def _read_exact(f: BinaryIO, n: int) -> bytes | None:
    data = f.read(n)
    return data if data is not None and len(data) == n else None


def _read_frame(f: BinaryIO) -> tuple[dict[str, Any], Batch, bytes] | None:
    raw = _read_exact(f, _LEN.size)
    if raw is None:
        return None
    (n,) = _LEN.unpack(raw)
    head = _read_exact(f, n) if n <= MAX_HEADER else None
    if head is None:
        return None
    header = parse_header(head)
    body = _read_exact(f, body_size(header)) if body_size(header) else b""
    return (header, *unpack_body(header, body)) if body is not None else None


def apply_limits(limits: dict[str, Any]) -> None:
    """Address-space and CPU-time caps for this process, where the OS supports them."""
    mem_mb, cpu_s = int(limits.get("memory_mb") or 0), int(limits.get("cpu_seconds") or 0)
    if mem_mb > 0 and hasattr(resource, "RLIMIT_AS"):
        resource.setrlimit(resource.RLIMIT_AS, (mem_mb * 2**20, mem_mb * 2**20))
    if cpu_s > 0 and hasattr(resource, "RLIMIT_CPU"):
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s))


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except OSError:
            pass  # best effort: stdin EOF still ends the worker


def serve(inp: BinaryIO, out: BinaryIO) -> None:
    """The worker loop; returns on EOF."""
    from modules.runners import BodyError, InputError, health_check, load_runner, load_sample, predict_json
    from protocol.manifest import Manifest
    from protocol.schema import validate

    runner: Any = None
    files = Path(".")
    manifest: Manifest | None = None

    def reply(header: dict[str, Any], arrays: Batch | None = None, blob: bytes = b"") -> None:
        out.write(pack(header, arrays, blob))
        out.flush()

    while (frame := _read_frame(inp)) is not None:
        header, arrays, blob = frame
        op = header.get("op")
        try:
            if op == "load":
                files, manifest = Path(header["files"]), validate(Manifest, header["manifest"])
                apply_limits(header.get("limits") or {})
                runner = load_runner(files, manifest)
                reply({"ok": True, "pid": os.getpid(),
                       "inputs": [s.to_dict() for s in runner.inputs],
                       "outputs": [s.to_dict() for s in runner.outputs]})
            elif op == "predict_json":
                reply({"ok": True}, blob=predict_json(runner, blob))
            elif op == "predict":
                reply({"ok": True}, runner.predict(arrays))
            elif op == "health":
                assert manifest is not None
                health_check(runner, load_sample(files, manifest))
                reply({"ok": True})
            else:
                reply({"ok": False, "kind": "model", "error": f"unknown worker op {op!r}"})
        except BodyError as exc:
            reply({"ok": False, "kind": "body", "error": str(exc)})
        except InputError as exc:
            reply({"ok": False, "kind": "input", "error": str(exc)})
        except MemoryError:
            reply({"ok": False, "kind": "model", "error": "out of memory (module memory limit)"})
        except Exception as exc:  # the module's failure is the caller's answer; the worker keeps serving
            reply({"ok": False, "kind": "model", "error": str(exc) or repr(exc)})


def main() -> int:
    _die_with_parent()
    # Run as a script, sys.path[0] is agent/: drop it so a module's imports cannot pick up agent internals.
    here = str(Path(__file__).resolve().parent)
    sys.path[:] = [p for p in sys.path if str(Path(p or ".").resolve()) != here]
    # The protocol owns stdout: point fd 1 at stderr so a module's print() cannot corrupt a frame.
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the agent stops its workers itself (Ctrl-C hits the group)
    serve(sys.stdin.buffer, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
