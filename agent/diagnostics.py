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


class LogRing(logging.Handler):
    """The last :data:`LOG_LINES` records that concern one device: logged by its agent's tasks, or naming it."""

    def __init__(self, device_id: str) -> None:
        super().__init__(logging.DEBUG)
        self.device_id = device_id
        self.lines: collections.deque[str] = collections.deque(maxlen=LOG_LINES)
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            if DEVICE.get() == self.device_id or self.device_id in record.getMessage():
                self.lines.append(self.format(record))
        except Exception:  # a log line must never break the agent
            self.handleError(record)

    def tail(self, module: str | None, n: int) -> list[str]:
        lines = [line for line in self.lines if module is None or module in line]
        return lines[-max(1, min(n, MAX_LINES)):]


class Diagnostics:
    def __init__(self, agent: Host) -> None:
        self.agent = agent
        self.ring = LogRing(agent.device_id)
        self.seen: collections.OrderedDict[str, None] = collections.OrderedDict()
        logging.getLogger("edgefleet").addHandler(self.ring)

    def close(self) -> None:
        logging.getLogger("edgefleet").removeHandler(self.ring)

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
        return {"module": module, "lines": self.ring.tail(module, int(args.get("lines", 200)))}

    async def _support_bundle(self, args: dict[str, Any]) -> dict[str, Any]:
        a = self.agent
        journal = a.data_dir / "journal.json"
        out: dict[str, Any] = {
            "device": a.device_id, "facts": a.facts, "snapshot": a.snapshot(), "reported": a.reported().to_dict(),
            "journal": json.loads(journal.read_text()) if journal.exists() else None,
            "hold": a.hold_view(), "rejected": dict(a.rejected), "logs": self.ring.tail(None, 200)}
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
