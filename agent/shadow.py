"""Shadow evaluation: a candidate version beside the live one, fed the live inputs, never served.

The live path only *offers* each answered inference (:meth:`Shadow.offer`): sampled at the
``ShadowSpec``'s rate into a bounded queue, dropped and counted when the queue is full, so the live
answer never waits for the candidate. One consumer task runs the candidate on what is queued (in its
own worker process, or in a thread in process for in-process isolation: ONNX Runtime releases the
GIL), compares its answer with the live one (:func:`compare`) and keeps the interval's figures for
telemetry (:meth:`Shadow.take`, a ``ShadowPoint``). Loaded only when a desired state asks for a shadow.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from agent.stats import ModuleStats
from agent.supervisor import ModuleWorker
from protocol.messages import ShadowPoint, ShadowSpec

if TYPE_CHECKING:
    from modules.runners import Batch, Runner

log = logging.getLogger("edgefleet.agent.shadow")

MAX_CLASSES = 64  # distinct predicted classes counted per interval (the schema's bound)


@dataclass
class Comparison:
    rows: int = 0
    differ: int = 0
    live_classes: Counter[str] = field(default_factory=Counter)
    shadow_classes: Counter[str] = field(default_factory=Counter)


def _rows(a: Any) -> np.ndarray:
    arr = np.asarray(a, dtype=np.float64)
    return arr.reshape(arr.shape[0] if arr.ndim else 1, -1)


def compare(live: dict[str, Any], cand: dict[str, Any], rule: str = "auto", tolerance: float = 0.01) -> Comparison:
    """Row by row, whether the candidate's outputs agree with the live ones (a row differs if any output does).

    ``argmax``: same top class; ``threshold``: same side of 0.5 (one score per row); ``tolerance``: every
    value within ``tolerance``; ``auto``: argmax for more than one column, threshold for one column of
    values in 0..1, else tolerance. An output missing or shaped differently makes every row differ.
    """
    out = Comparison()
    differ: np.ndarray | None = None
    for name, lv in live.items():
        a = _rows(lv)
        rows = a.shape[0]
        b = _rows(cand[name]) if name in cand else None
        if b is None or b.shape != a.shape:
            d = np.ones(rows, dtype=bool)
        else:
            kind = rule
            if kind == "auto":
                kind = "argmax" if a.shape[1] > 1 else ("threshold" if a.size and 0 <= a.min() and a.max() <= 1
                                                         else "tolerance")
            if kind == "argmax":
                la, lb = a.argmax(axis=1), b.argmax(axis=1)
            elif kind == "threshold":
                la, lb = (a[:, 0] >= 0.5).astype(int), (b[:, 0] >= 0.5).astype(int)
            else:
                la = lb = None
                d = np.any(np.abs(a - b) > tolerance, axis=1)
            if la is not None and lb is not None:
                d = la != lb
                if not out.live_classes and not out.shadow_classes:  # the first classifier output's classes
                    out.live_classes.update(str(int(c)) for c in la)
                    out.shadow_classes.update(str(int(c)) for c in lb)
        differ = d if differ is None or differ.shape != d.shape else differ | d
    if differ is not None:
        out.rows, out.differ = int(differ.size), int(differ.sum())
    return out


def _arrays(doc: Any) -> dict[str, Any]:
    return doc.get("outputs", doc) if isinstance(doc, dict) and isinstance(doc.get("outputs"), dict) else (
        doc if isinstance(doc, dict) else {})


class Shadow:
    """One module's running candidate: its runner, the bounded queue of mirrored inputs, this interval's figures."""

    def __init__(self, name: str, bundle: str, version: int, runner: Runner | ModuleWorker, spec: ShadowSpec,
                 seed: int | None = None) -> None:
        self.name, self.bundle, self.version, self.runner, self.spec = name, bundle, version, runner, spec
        self.queue: asyncio.Queue[tuple[str, Any, Any, float, int]] = asyncio.Queue(spec.max_queue)
        self.stats, self.live_stats = ModuleStats(), ModuleStats()
        self.live_version = 0
        self.mirrored = self.dropped = self.compared = self.disagreements = self.errors = 0
        self.dropped_total = 0
        self.live_classes: Counter[str] = Counter()
        self.shadow_classes: Counter[str] = Counter()
        self.task: asyncio.Task[None] | None = None
        self._rng = random.Random(seed)

    def offer(self, kind: str, inputs: Any, live_out: Any, live_ms: float, live_version: int) -> None:
        """One live inference answered: queue it for the candidate if sampled; never blocks."""
        if self.spec.sample_ppm < 1_000_000 and self._rng.random() * 1_000_000 >= self.spec.sample_ppm:
            return
        try:
            self.queue.put_nowait((kind, inputs, live_out, live_ms, live_version))
            self.mirrored += 1
        except asyncio.QueueFull:
            self.dropped += 1
            self.dropped_total += 1

    async def run(self) -> None:
        """The consumer: the candidate answers each queued input, one at a time, and is compared."""
        while True:
            kind, inputs, live_out, live_ms, live_version = await self.queue.get()
            t0 = time.perf_counter()
            try:
                cand, live = await self._predict(kind, inputs, live_out)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the candidate's failure is a figure, never the live path's problem
                self.stats.record((time.perf_counter() - t0) * 1000.0, False)
                self.errors += 1
                log.debug("shadow %s:%d failed on a mirrored input: %r", self.name, self.version, exc)
                continue
            spent = time.perf_counter() - t0
            self.stats.record(spent * 1000.0, True)
            if live_ms >= 0:  # unknown for the direct socket's samples
                self.live_stats.record(live_ms, True)
            self.live_version = live_version
            c = compare(live, cand, self.spec.compare, self.spec.tolerance_ppm / 1_000_000)
            self.compared += c.rows
            self.disagreements += c.differ
            for mine, theirs in ((self.live_classes, c.live_classes), (self.shadow_classes, c.shadow_classes)):
                for k, v in theirs.items():
                    if k in mine or len(mine) < MAX_CLASSES:
                        mine[k] += v
            if self.spec.max_duty_ppm < 1_000_000:  # rest so that busy time / wall time <= max_duty
                await asyncio.sleep(spent * (1_000_000 / self.spec.max_duty_ppm - 1.0))

    async def _predict(self, kind: str, inputs: Any, live_out: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        if kind == "batch":
            if isinstance(self.runner, ModuleWorker):
                return await self.runner.predict(inputs), live_out
            return await asyncio.to_thread(self.runner.predict, inputs), live_out
        if isinstance(self.runner, ModuleWorker):
            out = await self.runner.predict_json(inputs)
        else:
            from modules.runners import predict_json

            out = await asyncio.to_thread(predict_json, self.runner, inputs)
        live = json.loads(live_out) if isinstance(live_out, (bytes, str)) else live_out
        return _arrays(json.loads(out)), _arrays(live)

    def take(self, now: float) -> ShadowPoint:
        """This interval's comparison, reset."""
        _, errors, latency = self.stats.take()
        _, _, live_latency = self.live_stats.take()
        point = ShadowPoint(ts=now, module=self.name, version=self.version, live_version=self.live_version,
                            mirrored=self.mirrored, dropped=self.dropped, compared=self.compared,
                            disagreements=self.disagreements, errors=self.errors, latency_ms=latency,
                            live_latency_ms=live_latency, live_classes=dict(self.live_classes),
                            shadow_classes=dict(self.shadow_classes))
        self.mirrored = self.dropped = self.compared = self.disagreements = self.errors = 0
        self.live_classes, self.shadow_classes = Counter(), Counter()
        return point

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
        if isinstance(self.runner, ModuleWorker):
            await self.runner.stop()


def mirror_batch(shadows: dict[str, Shadow], name: str, batch: Batch, out: Batch, ms: float, version: int) -> None:
    """Offer an answered batch inference of module ``name`` to its shadow, if it has one."""
    s = shadows.get(name)
    if s is not None:
        s.offer("batch", batch, out, ms, version)
