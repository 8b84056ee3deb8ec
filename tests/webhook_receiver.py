"""A real HTTP server receiving webhook deliveries, for the tests: every request's headers and raw body."""

from __future__ import annotations

import hashlib
import hmac
import json
import queue
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Delivery:
    headers: dict[str, str]
    raw: bytes

    @property
    def body(self) -> dict[str, Any]:
        return json.loads(self.raw)

    def signed_with(self, secret: str) -> bool:
        """Checked here with the standard library alone, as a receiver would (not with the hub's own code)."""
        expected = "sha256=" + hmac.new(secret.encode(), self.raw, hashlib.sha256).hexdigest()
        return hmac.compare_digest(expected, self.headers.get("x-edgefleet-signature", ""))


class Receiver:
    """Answers 500 to the first ``fail_first`` requests, then 204; ``received`` gets each accepted delivery."""

    def __init__(self, fail_first: int = 0) -> None:
        self.received: queue.Queue[Delivery] = queue.Queue()
        self.attempts = 0
        self._lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's naming)
                raw = self.rfile.read(int(self.headers["Content-Length"]))
                with outer._lock:
                    outer.attempts += 1
                    refuse = outer.attempts <= fail_first
                self.send_response(500 if refuse else 204)
                self.end_headers()
                if not refuse:
                    outer.received.put(Delivery({k.lower(): v for k, v in self.headers.items()}, raw))

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/edgefleet"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def take(self, n: int, timeout: float = 30.0) -> list[Delivery]:
        return [self.received.get(timeout=timeout) for _ in range(n)]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
