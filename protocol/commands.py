"""Signed commands: diagnostics the hub asks of one device (its logs, a support bundle, a module restart).

The envelope (protocol §5a) is signed by the root's ``director`` role like a desired state, names one
device, and expires within :data:`MAX_COMMAND_LIFETIME_S`; the device answers with a ``CommandReply``
of the same ``id`` on its own ``cmd-res`` topic. Pure: the agent brings the root, the clock and the
ids it has already answered.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from protocol.encoding import ProtocolError
from protocol.names import check_name
from protocol.signing import Root, SignatureError

MAX_COMMAND_LIFETIME_S = 3600  # a leaked signed command is worthless after this
SIGNED_COMMANDS = ("logs", "support_bundle", "restart_module")


@dataclass(frozen=True)
class SignedCommand:
    id: str
    name: str
    args: dict[str, Any]
    expires: int


def verify_command(root: Root, envelope: Any, device_id: str, now: float) -> SignedCommand:
    """The command in ``envelope`` if the director signed it for ``device_id`` and it has not expired;
    else :class:`ProtocolError` with the reason."""
    try:
        signed = root.check_signatures(envelope, "director")
    except SignatureError as exc:
        raise ProtocolError(f"command refused: {exc}") from None
    if signed.get("type") != "command" or signed.get("v") != 1:
        raise ProtocolError("command refused: not a version 1 command document")
    if signed.get("device") != device_id:
        raise ProtocolError(f"command refused: it is for device {signed.get('device')!r}")
    expires = signed.get("expires")
    if not isinstance(expires, int) or isinstance(expires, bool) or expires <= now:
        raise ProtocolError("command refused: expired")
    if expires > now + MAX_COMMAND_LIFETIME_S:
        raise ProtocolError(f"command refused: expires more than {MAX_COMMAND_LIFETIME_S}s ahead")
    name, args, cid = signed.get("name"), signed.get("args", {}), signed.get("id")
    if name not in SIGNED_COMMANDS or not isinstance(args, dict) or not isinstance(cid, str):
        raise ProtocolError(f"command refused: unknown command {name!r} (known: {', '.join(SIGNED_COMMANDS)})")
    check_name(cid, "command id")
    return SignedCommand(cid, name, args, expires)
