"""Run the hub under uvicorn: in a background thread (tests, demo) or in the foreground (CLI)."""

from __future__ import annotations

import logging
import socket
import threading
import time
from pathlib import Path

import httpx
import uvicorn

from hub.api.app import create_app
from hub.config import HubConfig
from hub.context import Hub

log = logging.getLogger("edgefleet.hub.server")


class HubServer:
    """``start()`` returns once ``/healthz`` answers; ``stop()`` shuts uvicorn and the bridge and frees the port.

    >>> server = HubServer(HubConfig(data_dir, "mqtt://127.0.0.1:1883")).start()
    >>> httpx.get(server.url + "/api/v1/devices", headers={"Authorization": f"Bearer {server.admin_token}"})
    >>> server.stop()
    """

    def __init__(self, config: HubConfig, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning",
                 tls: tuple[Path, Path] | None = None) -> None:
        """``tls``: (certificate, key) PEM files: serve HTTPS."""
        self.config = config
        self.app = create_app(config)
        self._socket = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # bind here, so port 0 gives a known free port with no race between choosing and listening
        self._socket.bind((host, port))
        self.host, self.port, self.tls = host, self._socket.getsockname()[1], tls
        self._server = uvicorn.Server(uvicorn.Config(self.app, host=host, port=self.port, log_level=log_level,
                                                     **ssl_options(tls)))
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}"

    @property
    def hub(self) -> Hub:
        """The running hub (services, bridge, database), for tests and the demo."""
        return self.app.state.hub

    @property
    def admin_token(self) -> str | None:
        return self.hub.admin_token

    def start(self, timeout: float = 30.0) -> HubServer:
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]},
                                        name="hub-uvicorn", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self._thread.is_alive():
                raise RuntimeError("hub server exited during start-up (see the log)")
            try:  # is it up? (its certificate is checked by the clients that use it, not here)
                if httpx.get(self.url + "/healthz", timeout=1.0, verify=False).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"hub did not answer /healthz within {timeout}s")

    def wait_mqtt(self, timeout: float = 10.0) -> bool:
        """Wait until the bridge is connected and subscribed."""
        return self.hub.bridge.wait_ready(timeout)

    def stop(self, timeout: float = 15.0) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
        self._socket.close()

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def ssl_options(tls: tuple[Path, Path] | None) -> dict[str, str]:
    return {"ssl_certfile": str(tls[0]), "ssl_keyfile": str(tls[1])} if tls else {}


def serve_forever(config: HubConfig, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
                  tls: tuple[Path, Path] | None = None) -> None:
    """Serve in the foreground until Ctrl-C/SIGTERM; uvicorn's lifespan stops the bridge cleanly. ``tls``: HTTPS."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    server = uvicorn.Server(uvicorn.Config(create_app(config), host=host, port=port, log_level=log_level,
                                           **ssl_options(tls)))
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C after its graceful shutdown; the hub is already stopped
        pass
