#!/usr/bin/env python3
"""Start the retraining job when the hub says a model's inputs drifted: a tiny webhook receiver.

    EDGEFLEET_WEBHOOK_SECRET=... python examples/ci/retrain_receiver.py --port 8099 -- examples/ci/pipeline.sh

Subscribe it on the hub (the secret is shared by both ends):

    edgefleet alert add churn-drift --kind drift --deployment churn-edge --threshold 0.2 --window 10m
    edgefleet webhook add http://ci-runner:8099/ --event alert.fired --secret "$EDGEFLEET_WEBHOOK_SECRET"

Each delivery's ``X-Edgefleet-Signature`` (``sha256=`` HMAC-SHA256 of the raw body with the secret) is
checked before anything else: a bad or missing one gets 401. An ``alert.fired`` event of kind
``--kind`` (drift) for ``--deployment`` (any) starts the command once, with the event's JSON in
``EDGEFLEET_EVENT``; while it runs, further alerts are acknowledged and skipped (one retraining at a
time), and an event id seen before is acknowledged and ignored (the hub retries until it hears 2xx).
In GitHub Actions the command would trigger the workflow instead, e.g.
``gh workflow run mlops.yml`` or a ``repository_dispatch`` POST. Standard library only.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MAX_BODY = 1024 * 1024


def verify(secret: str, body: bytes, header: str | None) -> bool:
    """The recipe of docs/cicd.md: HMAC-SHA256 over the raw body, compared in constant time."""
    expected = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return header is not None and hmac.compare_digest(expected, header)


class Retrainer:
    def __init__(self, command: list[str], once: bool) -> None:
        self.command, self.once = command, once
        self.running = False
        self.seen: set[str] = set()
        self.lock = threading.Lock()
        self.exit_code: int | None = None
        self.done = threading.Event()

    def start(self, event: dict) -> str:
        with self.lock:
            if event["id"] in self.seen:
                return "duplicate"
            self.seen.add(event["id"])
            if self.running or (self.once and self.exit_code is not None):
                return "busy"
            self.running = True
        threading.Thread(target=self._run, args=(event,), daemon=True).start()
        return "started"

    def _run(self, event: dict) -> None:
        data = event.get("data", {})
        print(f"retraining: {data.get('message', event['event'])} (event {event['id']})", flush=True)
        code = subprocess.call(self.command, env=os.environ | {"EDGEFLEET_EVENT": json.dumps(event)})
        print(f"retraining finished: exit {code}", flush=True)
        with self.lock:
            self.running, self.exit_code = False, code
        if self.once:
            self.done.set()


def handler(secret: str, job: Retrainer, kinds: set[str], deployment: str | None) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY:
                return self._answer(413, "body too large")
            body = self.rfile.read(length)
            if not verify(secret, body, self.headers.get("X-Edgefleet-Signature")):
                return self._answer(401, "bad signature")
            event = json.loads(body)
            data = event.get("data", {})
            wanted = (event.get("event") == "alert.fired" and data.get("kind") in kinds
                      and deployment in (None, data.get("deployment")))
            if event.get("event") == "ping":
                return self._answer(200, "pong")
            if not wanted:
                return self._answer(200, "ignored")
            return self._answer(202, job.start(event))

        def _answer(self, status: int, text: str) -> None:
            payload = json.dumps({"status": text}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, fmt: str, *args: object) -> None:
            print(f"{self.address_string()} {fmt % args}", file=sys.stderr, flush=True)

    return Handler


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8099, help="0: any free port (printed)")
    ap.add_argument("--secret-env", default="EDGEFLEET_WEBHOOK_SECRET", help="environment variable with the secret")
    ap.add_argument("--kind", action="append", default=None, help="alert kinds that retrain (default: drift)")
    ap.add_argument("--deployment", default=None, help="only alerts of this deployment")
    ap.add_argument("--once", action="store_true", help="exit after the first job, with its exit code")
    ap.add_argument("command", nargs="+", help="the job to run, after --")
    args = ap.parse_args()
    secret = os.environ.get(args.secret_env, "")
    if len(secret) < 16:
        ap.error(f"set {args.secret_env} to the webhook's shared secret (16+ characters)")
    job = Retrainer(args.command, args.once)
    server = ThreadingHTTPServer((args.host, args.port), handler(secret, job, set(args.kind or ["drift"]),
                                                                 args.deployment))
    print(f"listening on http://{args.host}:{server.server_address[1]}/", flush=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        if args.once:
            job.done.wait()
            return job.exit_code or 0
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
