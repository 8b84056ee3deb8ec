"""Run one agent as a process: blocking entry point for the CLI and ``python -m agent``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from pathlib import Path

from agent.core import Agent
from agent.identity import EnrollmentError, load_identity
from agent.workload import Workload

log = logging.getLogger("edgefleet.agent")


async def _serve(agent: Agent) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        # stop() publishes "offline" and disconnects cleanly before the loop ends.
        loop.add_signal_handler(sig, lambda: asyncio.ensure_future(agent.stop()))
    await agent.run()


def run_agent(data_dir: Path | str, mqtt_url: str | None = None, workload_rate: float = 0.0,
              telemetry_interval: float = 5.0) -> None:
    """Run the agent enrolled in ``data_dir`` until SIGINT/SIGTERM."""
    identity = load_identity(Path(data_dir))
    workload = Workload(rate=workload_rate) if workload_rate > 0 else None
    agent = Agent(identity, Path(data_dir), mqtt_url=mqtt_url, workload=workload,
                  telemetry_interval=telemetry_interval)
    log.info("agent %s starting (data %s)", identity.device_id, data_dir)
    asyncio.run(_serve(agent))
    log.info("agent %s stopped", identity.device_id)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m agent", description="Run the edgefleet device agent.")
    parser.add_argument("--data", required=True, type=Path, help="data directory holding identity.json")
    parser.add_argument("--mqtt", default=None, help="broker URL overriding the enrolled one")
    parser.add_argument("--rate", type=float, default=0.0, help="synthetic inferences per second per module")
    parser.add_argument("--telemetry-interval", type=float, default=5.0, help="seconds between telemetry batches")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        run_agent(args.data, args.mqtt, args.rate, args.telemetry_interval)
    except EnrollmentError as exc:
        log.error("%s", exc)
        return 2
    return 0
