"""The model registry over HTTP."""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Depends, File, Form, Query, UploadFile
from fastapi.responses import FileResponse

from hub.auth import Principal, require
from hub.context import Hub
from hub.errors import Invalid
from hub.registry import Upload, parse_tags
from hub.routes import get_hub

router = APIRouter(prefix="/models", tags=["models"])


def _form_tags(values: list[str]) -> dict[str, str]:
    """Each value is ``k=v`` or a JSON object of tags."""
    tags: dict[str, str] = {}
    for value in values:
        if value.lstrip().startswith("{"):
            try:
                parsed = json.loads(value)
            except ValueError as exc:
                raise Invalid(f"tags is not a JSON object: {exc}") from None
            if not isinstance(parsed, dict):
                raise Invalid("tags must be a JSON object")
            tags.update({str(k): str(v) for k, v in parsed.items()})
        else:
            tags.update(parse_tags([value]))
    return tags


@router.post("")
def register_model(
    name: str = Form(...),
    files: list[UploadFile] = File(...),
    tag: list[str] = Form(default=[]),
    tags: list[str] = Form(default=[]),
    description: str = Form(default=""),
    hub: Hub = Depends(get_hub),
    who: Principal = Depends(require("operator")),
) -> dict[str, Any]:
    """Register model files as version N+1 of ``name``; the main file is loaded in its runtime first."""
    uploads = [Upload(f.filename or "", f.file) for f in files]
    return hub.registry.register(name, uploads, _form_tags(tag + tags), description, who.name)


@router.get("", dependencies=[Depends(require("viewer"))])
def list_models(name: str | None = None, tag: list[str] = Query(default=[]), framework: str | None = None,
                hub: Hub = Depends(get_hub)) -> list[dict[str, Any]]:
    return hub.registry.list(name, parse_tags(tag), framework)


@router.get("/{name}/versions/{version}", dependencies=[Depends(require("viewer"))])
def get_model(name: str, version: int, hub: Hub = Depends(get_hub)) -> dict[str, Any]:
    return hub.registry.get(name, version)


@router.get("/{name}/versions/{version}/files/{path:path}", dependencies=[Depends(require("viewer"))])
def download_model_file(name: str, version: int, path: str, hub: Hub = Depends(get_hub)) -> FileResponse:
    return FileResponse(hub.registry.file_path(name, version, path), filename=path.rsplit("/", 1)[-1],
                        media_type="application/octet-stream")
