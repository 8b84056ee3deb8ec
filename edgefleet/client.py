"""A small HTTP client for the hub API, used by the CLI and the demo."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx


class HubError(RuntimeError):
    """The hub refused a call or could not be reached; the text says which and why."""


class HubClient:
    def __init__(self, base_url: str, token: str | None, timeout: float = 30.0) -> None:
        self.base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> HubClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
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
                       description: str = "") -> Any:
        handles = [p.open("rb") for p in paths]
        try:
            files = [("files", (p.name, h, "application/octet-stream")) for p, h in zip(paths, handles)]
            data: dict[str, Any] = {"name": name, "description": description,
                                    "tag": [f"{k}={v}" for k, v in (tags or {}).items()]}
            return self.request("POST", "/api/v1/models", data=data, files=files)
        finally:
            for h in handles:
                h.close()
