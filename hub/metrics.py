"""Prometheus text exposition, written by hand (no client library needed for a few counters)."""

from __future__ import annotations

from hub.context import Hub
from protocol.topics import DEVICE_TO_HUB


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render(hub: Hub) -> str:
    bridge = hub.bridge
    lines: list[str] = []

    def family(name: str, kind: str, help_text: str, samples: list[tuple[dict[str, str], float]]) -> None:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            label_text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
            lines.append(f"{name}{{{label_text}}} {value:g}" if label_text else f"{name} {value:g}")

    # every device channel appears, at zero too, so rate() works from the first scrape
    channels = sorted({ch.value for ch in DEVICE_TO_HUB} | set(bridge.received) | set(bridge.rejected))
    family("edgefleet_hub_messages_received_total", "counter", "MQTT messages received from devices.",
           [({"channel": c}, bridge.received.get(c, 0)) for c in channels])
    family("edgefleet_hub_messages_rejected_total", "counter", "MQTT messages refused (invalid, unknown device, ...).",
           [({"channel": c}, bridge.rejected.get(c, 0)) for c in channels])
    total = hub.db.scalar("SELECT count(*) FROM devices") or 0
    online = hub.db.scalar("SELECT count(*) FROM devices WHERE online = 1") or 0
    family("edgefleet_hub_devices", "gauge", "Enrolled devices by connection state.",
           [({"state": "online"}, online), ({"state": "offline"}, total - online)])
    family("edgefleet_hub_telemetry_rows_total", "counter", "Telemetry points stored (replays not counted).",
           [({}, bridge.telemetry_rows)])
    family("edgefleet_hub_blob_bytes_sent_total", "counter", "Bundle bytes published over MQTT.",
           [({}, bridge.blob_bytes_sent)])
    family("edgefleet_hub_mqtt_connected", "gauge", "1 while the hub is connected and subscribed.",
           [({}, 1 if bridge.connected else 0)])
    if hub.config.ingest_workers:  # the workers save their counters in the database every second
        workers = hub.db.query("SELECT idx, received, rejected FROM ingest_workers ORDER BY idx")
        family("edgefleet_hub_ingest_worker_messages_total", "counter", "Messages handled by each ingest worker.",
               [({"worker": str(w["idx"]), "outcome": o}, w[o]) for w in workers for o in ("received", "rejected")])
    return "\n".join(lines) + "\n"
