"""Run one agent as a process: blocking entry point for the CLI and ``python -m agent``."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import fcntl
import logging
import os
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path

from agent.apitokens import TOKENS_FILE, ApiTokens
from agent.core import ISOLATION_MODES, TRANSFER_MODES, Agent
from agent.identity import EnrollmentError, load_identity, read_ca_file
from agent.limits import DownloadLimits
from agent.offline import OfflineInbox
from agent.workerproc import worker_sandbox
from modules.sandbox import SandboxUnavailable

log = logging.getLogger("edgefleet.agent")

DEFAULT_API_PORT = 0  # TCP off: any local user can reach 127.0.0.1; the Unix socket (run/api.sock) is on
TRANSFER_ENV = "EDGEFLEET_TRANSFER"
LOCK_FILE = "agent.lock"


def take_lock(data_dir: Path) -> int | None:
    """Hold ``DATA/agent.lock`` (one agent per data directory) until the process ends; None: another holds it."""
    fd = os.open(Path(data_dir) / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


async def _serve(agent: Agent, tokens: ApiTokens | None,
                 until: Callable[[Agent], Awaitable[None]] | None = None) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        # stop() publishes "offline" and disconnects cleanly before the loop ends.
        loop.add_signal_handler(sig, lambda: asyncio.ensure_future(agent.stop()))
    # SIGHUP re-reads DATA/api-tokens (its changes are also seen by themselves: agent/apitokens.py); never a stop
    loop.add_signal_handler(signal.SIGHUP, tokens.reload if tokens is not None else
                            lambda: log.info("SIGHUP: no TCP API, no tokens to re-read"))
    tasks = [loop.create_task(OfflineInbox(agent).loop())]  # offline packages dropped in DATA/inbox

    async def stop_when_done(done: Callable[[Agent], Awaitable[None]]) -> None:
        await done(agent)
        await agent.stop()
    if until is not None:
        tasks.append(loop.create_task(stop_when_done(until)))
    try:
        await agent.run()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def run_agent(data_dir: Path | str, mqtt_url: str | None = None, workload_rate: float = 0.0,
              telemetry_interval: float = 5.0, *, api_port: int = DEFAULT_API_PORT, isolation: str = "process",
              module_memory_mb: int = 0, module_cpu_seconds: int = 0, health_timeout: float = 30.0,
              broker_ca: Path | str | None = None, transfer: str = "mqtt", hub_url: str | None = None,
              limits: DownloadLimits | None = None, api_socket: Path | str | None = "",
              api_group: str | None = None, module_sandbox: str = "off",
              max_defer_s: float = 3600.0, lock: bool = True,
              until: Callable[[Agent], Awaitable[None]] | None = None) -> None:
    """Run the agent enrolled in ``data_dir`` until SIGINT/SIGTERM (or ``until`` returns).

    ``lock``: take ``DATA/agent.lock`` (ValueError when another agent holds it); False: the caller holds it.

    ``broker_ca``: a PEM file to trust for ``mqtts://`` instead of the CA pinned at enrolment.
    ``transfer``: how bundles arrive, ``mqtt`` (blob topics) or ``http`` (from ``hub_url`` or the enrolled hub).
    """
    identity = load_identity(Path(data_dir))
    if lock and take_lock(Path(data_dir)) is None:
        raise ValueError(f"another agent runs on {data_dir} ({Path(data_dir) / LOCK_FILE} is held)")
    if broker_ca is not None:
        identity = dataclasses.replace(identity, broker_ca=read_ca_file(broker_ca))
    workload = None
    if workload_rate > 0:  # a demo load generator: it (and NumPy) is loaded only when asked for
        from agent.workload import Workload

        workload = Workload(rate=workload_rate)
    # "" : the default DATA/run/api.sock; None: no Unix socket. TCP, when on, takes the per-app tokens.
    socket_path = Path(data_dir) / "run" / "api.sock" if api_socket == "" else Path(api_socket) if api_socket else None
    tokens = ApiTokens(Path(data_dir) / TOKENS_FILE) if api_port else None
    agent = Agent(identity, Path(data_dir), mqtt_url=mqtt_url, workload=workload, api_tokens=tokens,
                  api_socket=socket_path, api_group=api_group,
                  module_sandbox=worker_sandbox(module_sandbox, Path(data_dir)) if isolation == "process" else None,
                  telemetry_interval=telemetry_interval, isolation=isolation, api_port=api_port,
                  module_limits={"memory_mb": module_memory_mb, "cpu_seconds": module_cpu_seconds},
                  health_timeout=health_timeout, transfer=transfer, hub_url=hub_url, limits=limits,
                  max_defer_s=max_defer_s)
    log.info("agent %s starting (data %s, %s isolation, bundles over %s)", identity.device_id, data_dir, isolation,
             transfer)
    asyncio.run(_serve(agent, tokens, until))
    log.info("agent %s stopped", identity.device_id)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m agent", description="Run the edgefleet device agent.")
    parser.add_argument("--data", required=True, type=Path, help="data directory holding identity.json")
    parser.add_argument("--mqtt", default=None, help="broker URL overriding the enrolled one")
    parser.add_argument("--broker-ca", default=None, type=Path,
                        help="PEM CA file to trust for mqtts:// (default: the one pinned at enrolment)")
    parser.add_argument("--rate", type=float, default=0.0, help="synthetic inferences per second per module")
    parser.add_argument("--telemetry-interval", type=float, default=5.0, help="seconds between telemetry batches")
    parser.add_argument("--api-port", type=int, default=DEFAULT_API_PORT,
                        help="local inference API port on 127.0.0.1, with per-app tokens from DATA/api-tokens (0: off)")
    parser.add_argument("--api-socket", default="",
                        help="local inference API Unix socket (default DATA/run/api.sock, mode 0660; 'off': none)")
    parser.add_argument("--module-sandbox", choices=("auto", "on", "off"), default="auto",
                        help="run module workers in bubblewrap, away from the device's credentials (auto: where it works)")
    parser.add_argument("--api-group", default=None, help="group owning the API socket (apps in it may call it)")
    parser.add_argument("--isolation", choices=ISOLATION_MODES, default="process",
                        help="run each module in a supervised worker process, or in the agent process")
    parser.add_argument("--module-memory-mb", type=int, default=0, help="address-space cap per module worker (0: none)")
    parser.add_argument("--module-cpu-seconds", type=int, default=0, help="CPU-time cap per module worker (0: none)")
    parser.add_argument("--health-timeout", type=float, default=30.0, help="seconds a health check may take")
    parser.add_argument("--transfer", choices=TRANSFER_MODES, default=os.environ.get(TRANSFER_ENV, "mqtt"),
                        help=f"bundle download: MQTT blob topics or HTTP(S) from the hub (env {TRANSFER_ENV})")
    parser.add_argument("--hub-url", default=None, help="hub URL for --transfer http (default: the enrolled one)")
    defaults = DownloadLimits()
    parser.add_argument("--min-download-rate", type=float, default=defaults.min_bps,
                        help="abort a download slower than this many bytes/s over --download-window (0: never)")
    parser.add_argument("--download-window", type=float, default=defaults.window_s,
                        help="seconds over which the download rate is judged")
    parser.add_argument("--disk-reserve-mb", type=float, default=defaults.reserve_bytes / 2**20,
                        help="MB kept free beyond what an install needs")
    parser.add_argument("--retry-after", type=float, default=defaults.retry_s,
                        help="seconds before an install stopped by a full disk or a slow download is tried again")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        run_agent(args.data, args.mqtt, args.rate, args.telemetry_interval, api_port=args.api_port,
                  isolation=args.isolation, module_memory_mb=args.module_memory_mb,
                  module_cpu_seconds=args.module_cpu_seconds, health_timeout=args.health_timeout,
                  broker_ca=args.broker_ca, transfer=args.transfer, hub_url=args.hub_url,
                  api_socket=None if args.api_socket == "off" else args.api_socket, api_group=args.api_group,
                  module_sandbox=args.module_sandbox,
                  limits=DownloadLimits(args.min_download_rate, args.download_window,
                                        int(args.disk_reserve_mb * 2**20), args.retry_after))
    except (EnrollmentError, ValueError, SandboxUnavailable) as exc:  # ValueError: e.g. --transfer http, no hub URL
        log.error("%s", exc)
        return 2
    return 0
