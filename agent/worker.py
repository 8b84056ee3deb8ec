"""The module worker: one child process per running module, serving predict and health checks over a socket.

``python agent/worker.py`` reads framed requests (``modules.workerwire``) on stdin and answers on
stdout; the agent makes both one end of a socketpair (``agent.workerproc``), a bare script run works
on pipes.

Requests: ``load`` (first; ``files``, ``manifest``, ``limits``), ``predict_json`` (blob: a JSON
body ``{"inputs": {...}}``; answer blob: the outputs object as JSON), ``infer`` (``form``: how to read
the blob, ``.npy`` or OIP v2, ``modules.tensors``; answer ``ctype``, ``hlen``, ``body``: the answer's
length in the blob, a sampled record's JSON after it), ``predict`` (arrays), ``health``, ``listen``
(serve the direct socket, :class:`DirectSocket`), ``collect`` (its sampling rate), ``drain`` (stop
listening). Answers: ``{"ok": true, ...}`` or ``{"ok": false, "kind": "body"|"accept"|"input"|"model", "error": text}``. Unasked, the worker sends ``{"push": "stats"}``
frames: the direct socket's inferences, for the agent's telemetry. The worker exits on stdin EOF, and on Linux also
when the agent dies (PR_SET_PDEATHSIG), so a kill -9 of the agent leaves no orphan.

One selector loop serves the agent's socket and the direct socket's clients, one request at a time (no NumPy at import).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import selectors
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from modules import httpwire, oip
from modules.errors import failure, from_kind
from modules.framebuf import FrameReader, write_all
from modules.httpwire import Answer, BadRequest, RequestReader, encode_answer, json_answer, predict_target, predicted
from modules.shmregions import Regions
from modules.workerenv import apply_limits, die_with_parent, shm_op
from modules.workerwire import pack_parts

if TYPE_CHECKING:
    from modules.runners import Batch

# a request in any form (its form, body, whether to sample it) -> content type, OIP header length, body, sample JSON
Infer = Callable[[dict[str, Any], bytes, bool], tuple[str, int, bytes, bytes]]

PUSH_EVERY = 1.0  # seconds at most between a direct-socket inference and its stats reaching the agent
MAX_PENDING_LATENCIES = 100_000
MAX_PENDING_SAMPLES = 1000
SHM_ROUTES = "/v2/systemsharedmemory/"  # the agent's only (agent/shmem.py)


class DirectSocket:
    """The module's own predict route on a Unix socket (``DATA/run/<module>.sock``), answered in this process.

    HTTP/1.1 keep-alive with the agent's parsing and answers (``modules.httpwire``), so an application
    gets the same outputs, status codes and messages as from the agent's TCP API, without the agent's
    loop on the path. An OIP v2 request may name the shared memory regions its uid (SO_PEERCRED) registered on
    the agent's Unix socket (the agent passes them here: ``shm_attach``). Inferences are counted, timed and
    sampled here and pushed to the agent as a ``stats`` frame at most every ``push_every`` seconds (and on
    drain), so telemetry counts them once.
    """

    def __init__(self, sel: selectors.BaseSelector, predict: Callable[[bytes], bytes], header: dict[str, Any],
                 infer: Infer, served: httpwire.Served) -> None:
        self.sel, self.predict, self.infer, self.served = sel, predict, infer, served
        self.path = Path(header["path"])
        self.name, self.version = str(header["name"]), int(header["version"])
        self.ppm, self.push_every = int(header.get("ppm", 0)), float(header.get("push_every", PUSH_EVERY))
        self._rng = random.Random()
        # Bound under a temporary name, then renamed over the old one: a client connecting by the name
        # reaches the previous worker or this one, never a missing file.
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(tmp))
            os.chmod(tmp, 0o660)
            sock.listen(64)
            sock.setblocking(False)
            os.rename(tmp, self.path)
            self.ino = os.stat(self.path).st_ino
        except BaseException:
            sock.close()
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        self.sock = sock
        self.clients: dict[socket.socket, _Client] = {}
        sel.register(sock, selectors.EVENT_READ, self._accept)
        self._reset()

    def _reset(self) -> None:
        self.count = self.errors = self.rejected = self.dropped = 0
        self.latency_sum = 0.0
        self.latencies: list[float] = []
        self.samples: list[dict[str, Any]] = []
        self.due: float | None = None  # when the pending stats go to the agent

    def close(self) -> None:
        """Stop listening, drop the clients, and remove the socket file if it is still this worker's."""
        self.sel.unregister(self.sock)
        self.sock.close()
        for client in list(self.clients.values()):
            self._drop(client)
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == self.ino:  # not when a newer worker has renamed its own over it
                os.unlink(self.path)

    # --- stats -------------------------------------------------------------------------------

    def push_in(self) -> float | None:
        return None if self.due is None else max(0.0, self.due - time.monotonic())

    def take_stats(self) -> tuple[dict[str, Any], bytes] | None:
        """The pending stats as a push frame's header and blob (the sampled records as JSON); None if none."""
        if not (self.count or self.rejected):
            return None
        header = {"push": "stats", "count": self.count, "errors": self.errors, "rejected": self.rejected,
                  "latency_ms_sum": self.latency_sum, "latencies_ms": [round(v, 4) for v in self.latencies],
                  "samples_dropped": self.dropped}
        blob = json.dumps(self.samples).encode() if self.samples else b""
        self._reset()
        return header, blob

    def _arm(self) -> None:
        if self.due is None:
            self.due = time.monotonic() + self.push_every

    def _record(self, t0: float, ok: bool) -> None:
        ms = (time.perf_counter() - t0) * 1000.0
        self.count += 1
        self.errors += 0 if ok else 1
        self.latency_sum += ms
        if len(self.latencies) < MAX_PENDING_LATENCIES:
            self.latencies.append(ms)
        self._arm()

    def _sample(self, body: bytes, out: bytes) -> None:
        if len(self.samples) >= MAX_PENDING_SAMPLES:
            self.dropped += 1
            return
        doc = json.loads(body)  # parsed again only when sampled, as the agent does
        self.samples.append({"input": doc.get("inputs") if isinstance(doc, dict) else doc, "output": json.loads(out)})

    # --- HTTP --------------------------------------------------------------------------------

    def answer(self, method: str, path: str, body: bytes, headers: httpwire.Headers, app: str = "") -> Answer:
        """The agent's inference routes for this one module (``agent.localapi.LocalApi.route``); ``app``: the
        client's (``uid:N``), whose shared memory regions registered on the agent's Unix socket it may name."""
        httpwire.check_encoding(headers.get("content-encoding"))  # BadRequest: answered by _serve
        if path.startswith(SHM_ROUTES):
            return json_answer(404, {"error": "register shared memory regions on the agent's socket, "
                                              "DATA/run/api.sock: its regions are usable here by the same uid"})
        route = oip.parse_path(path)
        if route is not None:
            answer = httpwire.oip_answer(method, route, {self.name: self.served}, True, "")
            return answer if answer is not None else self._infer({**httpwire.form_of("v2", headers), "app": app}, body)
        name = predict_target(path)
        if name is None:
            return json_answer(404, {"detail": f"no route {method} {path.split('?', 1)[0]}"})
        if method != "POST":
            return json_answer(405, {"detail": "use POST"})
        if name != self.name:
            return json_answer(404, {"detail": f"module {name!r} is not running here", "modules": [self.name]})
        form = httpwire.form_of("v1", headers)
        if not httpwire.plain_json(form):
            return self._infer(form, body)
        t0 = time.perf_counter()
        try:
            out = self.predict(body)
        except Exception as exc:
            return self._failed(t0, exc, False)
        self._record(t0, True)
        if self.ppm and self._rng.random() * 1_000_000 < self.ppm:
            self._sample(body, out)
        return predicted(self.name, self.version, out, None)

    def _infer(self, form: dict[str, Any], body: bytes) -> Answer:
        """A request in any other form (``.npy``, OIP v2): decoded, run and encoded by ``modules.tensors``."""
        t0 = time.perf_counter()
        sample = bool(self.ppm) and self._rng.random() * 1_000_000 < self.ppm
        try:
            ctype, hlen, out, record = self.infer(form, body, sample)
        except Exception as exc:
            return self._failed(t0, exc, form["kind"] == "v2")
        self._record(t0, True)
        if record:
            if len(self.samples) >= MAX_PENDING_SAMPLES:
                self.dropped += 1
            else:
                self.samples.append(json.loads(record))
        return httpwire.binary_answer(ctype, hlen, out)

    def _failed(self, t0: float, exc: Exception, v2: bool) -> Answer:
        kind, text = failure(exc)
        if kind == "model":  # a body or inputs refused before the model are not inferences
            self._record(t0, False)
        return httpwire.failed(from_kind(kind, text), v2)

    def _accept(self, sock: Any, events: int) -> None:
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return  # the client gave up before we took it
        conn.setblocking(False)
        httpwire.enlarge(conn)
        uid = httpwire.peer_uid(conn)  # the client's app: its uid, as on the agent's Unix socket
        self.clients[conn] = _Client(conn, "" if uid is None else f"uid:{uid}")
        self.sel.register(conn, selectors.EVENT_READ, self._event)

    def _event(self, conn: Any, events: int) -> None:
        client = self.clients.get(conn)
        if client is None:
            return
        if events & selectors.EVENT_WRITE:
            self._write(client, b"")
        else:
            try:
                n = conn.recv_into(client.reader.get_buffer())  # a large body lands in place
            except BlockingIOError:
                return
            except OSError:
                n = 0
            if not n:
                self._drop(client)
                return
            client.reader.buffer_updated(n)
        self._serve(client)

    def _serve(self, client: _Client) -> None:
        """Answer the requests in the client's buffer in order, while its answers are being taken."""
        while not client.out and not client.closing and client.sock.fileno() >= 0:
            try:
                request = client.reader.take()
            except BadRequest as exc:
                self.rejected += 1
                self._arm()
                client.closing = True
                self._write(client, encode_answer(json_answer(exc.status, exc.doc()), False))
                break
            if request is None:
                if client.reader.continue_due():  # its answers so far were all taken (the loop's condition)
                    self._write(client, httpwire.CONTINUE)
                break
            method, path, keep, body, headers = request
            client.closing = not keep
            head = method == "HEAD"  # answered as GET is, without the body
            try:
                answer = self.answer("GET" if head else method, path, body, headers, client.app)
            except BadRequest as exc:  # a header the route refuses (malformed, or Content-Encoding)
                answer = json_answer(exc.status, exc.doc())
            self._write(client, httpwire.encode_head(answer, keep) if head else encode_answer(answer, keep))
        if client.closing and not client.out:
            self._drop(client)

    def _write(self, client: _Client, data: bytes) -> None:
        """Send what the socket takes; the rest waits for it to be writable (and the client's next requests with it)."""
        data = bytes(client.out) + data if client.out else data
        try:
            sent = client.sock.send(data) if data else 0
        except BlockingIOError:
            sent = 0
        except OSError:
            self._drop(client)
            return
        was_waiting = bool(client.out)
        client.out = data[sent:]
        if client.out and not was_waiting:
            self.sel.modify(client.sock, selectors.EVENT_WRITE, self._event)  # a client not reading: stop reading it
        elif not client.out and was_waiting:
            self.sel.modify(client.sock, selectors.EVENT_READ, self._event)

    def _drop(self, client: _Client) -> None:
        if self.clients.pop(client.sock, None) is not None:
            self.sel.unregister(client.sock)
            client.sock.close()


class _Client:
    __slots__ = ("sock", "app", "reader", "out", "closing")

    def __init__(self, sock: socket.socket, app: str) -> None:
        self.sock, self.app = sock, app
        self.reader = RequestReader()
        self.out = b""
        self.closing = False  # answer what is due, then close


class Worker:
    """The worker's loop: the agent's frames on ``inp``, and the module's direct socket once the agent says ``listen``."""

    def __init__(self, inp: BinaryIO, out: BinaryIO) -> None:
        from modules import runners, tensors  # NumPy: only the worker process pays for it

        self.runners, self.tensors = runners, tensors
        self.inp, self.out = inp.fileno(), out
        self.sel = selectors.DefaultSelector()
        self.runner: Any = None
        self.files = Path(".")
        self.manifest: Any = None
        self.direct: DirectSocket | None = None
        self._frames = FrameReader()  # a large request body lands in place
        self.shm = Regions()  # the apps' shared memory regions, mapped (modules/shmregions.py)
        self._open = True

    def run(self) -> None:
        self.sel.register(self.inp, selectors.EVENT_READ, self._from_agent)
        try:
            while self._open:
                for key, events in self.sel.select(self.direct.push_in() if self.direct is not None else None):
                    key.data(key.fileobj, events)
                    if not self._open:
                        break
                if self.direct is not None and self.direct.due is not None and time.monotonic() >= self.direct.due:
                    self.push()
        finally:
            if self.direct is not None:
                self.direct.close()

    def reply(self, header: dict[str, Any], arrays: Batch | None = None, *blobs: bytes) -> None:
        write_all(self.out.fileno(), pack_parts(header, arrays, *blobs))  # writev: the answer's bytes as they are

    def push(self) -> None:
        stats = self.direct.take_stats() if self.direct is not None else None
        if stats is not None:
            self.reply(stats[0], None, stats[1])

    def _from_agent(self, fd: Any, events: int) -> None:
        n = self._frames.fill(self.inp)  # with the descriptors of shared memory regions the agent passes
        if not n:
            self._open = False  # the agent closed its end: exit
            return
        while self._open and (frame := self._frames.take()) is not None:
            self.handle(*frame)

    def handle(self, header: dict[str, Any], arrays: Batch, blob: bytes) -> None:
        from protocol.manifest import Manifest
        from protocol.schema import validate

        op = header.get("op")
        try:
            if op == "load":
                self.files, self.manifest = Path(header["files"]), validate(Manifest, header["manifest"])
                apply_limits(header.get("limits") or {})
                self.runner = self.runners.load_runner(self.files, self.manifest, header.get("config"),
                                                       header.get("facts"))
                self.reply({"ok": True, "pid": os.getpid(), "accelerator": getattr(self.runner, "accelerator", ""),
                            "inputs": [s.to_dict() for s in self.runner.inputs],
                            "outputs": [s.to_dict() for s in self.runner.outputs]})
            elif op == "predict_json":
                self.reply({"ok": True}, None, self.runners.predict_json(self.runner, blob))
            elif op == "infer":  # any other form (.npy, OIP v2): the answer's body is the blob, then the sample's JSON
                ctype, hlen, out, record = self.infer(header["form"], blob, bool(header.get("sample")))
                self.reply({"ok": True, "ctype": ctype, "hlen": hlen, "body": len(out)}, None, out, record)
            elif op == "predict":
                self.reply({"ok": True}, self.runner.predict(arrays))
            elif op == "health":
                assert self.manifest is not None
                self.runners.health_check(self.runner, self.runners.load_sample(self.files, self.manifest))
                self.reply({"ok": True})
            elif op == "listen":  # the version is committed: serve the direct socket
                self._close_direct()
                runner, predict_json = self.runner, self.runners.predict_json
                served = httpwire.Served(self.manifest.version, self.manifest.runtime, self.runner.inputs, self.runner.outputs)
                self.direct = DirectSocket(self.sel, lambda body: predict_json(runner, body), header, self.infer, served)
                self.reply({"ok": True, "ino": self.direct.ino})
            elif op in ("shm_attach", "shm_detach"):
                self.reply(shm_op(self.shm, header, self._frames.fds))
            elif op == "collect":
                if self.direct is not None:
                    self.direct.ppm = int(header["ppm"])
                self.reply({"ok": True})
            elif op == "drain":  # stopping: no more direct clients, the last stats, then the agent closes
                self._close_direct()
                self.reply({"ok": True})
            else:
                self.reply({"ok": False, "kind": "model", "error": f"unknown worker op {op!r}"})
        except Exception as exc:  # the module's failure is the caller's answer; the worker keeps serving
            kind, text = failure(exc)
            self.reply({"ok": False, "kind": kind, "error": text})

    def infer(self, form: dict[str, Any], body: bytes, sample: bool) -> tuple[str, int, bytes, bytes]:
        return self.tensors.serve(self.runner, form, body, self.manifest.name, self.manifest.version, sample,
                                  self.shm.for_app(str(form.get("app", ""))))

    def _close_direct(self) -> None:
        if self.direct is not None:
            self.direct.close()
            self.push()
            self.direct = None


def serve(inp: BinaryIO, out: BinaryIO) -> None:
    """The worker loop; returns on EOF."""
    Worker(inp, out).run()

def main() -> int:
    die_with_parent()
    httpwire.keep_large_buffers()
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
