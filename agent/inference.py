"""The inference front: the modules serving now, inference through them, its stats and data sampling.

Every way in lands here: the local API (``agent.localapi``), MQTT ``infer`` commands, the synthetic
workload, and the stats a worker pushes for what it answered on its direct socket. Each inference is
counted once (in ``ModuleStats``, and for a version on probation in its ``BakeWatch``), and sampled
at the module's data-collection rate into records the reporter sends.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from agent.stats import ModuleStats
from agent.supervisor import ModuleWorker, Reply
from modules.errors import InputError
from protocol.encoding import ProtocolError
from protocol.messages import Command, CommandReply, DataRecord, Label
from protocol.schema import validate

if TYPE_CHECKING:  # both load NumPy: the runners only with in-process isolation, the workload only when asked for
    from agent.bake import BakeWatch
    from agent.shadow import Shadow
    from agent.workload import Workload
    from modules.runners import Batch, Runner

log = logging.getLogger("edgefleet.agent")

Answered = Callable[[bytes | None, Exception | None], None]
MAX_PENDING_LABELS = 10_000


@dataclass
class ActiveModule:
    """A committed module version, loaded and serving."""

    name: str
    bundle: str
    version: int
    runner: Runner | ModuleWorker
    collect_rate_ppm: int
    stats: ModuleStats = field(default_factory=ModuleStats)
    task: asyncio.Task[None] | None = None
    bake: BakeWatch | None = None  # set while this version is on probation
    config: str = ""  # the digest of the configuration it was loaded with ("" none)


class InferenceFront:
    """The serving modules of one device (``active``) and every inference through them."""

    def __init__(self, device_id: str, clock: Callable[[], float], rejected: Counter[str],
                 workload: Workload | None = None) -> None:
        self.device_id, self.clock, self.rejected = device_id, clock, rejected
        self.workload = workload  # replaceable while running: the workload loops read it on every batch
        self.active: dict[str, ActiveModule] = {}
        self.inferences = 0  # lifetime, across module versions
        self.data: list[DataRecord] = []  # sampled records, taken by the reporter's telemetry flush
        self.labels: list[Label] = []  # ground truth from applications, sent with the next data batch
        self.shadows: dict[str, Shadow] = {}  # module name -> its candidate under shadow evaluation (agent/shadow.py)
        self._rng = random.Random(workload.seed if workload else None)  # which inferences are sampled

    async def infer(self, active: ActiveModule, batch: Batch) -> Batch:
        """Run one batch of arrays through ``active`` (its worker, or in process), counting and sampling it."""
        t0 = time.perf_counter()
        ok = False
        self.inferences += 1
        try:
            if isinstance(active.runner, ModuleWorker):
                out = await active.runner.predict(batch)
            else:
                out = active.runner.predict(batch)
            ok = True
        finally:
            ms = (time.perf_counter() - t0) * 1000.0
            active.stats.record(ms, ok)
            if active.bake is not None:
                active.bake.record(ok)
        if self.shadows and (shadow := self.shadows.get(active.name)) is not None:
            shadow.offer("batch", batch, out, ms, active.version)  # queued or dropped: never waits
        if self._sampled(active):
            self._collect(active, {k: v.tolist() for k, v in batch.items()}, {k: v.tolist() for k, v in out.items()})
        return out

    async def infer_json(self, active: ActiveModule, body: bytes) -> bytes:
        """Run a JSON request ``{"inputs": {...}}`` through ``active``; the outputs object as JSON.

        With process isolation the body goes to the worker as it is: the worker parses it, checks it
        against the signature and runs it, so the agent never builds an array. A body that is not
        JSON (BodyError) or does not fit the signature (InputError) never reached the model: not counted.
        """
        t0 = time.perf_counter()
        try:
            if isinstance(active.runner, ModuleWorker):
                out = await active.runner.predict_json(body)
            else:
                from modules.runners import predict_json  # in-process isolation: the runner's NumPy is here anyway

                out = predict_json(active.runner, body)
        except Exception as exc:
            self._inferred(active, body, t0, None, exc)
            raise
        self._inferred(active, body, t0, out, None)
        return out

    def infer_json_now(self, active: ActiveModule, body: bytes, done: Answered) -> bool:
        """:meth:`infer_json` with a callback and no task, when ``active``'s worker is serving; else False.

        The local API's fast path: the answer is written from the callback that reads the worker's
        frame, two event-loop turns per request instead of four.
        """
        if not isinstance(active.runner, ModuleWorker):
            return False
        t0 = time.perf_counter()

        def answered(out: bytes | None, exc: Exception | None) -> None:
            try:
                self._inferred(active, body, t0, out, exc)
            except Exception:  # a sampled body the agent cannot re-read: the caller still gets its answer
                log.exception("%s: recording an inference of %s failed", self.device_id, active.name)
            done(out, exc)

        return active.runner.predict_json_now(body, answered)

    async def infer_form(self, active: ActiveModule, form: dict[str, Any], body: bytes) -> Reply:
        """A request in any other form (``.npy``, OIP v2; ``modules.tensors``): the answer's content type,
        OIP header length and body. Decoded, checked and run in the worker, as JSON requests are."""
        t0, sample = time.perf_counter(), self._sampled(active)
        try:
            if isinstance(active.runner, ModuleWorker):
                reply = await active.runner.infer(form, body, sample)
            else:
                from modules.tensors import serve  # in-process isolation: the runner's NumPy is here anyway

                reply = serve(active.runner, form, body, active.name, active.version, sample)
        except Exception as exc:
            self._counted(active, t0, exc)
            raise
        self._formed(active, t0, reply)
        return reply

    def infer_form_now(self, active: ActiveModule, form: dict[str, Any], body: bytes,
                       done: Callable[[Reply | None, Exception | None], None]) -> bool:
        """:meth:`infer_form` with a callback and no task, when ``active``'s worker is serving; else False."""
        if not isinstance(active.runner, ModuleWorker):
            return False
        t0 = time.perf_counter()

        def answered(reply: Reply | None, exc: Exception | None) -> None:
            try:
                if reply is not None:
                    self._formed(active, t0, reply)
                else:
                    self._counted(active, t0, exc)
            except Exception:
                log.exception("%s: recording an inference of %s failed", self.device_id, active.name)
            done(reply, exc)

        return active.runner.infer_now(form, body, self._sampled(active), answered)

    def _formed(self, active: ActiveModule, t0: float, reply: Reply) -> None:
        self._counted(active, t0, None)
        if reply[3]:  # sampled: the worker wrote the inputs and outputs as a data record
            record = json.loads(reply[3])
            self._collect(active, record.get("input"), record.get("output"))

    def _counted(self, active: ActiveModule, t0: float, exc: Exception | None) -> float:
        """One inference counted (not a request refused before the model); its latency in ms."""
        ms = (time.perf_counter() - t0) * 1000.0
        if not isinstance(exc, InputError):
            self.inferences += 1
            active.stats.record(ms, exc is None)
            if active.bake is not None:
                active.bake.record(exc is None)
        return ms

    def _inferred(self, active: ActiveModule, body: bytes, t0: float, out: bytes | None, exc: Exception | None) -> None:
        """Count one JSON inference (not a request rejected before the model), offer it to the module's shadow
        candidate, and sample it for collection."""
        ms = self._counted(active, t0, exc)
        if out is not None and self.shadows and (shadow := self.shadows.get(active.name)) is not None:
            shadow.offer("json", body, out, ms, active.version)
        if out is not None and self._sampled(active):  # parsed again only when sampled
            doc = json.loads(body)
            rid = doc.get("id") if isinstance(doc, dict) else None  # the caller's request id: its label joins on it
            self._collect(active, doc.get("inputs") if isinstance(doc, dict) else doc, json.loads(out),
                          rid if isinstance(rid, str) and 0 < len(rid) <= 64 else "")

    def direct_stats(self, active: ActiveModule, header: dict[str, Any], blob: bytes) -> None:
        """A worker's report of the inferences it answered on its direct socket: counted and sampled as ours are."""
        count, errors = int(header.get("count", 0)), int(header.get("errors", 0))
        self.inferences += count
        active.stats.add(count, errors, float(header.get("latency_ms_sum", 0.0)),
                         [float(v) for v in header.get("latencies_ms", [])])
        if active.bake is not None and count:  # direct callers' errors count against a version on probation too
            active.bake.add(count, errors)
        if header.get("rejected"):
            self.rejected["direct_api"] += int(header["rejected"])
        if header.get("samples_dropped"):
            log.warning("%s: module %s dropped %d samples (over its pending bound)", self.device_id, active.name,
                        header["samples_dropped"])
        shadow = self.shadows.get(active.name) if self.shadows else None
        for record in json.loads(blob) if blob else []:  # already sampled by the worker at the module's rate
            self._collect(active, record.get("input"), record.get("output"))
            if shadow is not None:  # the direct socket's inferences reach a shadow through these samples only
                shadow.offer("json", json.dumps({"inputs": record.get("input")}).encode(),
                             json.dumps(record.get("output")).encode(), -1.0, active.version)

    @staticmethod
    def set_collect_rate(active: ActiveModule, ppm: int) -> None:
        active.collect_rate_ppm = ppm
        if isinstance(active.runner, ModuleWorker):
            active.runner.set_collect_rate(ppm)

    def _sampled(self, active: ActiveModule) -> bool:
        return bool(active.collect_rate_ppm) and self._rng.random() * 1_000_000 < active.collect_rate_ppm

    def _collect(self, active: ActiveModule, inputs: Any, outputs: Any, rid: str = "") -> None:
        self.data.append(DataRecord(ts=self.clock(), module=active.name, version=active.version, input=inputs,
                                    output=outputs, id=rid))

    def add_labels(self, body: bytes) -> int:
        """``{"labels": [{"id": ..., "label": ...}]}`` from an application: checked, queued for the next data batch."""
        try:
            doc = json.loads(body)
            items = [validate(Label, {"ts": self.clock()} | i) for i in doc["labels"]]
        except (ValueError, TypeError, KeyError, ProtocolError) as exc:
            raise ValueError(f"want {{\"labels\": [{{\"id\": str, \"label\": value}}]}}: {exc}") from None
        if len(self.labels) + len(items) > MAX_PENDING_LABELS:
            raise ValueError(f"more than {MAX_PENDING_LABELS} labels waiting to be sent")
        self.labels += items
        return len(items)

    def take_data(self, limit: int) -> list[DataRecord]:
        """Up to ``limit`` sampled records, oldest first, removed from the front."""
        records, self.data = self.data[:limit], self.data[limit:]
        return records

    async def workload_loop(self, active: ActiveModule) -> None:
        """The synthetic load (``--rate``): batches from ``self.workload`` through ``active`` at its rate."""
        assert self.workload is not None
        loop = asyncio.get_running_loop()
        period = 1.0 / self.workload.rate
        rng = self.workload.rng(active.name)
        next_t = loop.time() + random.uniform(0, period)  # spread many agents across the period
        while True:
            await asyncio.sleep(max(0.0, next_t - loop.time()))
            next_t = max(next_t + period, loop.time() - 1.0)  # after a stall, catch up at most one second
            batch = self.workload.make_inputs(rng, active.runner.inputs)
            with contextlib.suppress(Exception):  # counted as an error in stats; the workload goes on
                await self.infer(active, batch)

    async def command(self, cmd: Command, revision: int) -> CommandReply:
        """An MQTT command (``ping``, ``infer``) answered: the hub side's way to the modules."""
        if cmd.name == "ping":
            return CommandReply(id=cmd.id, ok=True, result={"pong": True, "ts": self.clock(), "revision": revision})
        if cmd.name == "infer":
            name = cmd.args.get("module")
            active = self.active.get(name) if isinstance(name, str) else None
            if active is None:
                return CommandReply(id=cmd.id, ok=False, error=f"module {name!r} is not running here")
            try:
                out = await self.infer_json(active, json.dumps({"inputs": cmd.args.get("inputs", {})}).encode())
            except Exception as exc:  # the caller gets the reason; the agent keeps serving
                return CommandReply(id=cmd.id, ok=False, error=str(exc) or repr(exc))
            return CommandReply(id=cmd.id, ok=True, result={
                "module": active.name, "version": active.version, "outputs": json.loads(out)})
        return CommandReply(id=cmd.id, ok=False, error=f"unknown command {cmd.name!r}: this agent knows ping, infer")
