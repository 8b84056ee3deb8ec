"""System shared memory on the device's local API: the OIP v2 / Triton extension, for large local tensors.

    POST /v2/systemsharedmemory/region/{name}/register    {"key": "/shm-key", "offset": 0, "byte_size": N}
    POST /v2/systemsharedmemory/region/{name}/unregister  (POST /v2/systemsharedmemory/unregister: all the app's)
    GET  /v2/systemsharedmemory/region/{name}/status      (GET /v2/systemsharedmemory/status: all the app's)

An app puts its tensor in a POSIX shared memory object (``/dev/shm/<key>``), registers it once, then names it
in an inference's inputs and outputs (``parameters``: ``shared_memory_region``, ``shared_memory_byte_size``,
``shared_memory_offset``): the request carries only the JSON header, the module's worker reads the input in
place and writes the outputs into the region.

Checks (docs/security.md): a key is one name under /dev/shm (no slash, no ``..``), opened without following a
symlink, a regular file owned by the caller (on the Unix socket the peer's uid, SO_PEERCRED; on TCP the
agent's own uid), the registered bytes inside the file. A region belongs to the app that registered it (its
token on TCP, its uid on the Unix socket): only that app sees it, uses it or unregisters it. A uid's regions
are also passed to every module worker, whose direct socket lets that uid's connections name them. The agent opens
the file once and passes the open descriptor to module workers (SCM_RIGHTS); a worker never opens a path.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import stat
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from modules.httpwire import Answer, json_answer

if TYPE_CHECKING:
    from agent.workerproc import WorkerProcess

log = logging.getLogger("edgefleet.agent.api")

SHM_DIR = "/dev/shm"
PREFIX = "/v2/systemsharedmemory"
MAX_REGIONS = 64  # per app
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_KEY = re.compile(r"^/?([A-Za-z0-9_][A-Za-z0-9_.-]{0,200})$")


@dataclass
class Registered:
    name: str
    key: str
    offset: int
    size: int
    fd: int
    workers: list[WorkerProcess] = field(default_factory=list)  # those it was passed to

    def status(self) -> dict[str, Any]:
        return {"name": self.name, "key": self.key, "offset": self.offset, "byte_size": self.size}


def _once(detached: list[asyncio.Future[None]]) -> Answer | Coroutine[Any, Any, Answer]:
    """200 once the workers have detached: a request on a direct socket after the answer cannot use the region."""
    if not detached:
        return json_answer(200, {})

    async def answer() -> Answer:
        await asyncio.gather(*detached)
        return json_answer(200, {})

    return answer()


def _error(status: int, text: str) -> Answer:
    return json_answer(status, {"error": text})


class SharedMemory:
    """The regions registered on one listener, by app."""

    def __init__(self, shm_dir: str = SHM_DIR) -> None:
        self.shm_dir = shm_dir
        self.apps: dict[str, dict[str, Registered]] = {}
        self._serial = 0

    def route(self, method: str, path: str, body: bytes, app: str,
              owner: int) -> Answer | Coroutine[Any, Any, Answer] | None:
        """The answer to a ``/v2/systemsharedmemory`` route (``owner``: the uid the region's file must have), or a
        coroutine making it (an unregister, answered once the workers have let the region go); None for any other
        path."""
        if not path.startswith(PREFIX + "/"):
            return None
        rest = path[len(PREFIX) + 1:].split("/")
        regions = self.apps.get(app, {})
        if rest == ["status"] and method == "GET":
            return json_answer(200, [r.status() for r in regions.values()])
        if rest == ["unregister"] and method == "POST":
            return _once([f for name in list(regions) for f in self.unregister(app, name)])
        if len(rest) != 3 or rest[0] != "region" or rest[2] not in ("register", "unregister", "status"):
            return _error(404, f"no route {method} {path}")
        name, action = rest[1], rest[2]
        if (method == "GET") != (action == "status"):
            return _error(405, "use GET for status, POST to register or unregister")
        if action == "status":
            found = regions.get(name)
            return json_answer(200, [found.status()]) if found else _error(404, f"region {name!r} is not registered")
        if action == "unregister":
            return _once(self.unregister(app, name))
        return self.register(app, name, body, owner)

    def register(self, app: str, name: str, body: bytes, owner: int) -> Answer:
        import json

        try:
            doc = json.loads(body or b"{}")
        except ValueError:
            return _error(400, 'want {"key": "/shm-key", "offset": 0, "byte_size": N}')
        key, offset, size = (doc.get("key"), doc.get("offset", 0), doc.get("byte_size")) if isinstance(doc, dict) \
            else (None, None, None)
        if not _NAME.match(name):
            return _error(400, f"region name {name[:80]!r}: letters, digits, '_', '.', '-', at most 64")
        m = _KEY.match(key) if isinstance(key, str) else None
        if m is None or ".." in key:
            return _error(400, f"key {str(key)[:80]!r} is not one name under {self.shm_dir}")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (offset, size)) or offset < 0 or size <= 0:
            return _error(400, "offset must be >= 0 and byte_size > 0, integers")
        regions = self.apps.setdefault(app, {})
        if name in regions:
            return _error(400, f"region {name!r} is already registered: unregister it first")
        if len(regions) >= MAX_REGIONS:
            return _error(400, f"at most {MAX_REGIONS} regions per app")
        try:
            fd = os.open(os.path.join(self.shm_dir, m.group(1)), os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as exc:
            return _error(400, f"cannot open shared memory {key!r}: {exc.strerror}")
        st = os.fstat(fd)
        why = ("is not a regular file" if not stat.S_ISREG(st.st_mode)
               else f"is owned by uid {st.st_uid}, not the caller's ({owner})" if st.st_uid != owner
               else f"has {st.st_size} bytes: {size} at offset {offset} do not fit" if offset + size > st.st_size
               else "")
        if why:
            os.close(fd)
            return _error(400, f"shared memory {key!r} {why}")
        regions[name] = Registered(name, key, offset, size, fd)
        log.info("shared memory region %r (%s, %d bytes) registered by %s", name, key, size, app)
        return json_answer(200, {})

    def unregister(self, app: str, name: str) -> list[asyncio.Future[None]]:
        """Forget the region; the futures are done when each worker that had it has detached it (or died)."""
        region = self.apps.get(app, {}).pop(name, None)
        if region is None:
            return []
        detached = []
        for worker in region.workers:
            if worker.alive:
                done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                worker.call({"op": "shm_detach", "app": app, "name": name},
                            lambda frame, exc, done=done: done.done() or done.set_result(None))
                worker.regions.discard((app, name, region.fd))
                detached.append(done)
        os.close(region.fd)
        return detached

    def pass_to(self, worker: WorkerProcess | None, app: str) -> None:
        """Give ``worker`` the app's regions it does not have yet (ahead of the app's request, in the same queue)."""
        if worker is None or not worker.alive:
            return
        for region in self.apps.get(app, {}).values():
            if (app, region.name, region.fd) in worker.regions:
                continue
            worker.regions.add((app, region.name, region.fd))
            region.workers = [w for w in region.workers if w.alive] + [worker]
            # a copy of the descriptor, closed once sent: an unregister meanwhile cannot close it under the queue
            fd = os.dup(region.fd)
            worker.call({"op": "shm_attach", "app": app, "name": region.name, "offset": region.offset,
                         "size": region.size}, lambda frame, exc, fd=fd: os.close(fd), fds=(fd,))

    def close(self) -> None:
        for app in list(self.apps):
            for name in list(self.apps[app]):
                self.unregister(app, name)
