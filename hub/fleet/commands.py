"""Diagnostic commands to one device (protocol §5a): signed here, answered by the device, stored here.

``send`` records the command, signs it with the director key for that device (expiring in ``ttl_s``)
and publishes it on the device's ``cmd`` topic; the bridge hands each ``CommandReply`` to ``replied``,
which stores the result if it came from that device for a command still waiting. The CLI polls ``get``.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

from hub.audit import record
from hub.errors import Invalid, NotFound
from hub.store import Database, dumps, loads, now
from hub.trust.keys import KeyRing
from protocol.commands import MAX_COMMAND_LIFETIME_S, SIGNED_COMMANDS
from protocol.encoding import canonical_json
from protocol.messages import CommandReply
from protocol.signing import sign
from protocol.topics import Channel, device_topic

log = logging.getLogger("edgefleet.hub.commands")

MAX_RESULT_BYTES = 1_000_000


def command_row(row: dict[str, Any]) -> dict[str, Any]:
    return {"id": row["id"], "device": row["device"], "name": row["name"], "args": loads(row["args"], {}),
            "state": row["state"] if row["state"] != "sent" or row["expires"] > time.time() else "expired",
            "result": loads(row["result"]), "error": row["error"], "created_at": row["created_at"],
            "created_by": row["created_by"], "expires": row["expires"], "replied_at": row["replied_at"]}


class DeviceCommands:
    def __init__(self, db: Database, keys: KeyRing, publish: Callable[[str, bytes, int, bool], None]) -> None:
        self.db, self.keys, self.publish = db, keys, publish

    def send(self, device: str, name: str, args: dict[str, Any], actor: str, ttl_s: int = 600) -> dict[str, Any]:
        if name not in SIGNED_COMMANDS:
            raise Invalid(f"unknown command {name!r}: {', '.join(SIGNED_COMMANDS)}")
        if not 0 < ttl_s <= MAX_COMMAND_LIFETIME_S:
            raise Invalid(f"a command lives 1..{MAX_COMMAND_LIFETIME_S} seconds")
        if self.db.one("SELECT 1 FROM devices WHERE id = ?", (device,)) is None:
            raise NotFound(f"device {device!r} is not enrolled")
        cid, expires = uuid.uuid4().hex, int(time.time()) + ttl_s
        envelope = sign({"type": "command", "v": 1, "id": cid, "device": device, "name": name, "args": args,
                         "expires": expires}, [self.keys.key("director")])
        with self.db.transaction() as tx:
            tx.insert("device_commands", {"id": cid, "device": device, "name": name, "args": dumps(args),
                                          "state": "sent", "created_at": now(), "created_by": actor,
                                          "expires": expires, "error": ""})
            record(self.db, actor, f"device.command.{name}", device, command=cid, args=args)
        self.publish(device_topic(device, Channel.CMD), canonical_json(envelope), 1, False)
        return self.get(cid)

    def replied(self, device: str, msg: CommandReply) -> None:
        """A device's answer: stored if it is that device's command and still waiting (else ignored, logged)."""
        result = dumps(msg.result)
        if len(result) > MAX_RESULT_BYTES:
            result, error = dumps(None), f"result of {len(result)} bytes refused (at most {MAX_RESULT_BYTES})"
        else:
            error = msg.error
        with self.db.transaction() as tx:
            n = tx.execute("UPDATE device_commands SET state = ?, result = ?, error = ?, replied_at = ?"
                           " WHERE id = ? AND device = ? AND state = 'sent'",
                           ("done" if msg.ok and not error else "failed", result, error, now(), msg.id, device)).rowcount
        if n == 0 and self.db.one("SELECT 1 FROM device_commands WHERE id = ?", (msg.id,)) is not None:
            log.warning("reply to command %s from %s ignored: not its command, or answered already", msg.id, device)

    def get(self, cid: str) -> dict[str, Any]:
        row = self.db.one("SELECT * FROM device_commands WHERE id = ?", (cid,))
        if row is None:
            raise NotFound(f"command {cid!r} does not exist")
        return command_row(row)

    def list(self, device: str, limit: int = 50) -> list[dict[str, Any]]:
        return [command_row(r) for r in self.db.query(
            "SELECT * FROM device_commands WHERE device = ? ORDER BY created_at DESC LIMIT ?", (device, limit))]
