"""Many agents in one process, over real MQTT connections, on one event loop.

Each simulated device is a full :class:`agent.Agent` with its own data
directory, identity, chunk store, outbox and MQTT session; only onnxruntime
sessions are shared (one per bundle, through a shared runner cache), so a
thousand devices cost a thousand sockets, not a thousand models.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import random
import threading
from pathlib import Path
from typing import Any

import httpx

from agent.core import Agent
from agent.identity import EnrollmentError, Identity, load_identity, save_identity
from agent.workload import Workload
from modules.runners import Runner
from protocol.encoding import ProtocolError
from simulator.outbox import FleetOutboxes
from simulator.scenarios import Scenario

log = logging.getLogger("edgefleet.simulator")


class Fleet:
    """``await run()`` on your loop, or ``start()``/``stop()`` to run it on a background thread."""

    def __init__(
        self,
        hub_url: str,
        api_token: str,
        n: int,
        data_root: Path | str,
        mqtt_url: str | None = None,
        rate: float = 2.0,
        telemetry_interval: float = 2.0,
        prefix: str = "sim",
        workload: Workload | None = None,
        http_transport: httpx.AsyncBaseTransport | None = None,
        enroll_concurrency: int = 2,
        enroll_batch: int = 500,
        connect_rate: float = 1000.0,
        scenario: Scenario | None = None,
        labels: dict[str, str] | None = None,
        agent_options: dict[str, Any] | None = None,
    ) -> None:
        self.hub_url = hub_url.rstrip("/")
        self.api_token = api_token
        self.n = n
        self.data_root = Path(data_root)
        self.mqtt_url = mqtt_url
        self.workload = workload if workload is not None else (Workload(rate=rate) if rate > 0 else None)
        self.telemetry_interval = telemetry_interval
        self.prefix = prefix
        self.http_transport = http_transport  # tests hand in an httpx.MockTransport
        self.enroll_concurrency = enroll_concurrency  # bulk enrolment requests in flight
        self.enroll_batch = enroll_batch
        self.connect_rate = connect_rate  # agents started per second, jittered (0: all at once)
        self.scenario = scenario or Scenario()
        self.labels = {"sim": "true"} | (labels or {})
        self.agent_options = agent_options or {}  # e.g. a client factory with a short reconnect backoff
        self.runner_cache: dict[str, Runner] = {}
        self.agents: list[Agent] = []
        self.ready = threading.Event()  # set once every agent is started (or start failed)
        self.error: BaseException | None = None
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ramp_start = 0.0

    def device_ids(self) -> list[str]:
        return [f"{self.prefix}-{i:04d}" for i in range(self.n)]

    # --- enrolment ---------------------------------------------------------------------------

    async def enroll(self) -> list[Identity]:
        """Identities for every device: re-used from ``data_root`` where present, else enrolled now.

        Fleet provisioning: one group token good for every missing device, spent through the bulk
        enrolment endpoint ``enroll_batch`` devices per request (one broker reload and one
        desired-state pass per batch instead of per device).
        """
        identities: dict[str, Identity] = {}
        missing: list[str] = []
        for dev in self.device_ids():
            try:
                identities[dev] = load_identity(self.data_root / dev)
            except EnrollmentError:
                missing.append(dev)
        if missing:
            async with httpx.AsyncClient(transport=self.http_transport, timeout=120.0) as http:
                token = await self._group_token(http, len(missing))
                gate = asyncio.Semaphore(self.enroll_concurrency)

                async def batch(devs: list[str]) -> None:
                    async with gate:
                        for ident in await self._enroll_batch(http, token, devs):
                            identities[ident.device_id] = ident

                await asyncio.gather(*(batch(missing[i:i + self.enroll_batch])
                                       for i in range(0, len(missing), self.enroll_batch)))
            log.info("enrolled %d simulated devices (%d re-used)", len(missing), self.n - len(missing))
        return [identities[d] for d in self.device_ids()]

    async def _group_token(self, http: httpx.AsyncClient, uses: int) -> str:
        body = {"count": 1, "uses": uses, "labels": self.labels}
        resp = await self._post(http, "/api/v1/enrollment-tokens", body, {"Authorization": f"Bearer {self.api_token}"})
        if resp.status_code != 200:
            raise EnrollmentError(f"hub refused to create an enrolment token: HTTP {resp.status_code}: {resp.text[:200]}")
        tokens = resp.json().get("tokens", [])
        if len(tokens) != 1:
            raise EnrollmentError(f"asked the hub for one enrolment token, got {len(tokens)}")
        return str(tokens[0])

    async def _enroll_batch(self, http: httpx.AsyncClient, token: str, devs: list[str]) -> list[Identity]:
        body = {"token": token, "devices": [{"device_id": d, "facts": {"simulated": "true"}} for d in devs]}
        resp = await self._post(http, "/api/v1/enroll/batch", body)
        if resp.status_code != 200:
            raise EnrollmentError(f"enrolment refused: HTTP {resp.status_code}: {resp.text[:300]}")
        try:
            data = resp.json()
            got = {d["device_id"]: d for d in data["devices"]}
            identities = [Identity(device_id=d, mqtt_url=data["mqtt_url"], mqtt_username=got[d]["mqtt_username"],
                                   mqtt_password=got[d]["mqtt_password"], root=data["root"],
                                   broker_ca=data.get("broker_ca"), hub_url=self.hub_url) for d in devs]
            identities[0].trusted_root()  # one root for the batch: refuse to pin one that does not verify
            identities[0].broker()
        except (ValueError, KeyError, TypeError, ProtocolError) as exc:
            raise EnrollmentError(f"hub sent an invalid enrolment answer: {exc!r}") from None

        def save() -> None:  # a file (and an fsync) per device: off the loop
            for ident in identities:
                save_identity(self.data_root / ident.device_id, ident)

        await asyncio.to_thread(save)
        return identities

    async def _post(self, http: httpx.AsyncClient, path: str, body: dict[str, Any],
                    headers: dict[str, str] | None = None) -> httpx.Response:
        try:
            return await http.post(f"{self.hub_url}{path}", json=body, headers=headers)
        except httpx.HTTPError as exc:
            raise EnrollmentError(f"cannot reach the hub at {self.hub_url}: {exc!r}") from None

    # --- running -----------------------------------------------------------------------------

    async def run(self, duration: float | None = None) -> list[Agent]:
        """Enrol, run every agent until ``duration`` passes or :meth:`stop`, then stop them; returns the agents."""
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        tasks: list[asyncio.Task[None]] = []
        flaky: asyncio.Task[None] | None = None
        outboxes: FleetOutboxes | None = None
        try:
            try:
                identities = await self.enroll()
                outboxes = FleetOutboxes(self.data_root / "outbox.db")
                self.agents = []
                self._ramp_start = self._loop.time()
                for i, ident in enumerate(identities):  # each starts as soon as it is built, at its place in the ramp
                    a = Agent(ident, self.data_root / ident.device_id, mqtt_url=self.mqtt_url, workload=self.workload,
                              telemetry_interval=self.telemetry_interval, runner_cache=self.runner_cache,
                              outbox=outboxes.for_device(ident.device_id),  # type: ignore[arg-type]
                              **self.agent_options)
                    self.scenario.apply(a)
                    self.agents.append(a)
                    tasks.append(asyncio.create_task(self._ramped(a, i), name=f"agent-{a.device_id}"))
                    if i % 50 == 49:
                        await asyncio.sleep(0)  # let the ones already started connect meanwhile
                flaky = asyncio.create_task(self.scenario.flaky(self.agents), name="sim-flaky")
            except BaseException as exc:
                self.error = exc
                raise
            finally:
                self.ready.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), duration)
        finally:  # also when cancelled or failed: every device says "offline" and closes its outbox
            self._stop.set()  # agents still waiting for their place in the connect ramp never start
            if flaky is not None:
                flaky.cancel()
            await asyncio.gather(*(a.stop() for a in self.agents), return_exceptions=True)
            await asyncio.gather(*tasks, return_exceptions=True)
            if outboxes is not None:
                outboxes.close()
        return self.agents

    async def _ramped(self, agent: Agent, i: int) -> None:
        """Start agent ``i`` at its place in the connect ramp: a fleet powering up at once is a connect storm
        for the broker and the hub (every device says online, reports and subscribes), so spread it."""
        assert self._stop is not None and self._loop is not None
        if self.connect_rate > 0:
            delay = self._ramp_start + (i + random.random()) / self.connect_rate - self._loop.time()
            with contextlib.suppress(TimeoutError):  # woken early by stop()
                await asyncio.wait_for(self._stop.wait(), max(delay, 0.0))
        if not self._stop.is_set():
            await agent.run()

    async def astop(self) -> None:
        if self._stop is not None:
            self._stop.set()

    def snapshot_all(self) -> list[dict[str, Any]]:
        """Snapshots of every agent; call on the fleet's loop (or via :meth:`snapshots`)."""
        return [a.snapshot() for a in self.agents]

    # --- background thread (CLI demo) --------------------------------------------------------

    def start(self, timeout: float = 120.0) -> None:
        """Run the fleet on its own thread and loop; returns once every agent has started."""

        def target() -> None:
            with contextlib.suppress(Exception):  # the error is kept in self.error and raised by start()
                asyncio.run(self.run())

        self._thread = threading.Thread(target=target, name="edgefleet-sim", daemon=True)
        self._thread.start()
        if not self.ready.wait(timeout):
            raise TimeoutError(f"simulated fleet did not start within {timeout}s")
        if self.error is not None:
            raise self.error

    def stop(self, timeout: float = 30.0) -> None:
        if self._loop is not None and self._thread is not None and self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(self.astop(), self._loop)
            self._thread.join(timeout)

    def snapshots(self, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Thread-safe: snapshots taken on the fleet's own loop."""
        loop = self._loop
        if loop is None or not loop.is_running():
            return self.snapshot_all()
        try:
            asyncio.get_running_loop()
            on_loop = asyncio.get_running_loop() is loop
        except RuntimeError:
            on_loop = False
        if on_loop:
            return self.snapshot_all()

        async def take() -> list[dict[str, Any]]:
            return self.snapshot_all()

        fut: concurrent.futures.Future[list[dict[str, Any]]] = asyncio.run_coroutine_threadsafe(take(), loop)
        return fut.result(timeout)

    def defer(self, index: int, seconds: float | None, reason: str = "", timeout: float = 10.0) -> dict[str, Any]:
        """Thread-safe: device ``index``'s application holds its installs for ``seconds`` (None: releases the hold),
        as ``POST /v1/defer`` on its local API does; returns the hold, or raises ValueError with the refusal."""
        assert self._loop is not None, "the fleet is not running"
        agent = self.agents[index]

        async def call() -> tuple[dict[str, Any], str | None]:
            return agent.defer(seconds, reason)

        view, why = asyncio.run_coroutine_threadsafe(call(), self._loop).result(timeout)
        if why is not None:
            raise ValueError(why)
        return view


async def run_fleet(
    hub_url: str,
    api_token: str,
    n: int,
    data_root: Path | str,
    mqtt_url: str | None = None,
    rate: float = 2.0,
    telemetry_interval: float = 2.0,
    duration: float | None = None,
    prefix: str = "sim",
    scenario: Scenario | None = None,
    connect_rate: float = 1000.0,
    shift: float = 0.0,
) -> list[Agent]:
    """Enrol ``n`` devices ``{prefix}-{i:04d}`` (re-using identities in ``data_root``) and run them on this loop.

    Runs until ``duration`` seconds pass (forever if None, until cancelled); returns the agents.
    """
    workload = Workload(rate=rate, shift=shift) if rate > 0 else None  # shift: feature 0 drifts (examples/ci)
    fleet = Fleet(hub_url, api_token, n, data_root, mqtt_url=mqtt_url, rate=rate, workload=workload,
                  telemetry_interval=telemetry_interval, prefix=prefix, scenario=scenario, connect_rate=connect_rate)
    return await fleet.run(duration)
