"""A small HTTP client for the hub API, used by the CLI and the demo."""

from __future__ import annotations

import json as jsonlib
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from modules.bundle import ROOT_FILE, ROOTS_DIR, explain_revoked, pull_bundle, walk_roots
from protocol.encoding import ProtocolError, canonical_json
from protocol.manifest import FileEntry, Manifest
from protocol.signing import MAX_ENVELOPE_BYTES, Root, load_trusted_root

if TYPE_CHECKING:  # httpx is imported where a call is made: every CLI command starts without it
    import httpx


class HubError(RuntimeError):
    """The hub refused a call or could not be reached; the text says which and why."""


class HubClient:
    def __init__(self, base_url: str, token: str | None, timeout: float = 30.0, ca: str | None = None) -> None:
        """``ca``: a PEM file of the CA to trust for an https:// hub (the hub's own is DATA/tls/ca.pem)."""
        self.base_url = base_url.rstrip("/")
        import httpx

        headers = {"Authorization": f"Bearer {token}"} if token else {}
        verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=ca) if ca else True
        self.http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout, verify=verify)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> HubClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        import httpx

        try:
            resp = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise HubError(f"cannot reach the hub at {self.base_url}: {exc}") from None
        if resp.status_code >= 400:
            try:
                detail = resp.json().get("detail", resp.text)
            except ValueError:
                detail = resp.text
            raise HubError(f"{method} {path} -> {resp.status_code}: {detail}")
        return resp.json() if resp.content else None

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params={k: v for k, v in params.items() if v is not None})

    def post(self, path: str, json: Any = None) -> Any:
        return self.request("POST", path, json=json)

    def register_model(self, name: str, paths: list[Path], tags: dict[str, str] | None = None,
                       description: str = "", *, properties: dict[str, Any] | None = None,
                       lineage: dict[str, str] | None = None, baseline: Path | None = None,
                       progress: Callable[[int], None] | None = None, names: list[str] | None = None) -> Any:
        """Upload files as the next version of ``name``; ``progress(n)`` hears of every n bytes sent.

        ``names`` are the files' paths in the model (``dir/sub/file`` keeps a model directory's layout);
        by default each file's own name.
        """
        handles: list[BinaryIO] = [ProgressReader(p.open("rb"), progress) for p in paths]  # type: ignore[list-item]
        try:
            files = [("files", (n, h, "application/octet-stream"))
                     for n, h in zip(names or [p.name for p in paths], handles)]
            if baseline is not None:
                handles.append(baseline.open("rb"))
                files.append(("baseline_file", (baseline.name, handles[-1], "application/octet-stream")))
            data: dict[str, Any] = {"name": name, "description": description,
                                    "tag": [f"{k}={v}" for k, v in (tags or {}).items()], **(lineage or {})}
            if properties:
                data["properties"] = jsonlib.dumps(properties)
            return self.request("POST", "/api/v1/models", data=data, files=files)
        finally:
            for h in handles:
                h.close()

    def stream(self, path: str, limit: int | None = None) -> Iterator[bytes]:
        """GET ``path`` as a stream of blocks; with ``limit``, refuse to read more than that many bytes."""
        with self.http.stream("GET", path) as resp:
            if resp.status_code >= 400:
                resp.read()
                self._raise(resp, "GET", path)
            seen = 0
            for block in resp.iter_bytes():
                seen += len(block)
                if limit is not None and seen > limit:
                    raise ProtocolError(f"GET {path} sent more than {limit} bytes (oversize)")
                yield block

    def get_json_limited(self, path: str, limit: int = MAX_ENVELOPE_BYTES) -> Any:
        """A JSON document of at most ``limit`` bytes (signed metadata: refuse endless data before parsing)."""
        import httpx

        try:
            return jsonlib.loads(b"".join(self.stream(path, limit)))
        except httpx.HTTPError as exc:
            raise HubError(f"cannot reach the hub at {self.base_url}: {exc}") from None
        except ValueError as exc:
            raise ProtocolError(f"GET {path} is not JSON: {exc}") from None

    def download(self, path: str, dest: Path, progress: Callable[[int], None] | None = None) -> int:
        """Stream ``path`` into ``dest`` (written beside, then renamed); returns the byte count."""
        tmp = dest.with_name(dest.name + ".partial")
        size = 0
        try:
            with tmp.open("wb") as out:
                for block in self.stream(path):
                    out.write(block)
                    size += len(block)
                    if progress:
                        progress(len(block))
            tmp.replace(dest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return size

    def post_download(self, path: str, json: Any, dest: Path) -> tuple[int, dict[str, str]]:
        """POST ``json`` and stream the answer into ``dest`` (written beside, then renamed): (bytes, headers)."""
        import httpx

        tmp = dest.with_name(dest.name + ".partial")
        size = 0
        try:
            with self.http.stream("POST", path, json=json) as resp:
                if resp.status_code >= 400:
                    resp.read()
                    self._raise(resp, "POST", path)
                with tmp.open("wb") as out:
                    for block in resp.iter_bytes():
                        out.write(block)
                        size += len(block)
                headers = dict(resp.headers)
            tmp.replace(dest)
        except httpx.HTTPError as exc:
            tmp.unlink(missing_ok=True)
            raise HubError(f"cannot reach the hub at {self.base_url}: {exc}") from None
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return size, headers

    def pull_bundle(self, name: str, version: int, dest: Path, pinned: Any | None = None) -> Manifest:
        """Fetch module ``name:version`` into ``dest`` and verify it, or leave ``dest`` as it was.

        ``pinned`` is the root envelope to trust; the hub's current root is accepted
        only if it follows from it (each version signed by the one before). Without
        ``pinned`` the hub's root is trusted on first use.
        """
        hub_root = self.get_json_limited("/api/v1/root")
        trusted: Root = load_trusted_root(pinned if pinned is not None else hub_root)
        chain: dict[int, Any] = {}
        hub_version = hub_root.get("signed", {}).get("version") if isinstance(hub_root, dict) else None
        if not isinstance(hub_version, int):
            raise ProtocolError("the hub's root document has no integer version")
        for v in range(trusted.version + 1, hub_version):
            chain[v] = self.get_json_limited(f"/api/v1/roots/{v}")
        chain[hub_version] = hub_root
        trusted, history = walk_roots(trusted, [chain[v] for v in sorted(chain)])
        info = self.get_json_limited(f"/api/v1/modules/{name}/versions/{version}")
        digest = info.get("digest", "") if isinstance(info, dict) else ""
        envelope = self.get_json_limited(f"/api/v1/bundles/{digest}/release")

        def fetch(entry: FileEntry) -> Iterator[bytes]:
            # one byte more than listed is enough to know the file is too long
            return self.stream(f"/api/v1/bundles/{digest}/files/{entry.path}", limit=entry.size + 1)

        extra = {ROOT_FILE: canonical_json(hub_root)}
        extra |= {f"{ROOTS_DIR}/{v}.json": canonical_json(doc) for v, doc in chain.items()}
        try:
            return pull_bundle(dest, envelope, trusted, fetch, digest=digest, name=name, version=version, extra=extra)
        except ProtocolError as exc:
            raise explain_revoked(exc, envelope, "release", history) from None

    def _raise(self, resp: httpx.Response, method: str, path: str) -> None:
        try:
            detail = resp.json().get("detail", resp.text)
        except ValueError:
            detail = resp.text
        raise HubError(f"{method} {path} -> {resp.status_code}: {detail}")


class ProgressReader:
    """A file wrapper that reports the bytes read through it (upload progress bars)."""

    def __init__(self, f: BinaryIO, progress: Callable[[int], None] | None) -> None:
        self._f, self._progress = f, progress

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        if self._progress and data:
            self._progress(len(data))
        return data

    def __getattr__(self, name: str) -> Any:  # seek, tell, fileno, name, close: the real file's
        return getattr(self._f, name)
