"""What the hub announces to every device on connect: its presence, and every root of trust it has published.

* ``edgefleet/v1/hub/status`` (retained ``HubStatus``; the bridge's last will says offline): devices hold
  their telemetry outbox while the hub is away, so batches are not handed to a broker nobody reads.
* ``edgefleet/v1/root/{version}`` (retained, one per version): a device pinned to root N applies N+1,
  N+2, ... in order with ``protocol.signing.update_root``, even after missing several rotations.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from protocol.encoding import canonical_json
from protocol.messages import HubStatus
from protocol.topics import HUB_STATUS_TOPIC, root_topic

log = logging.getLogger("edgefleet.hub.roots")

Publish = Callable[..., Any]  # (topic, payload, qos=1, retain=True)


def offline_will() -> tuple[str, bytes]:
    return HUB_STATUS_TOPIC, HubStatus(online=False).encode()


def root_chain(keys_dir: Path) -> dict[int, dict[str, Any]]:
    """Every root envelope the hub kept (``keys/roots/<v>.json`` and the current ``keys/root.json``), by version."""
    chain: dict[int, dict[str, Any]] = {}
    paths = [*sorted((keys_dir / "roots").glob("*.json")), keys_dir / "root.json"]
    for path in paths:
        try:
            envelope = json.loads(path.read_text())
            chain[int(envelope["signed"]["version"])] = envelope
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("root file %s unreadable (%s): not published", path, exc)
    return chain


def publish_roots(publish: Publish, keys_dir: Path) -> int:
    """Publish every root version retained on its own topic, oldest first; returns the newest version."""
    chain = root_chain(keys_dir)
    for version in sorted(chain):
        publish(root_topic(version), canonical_json(chain[version]), qos=1, retain=True)
    return max(chain, default=0)


def announce(publish: Publish, keys_dir: Path) -> None:
    """On every (re)connect, once subscribed: the roots first, then "online" (devices may now send)."""
    publish_roots(publish, keys_dir)
    publish(HUB_STATUS_TOPIC, HubStatus(online=True, ts=time.time()).encode(), qos=1, retain=True)
