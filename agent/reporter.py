"""The reporter: what the device tells the hub, and when.

The reported state (retained, coalesced: a burst of changes is one message), telemetry batches and
sampled data into the store-and-forward outbox on a timer, the drain loop that sends the outbox while
the hub listens (each row deleted on its PUBACK), and the health and worker figures that go with them.
"""

from __future__ import annotations

import asyncio
import logging
import random
import sqlite3
from collections import Counter
from collections.abc import Callable
from typing import Any

from agent.executor import Executor
from agent.inference import InferenceFront
from agent.limits import free_bytes
from agent.mqtt import MqttOffline
from agent.offline import offline_revision
from agent.outbox import Outbox
from agent.procstat import CpuMeter, ProcessGone, rss_bytes
from agent.reconcile import Trust
from agent.session import Session
from agent.supervisor import ModuleWorker
from protocol.messages import (
    DataBatch,
    DesiredModule,
    HoldReport,
    ModuleReport,
    ReportedState,
    ShadowReport,
    TelemetryBatch,
    TelemetryPoint,
    config_digest,
)
from protocol.topics import Channel

log = logging.getLogger("edgefleet.agent")


class Reporter:
    """Reported state, telemetry and the outbox of one device."""

    def __init__(self, session: Session, outbox: Outbox, trust: Trust, front: InferenceFront, executor: Executor,
                 facts: dict[str, str], rejected: Counter[str], clock: Callable[[], float],
                 telemetry_interval: float, dirty: asyncio.Event) -> None:
        self.session, self.client, self.outbox = session, session.client, outbox
        self.trust, self.front, self.executor = trust, front, executor
        self.facts, self.rejected, self.clock, self.telemetry_interval = facts, rejected, clock, telemetry_interval
        self.device_id = session.device_id
        self.dirty = dirty  # the reported state changed: publish it (coalesced)
        self.outbox_ready = asyncio.Event()
        self._cpu: dict[int, CpuMeter] = {}  # per worker pid: CPU % since the previous telemetry
        self.storage_error = ""  # why the last telemetry could not be queued (a full disk), until one is
        self.lost_batches = 0  # telemetry and data batches that could not be queued
        self.offline_revision = offline_revision(executor.data_dir)  # installed from an offline package (0: none)

    def connected(self) -> None:
        """After a (re)connect: the hub may have missed changes while we were away, and the outbox waits."""
        self.dirty.set()
        self.outbox_ready.set()

    # --- reported state ------------------------------------------------------------------------

    def reported(self) -> ReportedState:
        modules: list[ModuleReport] = []
        installer, ex = self.executor.installer, self.executor
        desired = self.trust.desired
        for m in desired.modules if desired else []:
            entry = installer.journal.get(m.name)
            active = self.front.active.get(m.name)
            state, error, progress = "pending", "", 0.0
            # the install on record for this very (bundle, configuration): a config-only change is one too
            if (entry is not None and entry.bundle == m.bundle and entry.config == config_digest(m.config)
                    and entry.state != "committed"):
                state, error = entry.state, entry.error
                progress = 1.0 if entry.state not in ("downloading",) else ex.progress.get(m.bundle, 0.0)
                if entry.state == "downloading" and not error:
                    error = ex.transfer_errors.get(m.bundle, "")
            elif active is not None and active.bundle == m.bundle:
                state, progress = "running", 1.0
            elif m.name in ex.load_errors:
                state, error = "failed", ex.load_errors[m.name]
            elif ex.blocked.get(m.name, ("",))[0] == m.bundle:
                state, error = "failed", ex.blocked[m.name][1]
            elif installer.current(m.name) == m.bundle:
                state, progress = "activating", 1.0
            serving = active is not None and active.bundle == m.bundle
            modules.append(ModuleReport(name=m.name, version=m.version, bundle=m.bundle, state=state,  # type: ignore[arg-type]
                                        error=error, progress=round(progress, 4),
                                        config=active.config if serving and active else "",
                                        accelerator=getattr(active.runner, "accelerator", "") if serving and active
                                        else "", shadow=self._shadow(m)))
        source = "offline" if self.offline_revision and self.offline_revision == self.trust.revision else "hub"
        held, now = self.executor.hold, self.clock()
        hold = HoldReport(since=held.since, until=held.until, reason=held.reason) if held.active(now) else None
        return ReportedState(device=self.device_id, revision=self.trust.revision, modules=modules,
                             error=self._error(), facts=self.facts, hold=hold, ts=now, source=source)

    def _shadow(self, m: DesiredModule) -> ShadowReport | None:
        """The state of ``m``'s shadow candidate: its install, then ``running`` once it is offered inputs."""
        s = m.shadow
        if s is None:
            return None
        slots = self.executor.shadows
        entry = slots.installer.journal.get(m.name) if slots.dir.exists() else None
        running = self.front.shadows.get(m.name)
        state, error = "pending", ""
        if entry is not None and entry.bundle == s.bundle and entry.state != "committed":
            state, error = entry.state, entry.error
        elif running is not None and running.bundle == s.bundle:
            state = "running"
        elif m.name in slots.load_errors:
            state, error = "failed", slots.load_errors[m.name]
        elif entry is not None and entry.bundle == s.bundle:
            state = "activating"
        return ShadowReport(version=s.version, bundle=s.bundle, state=state, error=error)  # type: ignore[arg-type]

    def _error(self) -> str:
        """The refusal standing, then what is flagged but kept running (root or applied state expired, clock),
        then what the disk refused (sent over MQTT, which needs no disk)."""
        return "; ".join(e for e in [self.trust.desired_error, *self.trust.warnings(self.clock()), *self.disk_errors()]
                         if e)

    def disk_errors(self) -> list[str]:
        """What a full disk is stopping now: queuing telemetry, a reconcile pass, or the free space itself."""
        errors = [e for e in (self.storage_error, self.executor.storage_error) if e]
        free, reserve = self._free(), self.executor.limits.reserve_bytes
        if free is not None and free < reserve and not errors:
            errors.append(f"disk nearly full: {free / 2**20:.1f} MB free, {reserve / 2**20:.1f} MB kept in reserve")
        return errors

    def _free(self) -> int | None:
        try:
            return free_bytes(self.executor.data_dir)
        except OSError:
            return None

    async def report_loop(self) -> None:
        while True:
            await self.dirty.wait()
            await asyncio.sleep(0.05)  # coalesce a burst of state changes into one retained message
            self.dirty.clear()
            if not self.client.connected.is_set():
                continue  # re-sent on the next connect
            try:
                # asyncio.timeout, not wait_for: on Python 3.11 wait_for swallows a cancellation that comes as the
                # PUBACK does, and this loop would then outlive the agent's stop (which waits for it forever)
                async with asyncio.timeout(10.0):
                    await self.client.publish(self.session.topic(Channel.REPORTED), self.reported().encode(), qos=1,
                                              retain=True)
            except (MqttOffline, TimeoutError):
                self.dirty.set()
                await asyncio.sleep(1.0)

    # --- telemetry and the outbox ----------------------------------------------------------------

    async def telemetry_loop(self) -> None:
        # A random phase, so a fleet started together does not report in lock-step.
        await asyncio.sleep(random.uniform(0, self.telemetry_interval))
        while True:
            self.flush_telemetry()
            await asyncio.sleep(self.telemetry_interval)

    def flush_telemetry(self) -> None:
        """Queue this interval's telemetry (and sampled data) in the outbox; a full disk loses this interval's
        batches (counted, and shown as the device's error and health) and the next interval tries again."""
        try:
            self._flush()
        except (sqlite3.Error, OSError) as exc:
            self.lost_batches += 1
            if not self.storage_error:
                log.error("%s: telemetry cannot be queued (%s): lost until the disk has room", self.device_id, exc)
                self.dirty.set()
            self.storage_error = f"disk full: telemetry cannot be queued ({exc}); {self.lost_batches} batches lost"
            return
        if self.storage_error:
            log.warning("%s: telemetry queued again (%d batches lost meanwhile)", self.device_id, self.lost_batches)
            self.storage_error = ""
            self.dirty.set()

    def _flush(self) -> None:
        now = self.clock()
        points = []
        for a in self.front.active.values():
            n, errors, latency = a.stats.take()
            points.append(TelemetryPoint(ts=now, module=a.name, version=a.version, inferences=n, errors=errors,
                                         latency_ms=latency))
        agent = {
            "rss_mb": round(rss_bytes() / 2**20, 1),
            "outbox_dropped": float(self.outbox.dropped),
            "outbox_pending": float(len(self.outbox)),
            "rejected_messages": float(sum(self.rejected.values())),
            "connected": 1.0 if self.client.connected.is_set() else 0.0,
            **self.health(),
            **self.worker_stats(),
        }
        batch = TelemetryBatch(device=self.device_id, seq=self.outbox.next_seq("telemetry"), ts=now, points=points,
                               agent=agent, shadow=[s.take(now) for s in self.front.shadows.values()])
        self.outbox.put("telemetry", batch.encode())
        while self.front.data or self.front.labels:
            labels, self.front.labels = self.front.labels[:1000], self.front.labels[1000:]
            data = DataBatch(device=self.device_id, seq=self.outbox.next_seq("data"), ts=now,
                             records=self.front.take_data(1000), labels=labels)
            self.outbox.put("data", data.encode())
        self.outbox_ready.set()

    async def drain_loop(self) -> None:
        topics = {"telemetry": self.session.topic(Channel.TELEMETRY), "data": self.session.topic(Channel.DATA)}
        hub = self.session.hub
        while True:
            await self.client.connected.wait()
            if hub.online is False:
                hub.changed.clear()
                await hub.changed.wait()  # the broker would accept, but nobody would store it
                continue
            self.outbox_ready.clear()
            rows = self.outbox.peek(50)
            if not rows:
                await self.outbox_ready.wait()
                continue
            # Pipelined: paho keeps them in order on the wire; each row is deleted on its PUBACK.
            results = await asyncio.gather(
                *(self._send(topics.get(kind, topics["telemetry"]), payload) for _, kind, payload in rows),
                return_exceptions=True)
            failed = False
            for (rowid, _, _), result in zip(rows, results):
                if isinstance(result, BaseException):
                    failed = True
                    continue
                try:
                    self.outbox.delete(rowid)
                except (sqlite3.Error, OSError):  # a full disk: sent again later, and the hub stores each seq once
                    failed = True
            if failed:
                await asyncio.sleep(1.0)

    async def _send(self, topic: str, payload: bytes, timeout: float = 30.0) -> None:
        # The publish coroutine is made inside this task, so a cancelled gather leaves none un-awaited.
        async with asyncio.timeout(timeout):
            await self.client.publish(topic, payload, qos=1)

    # --- health --------------------------------------------------------------------------------

    def health(self) -> dict[str, float]:
        """Agent health: 1.0 when every desired module is serving and no load or install error stands."""
        desired = self.trust.desired
        wanted = {m.name for m in desired.modules} if desired else set()
        serving = {n for n, a in self.front.active.items()
                   if not isinstance(a.runner, ModuleWorker) or a.runner.state == "serving"}
        healthy = (wanted <= serving and not self.executor.load_errors and not self.trust.desired_error
                   and not self.disk_errors())
        return {"healthy": 1.0 if healthy else 0.0, "modules_running": float(len(serving))}

    def worker_stats(self) -> dict[str, float]:
        """Per module worker: CPU % since the last call, RSS in MB and restarts (flat keys: the schema is str -> float)."""
        out: dict[str, float] = {}
        meters: dict[int, CpuMeter] = {}
        for name, a in self.front.active.items():
            if not isinstance(a.runner, ModuleWorker):
                continue
            out[f"worker.{name}.restarts"] = float(a.runner.restarts)
            pid = a.runner.pid
            if pid is None:
                continue
            try:
                meter = meters[pid] = self._cpu.get(pid) or CpuMeter(pid)
                out[f"worker.{name}.cpu_pct"] = round(meter.percent(), 1)
                out[f"worker.{name}.rss_mb"] = round(rss_bytes(pid) / 2**20, 1)
            except ProcessGone:
                # dead (or a zombie not yet reaped): the supervisor is about to restart it; the next
                # interval sees the new one
                out.pop(f"worker.{name}.cpu_pct", None)
                continue
        self._cpu = meters
        return out

    def snapshot(self) -> dict[str, Any]:
        report = self.reported()
        return {
            "device_id": self.device_id,
            "connected": self.client.connected.is_set(),
            "revision": self.trust.revision,
            "root_version": self.trust.root.version,
            "error": report.error,
            "modules": [{"name": m.name, "version": m.version, "bundle": m.bundle, "state": m.state, "error": m.error,
                         "progress": m.progress} for m in report.modules],
            "inferences": self.front.inferences,
            "rejected": dict(self.rejected),
            "outbox": len(self.outbox),
            "outbox_dropped": self.outbox.dropped,
            "disk": self.disk_errors(),
            "telemetry_lost": self.lost_batches,
        }
