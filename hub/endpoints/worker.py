"""A worker process: load one verified bundle with the shared runner, then score batches from the gateway.

Started by the gateway as ``python -m hub.endpoints.worker --fd N ...`` inside the sandbox
(modules/sandbox.py: no hub files, no hub environment), with one end of a socket pair; it announces
``Ready`` only after the bundle's health check passed, then answers each ``Run`` with ``Results``
(wire.py), carrying the requests it sampled for data collection: the gateway writes them, since a
worker cannot reach the hub's database. The gateway already checked the bundle's signature; a
closed socket ends the worker.
"""

from __future__ import annotations

import argparse
import logging
import mmap
import os
import socket
import sys
import traceback
from pathlib import Path

import msgspec
import numpy as np

from hub.endpoints import wire
from hub.endpoints.codec import JSON, NPY, dumps, read_manifest
from hub.endpoints.collect import Sampler
from modules.bundle import FILES_DIR
from modules.httpwire import error_status, keep_large_buffers
from modules.runners import InputError, Runner, health_check, load_runner, load_sample, observed_specs
from modules.tensors import Decoded, Form, decode, encode, for_runner, outputs_json
from protocol.manifest import Manifest, TensorSpec

log = logging.getLogger("edgefleet.endpoint.worker")

Item = wire.Item
Result = wire.Result


def batchable(manifest: Manifest) -> bool:
    """Requests can be stacked when every input has a free first (batch) dimension."""
    return bool(manifest.inputs) and all(s.shape and s.shape[0] is None for s in manifest.inputs)


def error(status: int, detail: str, request_id: str, v2: bool = False) -> Result:
    doc = {"error": detail, "id": request_id} if v2 else {"detail": detail, "request_id": request_id}
    return status, dumps(doc), JSON, -1


class Scorer:
    """Parses, batches, runs and encodes; the part of a worker that tests can drive without a socket.

    Decoding, validation and encoding are ``modules.tensors``'s, the same as on a device.
    """

    def __init__(self, runner: Runner, manifest: Manifest, label: str, sampler: Sampler | None = None,
                 arena: memoryview | None = None) -> None:
        self.runner, self.manifest, self.label = runner, manifest, label
        self.arena = arena  # the gateway's request bodies, mapped read-only (arena.py)
        self.specs = manifest.inputs or runner.inputs
        self.outputs = manifest.outputs or runner.outputs
        self.batchable = batchable(manifest)
        self.sampler = sampler
        self.samples: list[tuple[str, str]] = []  # (inputs, outputs) JSON since the last frame: the gateway stores them

    def parse(self, item: Item) -> Decoded:
        _, ctype, body, input_name, want_npy, kind, hlen, at, size = item
        if at >= 0:  # the body is in the arena: decoded where the gateway received it
            if self.arena is None or at + size > len(self.arena):
                raise InputError(f"body at {at}+{size} is outside the request arena")
            body = self.arena[at:at + size]
        form = Form(kind, ctype or JSON, NPY if want_npy else "", hlen, input_name)
        return decode(form, body, self.specs, self.outputs)

    def encode(self, item: Item, dec: Decoded, outputs: dict[str, np.ndarray]) -> Result:
        ctype, hlen, body = encode(dec, outputs, self.manifest.name, self.manifest.version, item[0])
        return 200, body, ctype, hlen

    def run(self, items: list[Item]) -> list[Result]:
        results: list[Result | None] = [None] * len(items)
        decoded: dict[int, Decoded] = {}
        for i, item in enumerate(items):
            try:
                decoded[i] = self.parse(item)
            except InputError as exc:
                results[i] = error(error_status(exc), str(exc), item[0], item[5] == "v2")
        parsed = {i: for_runner(self.runner, d.inputs) for i, d in decoded.items()}
        outputs: dict[int, dict[str, np.ndarray]] = {}
        if self.batchable and len(parsed) > 1:
            outputs = self._batched(parsed)
        for i, inputs in parsed.items():
            if i in outputs:
                continue
            try:
                outputs[i] = self.runner.predict(inputs)
            except Exception as exc:  # the model's own failure: this request gets a 500, the worker lives on
                log.error("request %s: model raised %r\n%s", items[i][0], exc, traceback.format_exc())
                results[i] = error(500, f"the model failed on this request ({type(exc).__name__}); request id "
                                        f"{items[i][0]}", items[i][0], items[i][5] == "v2")
        for i, out in outputs.items():
            try:
                results[i] = self.encode(items[i], decoded[i], out)
            except InputError as exc:  # an output that cannot be given in the form asked for
                results[i] = error(error_status(exc), str(exc), items[i][0], items[i][5] == "v2")
                continue
            if self.sampler is not None and self.sampler.take():
                self.samples.append((dumps(outputs_json(parsed[i])).decode(), dumps(outputs_json(out)).decode(),
                                     items[i][0]))
        return results  # type: ignore[return-value]

    def _batched(self, parsed: dict[int, dict[str, np.ndarray]]) -> dict[int, dict[str, np.ndarray]]:
        """One model call for all requests; {} (run them one by one) if they do not stack or the call fails."""
        order = list(parsed)
        first = self.specs[0].name
        rows = [parsed[i][first].shape[0] for i in order]
        total = sum(rows)
        try:
            stacked = {s.name: np.concatenate([parsed[i][s.name] for i in order]) for s in self.specs}
            out = self.runner.predict(stacked)
        except Exception:  # shapes that do not stack, or one bad request: isolate it by running each alone
            return {}
        if any(v.ndim == 0 or v.shape[0] != total for v in out.values()):
            self.batchable = False  # outputs not per row: this model cannot be batched after all
            return {}
        bounds = np.cumsum(rows)[:-1]
        parts = {k: np.split(v, bounds) for k, v in out.items()}
        return {i: {k: parts[k][n] for k in parts} for n, i in enumerate(order)}


def load(bundle_dir: Path, threads: int) -> tuple[Runner, Manifest, list[TensorSpec]]:
    """The runner, its manifest, and its outputs: declared, else as its health check saw them (an undeclared
    postprocess), so the endpoint describes what it really returns."""
    manifest = read_manifest(bundle_dir)
    files = bundle_dir / FILES_DIR
    # the thread count asked for (ONNX Runtime, LiteRT: modules/accel.py), the entry script kept around the model
    runner = load_runner(files, manifest, {"threads": threads} if threads != 1 and manifest.runtime != "python" else None)
    seen = health_check(runner, load_sample(files, manifest))
    return runner, manifest, list(manifest.outputs or runner.outputs) or observed_specs(seen)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hub.endpoints.worker")
    p.add_argument("--fd", type=int, required=True)
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--label", required=True)
    p.add_argument("--endpoint", default="")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--collect", action="store_true", help="sample requests for data collection")
    p.add_argument("--collect-rate-ppm", type=int, default=-1)
    p.add_argument("--arena-fd", type=int, default=-1, help="the gateway's request bodies, read-only (arena.py)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=f"worker {args.label} %(levelname)s: %(message)s")
    keep_large_buffers()
    sock = socket.socket(fileno=args.fd)
    try:
        runner, manifest, outputs = load(args.bundle, args.threads)
    except Exception as exc:  # a model that does not load or fails its health check: say why, then stop
        sock.sendall(wire.encode(wire.Fail(f"{type(exc).__name__}: {exc}"[:wire.MAX_TEXT])))
        return 1
    rate = manifest.collect_rate_ppm if args.collect_rate_ppm < 0 else args.collect_rate_ppm
    arena = None
    if args.arena_fd >= 0:
        arena = memoryview(mmap.mmap(args.arena_fd, 0, mmap.MAP_SHARED, mmap.PROT_READ))
        os.close(args.arena_fd)
    scorer = Scorer(runner, manifest, args.label, Sampler(rate) if args.collect and rate > 0 else None, arena)
    sock.sendall(wire.encode(wire.Ready(os.getpid(), scorer.batchable, list(scorer.specs), outputs)))
    decoder = msgspec.msgpack.Decoder(wire.RunView)  # bodies are views of the received frame
    try:
        while (msg := wire.recv(sock, decoder)) is not None:
            results = scorer.run(msg.items)
            samples, scorer.samples = scorer.samples, []
            sock.sendall(wire.encode(wire.Results(msg.batch, results, samples)))
    except (ConnectionError, OSError):
        pass  # the gateway went away
    return 0


if __name__ == "__main__":
    sys.exit(main())
