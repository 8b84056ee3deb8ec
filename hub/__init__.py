"""The edgefleet hub: registry, signed bundles, fleet and desired state over MQTT, ingest and monitoring."""

from hub.api.app import create_app
from hub.config import HubConfig
from hub.server import HubServer, serve_forever

__all__ = ["HubConfig", "HubServer", "create_app", "serve_forever"]
