"""Signed diagnostic commands (protocol §5a): recent logs, a support bundle, a module restart.

The hub signs each with the director key for one device; the agent checks it against its pinned root
(``protocol.commands.verify_command``), answers each id once, and replies on its own ``cmd-res`` topic.
Logs come from a ring of the agent's recent log records at its log level (this device's only: the simulator
runs many agents in one process).
"""

from __future__ import annotations

import collections
import contextvars
import json
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from protocol.commands import verify_command
from protocol.encoding import ProtocolError
from protocol.messages import CommandReply
from protocol.signing import Root


class Host(Protocol):
    """What the diagnostics need of the agent (``agent.core.Agent``)."""

    device_id: str
    data_dir: Path
    facts: dict[str, str]
    executor: Any  # agent.executor.Executor: deactivate(name), activate(name)

    @property
    def root(self) -> Root: ...
    @property
    def active(self) -> Mapping[str, Any]: ...
    @property
    def rejected(self) -> Counter[str]: ...
    def snapshot(self) -> dict[str, Any]: ...
    def reported(self) -> Any: ...
    def hold_view(self) -> dict[str, Any]: ...


LOG_LINES = 2000  # kept in memory
MAX_LINES = 500  # per answer
MAX_BUNDLE_BYTES = 200_000  # a support bundle's JSON, at most (an MQTT message, not a file transfer)
SEEN_IDS = 1000  # command ids answered, remembered against replays (a command lives an hour at most)


# the device whose agent is running the code that logs (set in Agent.run: its tasks and threads inherit it)
DEVICE: contextvars.ContextVar[str | None] = contextvars.ContextVar("edgefleet_device", default=None)


class LogRings(logging.Handler):
    """One handler for every agent in the process (the simulator runs thousands): a record goes, in O(1), to the
    ring of the device whose agent logged it (:data:`DEVICE`), keeping its last :data:`LOG_LINES` lines."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.rings: dict[str, collections.deque[str]] = {}
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        device = DEVICE.get()
        ring = self.rings.get(device) if device is not None else None
        if ring is None:
            return
        try:
            ring.append(self.format(record))
        except Exception:  # a log line must never break the agent
            self.handleError(record)

    def add(self, device: str) -> None:
        if not self.rings:
            logging.getLogger("edgefleet").addHandler(self)
        self.rings[device] = collections.deque(maxlen=LOG_LINES)

    def remove(self, device: str) -> None:
        self.rings.pop(device, None)
        if not self.rings:
            logging.getLogger("edgefleet").removeHandler(self)

    def tail(self, device: str, module: str | None, n: int) -> list[str]:
        lines = [line for line in self.rings.get(device, ()) if module is None or module in line]
        return lines[-max(1, min(n, MAX_LINES)):]


RINGS = LogRings()


class Diagnostics:
    def __init__(self, agent: Host) -> None:
        self.agent = agent
        self.seen: collections.OrderedDict[str, None] = collections.OrderedDict()
        RINGS.add(agent.device_id)

    def close(self) -> None:
        RINGS.remove(self.agent.device_id)

    async def answer(self, envelope: Any, now: float | None = None) -> CommandReply | None:
        """The reply to a signed command, or None if refused (the caller counts it) — raises ProtocolError."""
        cmd = verify_command(self.agent.root, envelope, self.agent.device_id, time.time() if now is None else now)
        if cmd.id in self.seen:
            raise ProtocolError(f"command {cmd.id!r} was already answered (a replay)")
        self.seen[cmd.id] = None
        while len(self.seen) > SEEN_IDS:
            self.seen.popitem(last=False)
        handler: Callable[[dict[str, Any]], Awaitable[Any]] = getattr(self, f"_{cmd.name}")
        try:
            return CommandReply(id=cmd.id, ok=True, result=await handler(cmd.args))
        except (KeyError, ValueError, TypeError) as exc:
            return CommandReply(id=cmd.id, ok=False, error=f"{cmd.name}: {exc}")

    async def _logs(self, args: dict[str, Any]) -> dict[str, Any]:
        module = args.get("module") or None
        return {"module": module, "lines": RINGS.tail(self.agent.device_id, module, int(args.get("lines", 200)))}

    async def _support_bundle(self, args: dict[str, Any]) -> dict[str, Any]:
        a = self.agent
        journal = a.data_dir / "journal.json"
        out: dict[str, Any] = {
            "device": a.device_id, "facts": a.facts, "snapshot": a.snapshot(), "reported": a.reported().to_dict(),
            "journal": json.loads(journal.read_text()) if journal.exists() else None,
            "hold": a.hold_view(), "rejected": dict(a.rejected), "logs": RINGS.tail(a.device_id, None, 200)}
        while len(json.dumps(out, default=str)) > MAX_BUNDLE_BYTES and out["logs"]:
            out["logs"] = out["logs"][len(out["logs"]) // 2 + 1:]  # the newest half: stay one MQTT message
        return out

    async def _restart_module(self, args: dict[str, Any]) -> dict[str, Any]:
        name = args["module"]
        if name not in self.agent.active:
            raise ValueError(f"module {name!r} is not running here (running: {sorted(self.agent.active)})")
        self.agent.executor.deactivate(name)
        await self.agent.executor.activate(name)
        return {"module": name, "restarted": True, "running": name in self.agent.active}
