"""The model registry over HTTP."""

from __future__ import annotations

import io
import json
from typing import Any

from fastapi import APIRouter, Depends, File, Form, Query, Response, UploadFile
from fastapi.responses import FileResponse
from pydantic import BaseModel, Field

from hub.api.deps import Principal, get_hub, require
from hub.bounds import MAX_LABELS, MAX_TEXT, Key, Keys, NamePath, Value, Version, check_labels
from hub.context import Hub
from hub.errors import Invalid
from hub.registry.models import MAX_LIMIT, Upload, parse_tags

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
    return check_labels(tags, "tags")


def _json_object(field: str, value: str) -> dict[str, Any]:
    try:
        parsed = json.loads(value)
    except ValueError as exc:
        raise Invalid(f"{field} is not JSON: {exc}") from None
    if not isinstance(parsed, dict):
        raise Invalid(f"{field} must be a JSON object")
    return parsed


@router.post("")
def register_model(
    name: str = Form(...),
    files: list[UploadFile] = File(...),
    tag: list[str] = Form(default=[], max_length=MAX_LABELS),
    tags: list[str] = Form(default=[], max_length=MAX_LABELS),
    description: str = Form(default=""),
    properties: str = Form(default="", description="JSON object of free-form properties"),
    parent: str = Form(default="", description="lineage: NAME:VERSION (or VERSION of this model)"),
    dataset: str = Form(default="", description="lineage: dataset reference"),
    training_run: str = Form(default="", description="lineage: training-run reference"),
    baseline: str = Form(default="", description="JSON object: baseline statistics for drift monitoring"),
    baseline_file: UploadFile | None = File(default=None, description="baseline statistics or reference data"),
    hub: Hub = Depends(get_hub),
    who: Principal = Depends(require("operator")),
) -> dict[str, Any]:
    """Register model files as version N+1 of ``name``; the main file is loaded in its runtime first."""
    uploads = [Upload(f.filename or "", f.file) for f in files]
    if baseline and baseline_file is not None:
        raise Invalid("give baseline or baseline_file, not both")
    baseline_stream = baseline_file.file if baseline_file is not None else None
    if baseline:
        _json_object("baseline", baseline)
        baseline_stream = io.BytesIO(baseline.encode())
    model = hub.registry.register(
        name, uploads, _form_tags(tag + tags), description, who.name,
        properties=_json_object("properties", properties) if properties else None,
        lineage={"parent": parent, "dataset": dataset, "training_run": training_run}, baseline=baseline_stream)
    return model  # audited as model.registered by the registry, in the registration's transaction


@router.get("", dependencies=[Depends(require("viewer"))])
def list_models(response: Response, name: str | None = None, tag: list[str] = Query(default=[]),
                framework: str | None = None, limit: int = Query(default=100, ge=1, le=MAX_LIMIT),
                offset: int = Query(default=0, ge=0), hub: Hub = Depends(get_hub)) -> list[dict[str, Any]]:
    """Newest first; ``tag=k=v`` repeats (all must match). The total is in the ``X-Total-Count`` header."""
    page, total = hub.registry.search(name, parse_tags(tag), framework, limit, offset)
    response.headers["X-Total-Count"] = str(total)
    return page


class ModelPatch(BaseModel):
    tags: dict[Key, Value] = Field(default_factory=dict, max_length=MAX_LABELS, description="tags to set")
    remove_tags: Keys = Field(default_factory=list, description="tag keys to remove")
    description: str | None = Field(default=None, max_length=MAX_TEXT)
    properties: dict[Key, Any] | None = Field(default=None, max_length=256,
                                              description="merged in; a null value removes the key")


@router.patch("/{name}/versions/{version}", dependencies=[Depends(require("operator"))])
def patch_model(name: NamePath, version: Version, body: ModelPatch, hub: Hub = Depends(get_hub)) -> dict[str, Any]:
    """Edit tags, description and properties (files, signature and lineage never change)."""
    return hub.registry.update(name, version, body.tags, body.remove_tags, body.description, body.properties)


@router.delete("/{name}/versions/{version}")
def delete_model(name: NamePath, version: Version, hub: Hub = Depends(get_hub),
                 who: Principal = Depends(require("operator"))) -> dict[str, Any]:
    """Delete a version; 409 naming the deployments while one uses a module built from it."""
    return hub.registry.delete(name, version, who.name)


@router.get("/{name}/versions/{version}/baseline", dependencies=[Depends(require("viewer"))])
def download_baseline(name: NamePath, version: Version, hub: Hub = Depends(get_hub)) -> FileResponse:
    return FileResponse(hub.registry.baseline_path(name, version), media_type="application/octet-stream")


@router.get("/{name}/versions/{version}", dependencies=[Depends(require("viewer"))])
def get_model(name: NamePath, version: Version, hub: Hub = Depends(get_hub)) -> dict[str, Any]:
    return hub.registry.get(name, version)


@router.get("/{name}/versions/{version}/files/{path:path}", dependencies=[Depends(require("viewer"))])
def download_model_file(name: NamePath, version: Version, path: str, hub: Hub = Depends(get_hub)) -> FileResponse:
    return FileResponse(hub.registry.file_path(name, version, path), filename=path.rsplit("/", 1)[-1],
                        media_type="application/octet-stream")


# --- aliases (hub/registry/aliases.py) ------------------------------------------------------------


@router.get("/{name}/aliases", dependencies=[Depends(require("viewer"))])
def list_aliases(name: str, hub: Hub = Depends(get_hub)) -> list[dict[str, Any]]:
    return hub.aliases.list(name)


@router.get("/{name}/aliases/{alias}", dependencies=[Depends(require("viewer"))])
def get_alias(name: str, alias: str, hub: Hub = Depends(get_hub)) -> dict[str, Any]:
    """The model version ``name@alias`` names (``@latest``: the newest version)."""
    return hub.registry.get(name, hub.aliases.get(name, alias))


class AliasRequest(BaseModel):
    version: int = Field(ge=1)
    expect: int | None = Field(default=None, ge=0, description="move only if the alias now names this version "
                                                                 "(0: only if it is not set yet); 409 otherwise")


@router.put("/{name}/aliases/{alias}")
def set_alias(name: str, alias: str, body: AliasRequest, hub: Hub = Depends(get_hub),
              who: Principal = Depends(require("operator"))) -> dict[str, Any]:
    """Point the alias at a version (an ``alias.moved`` event when it moves)."""
    return hub.aliases.set(name, alias, body.version, who.name, body.expect)


@router.delete("/{name}/aliases/{alias}")
def delete_alias(name: str, alias: str, expect: int | None = Query(default=None, ge=1), hub: Hub = Depends(get_hub),
                 who: Principal = Depends(require("operator"))) -> dict[str, Any]:
    return hub.aliases.delete(name, alias, who.name, expect)


# --- recorded evaluations (hub/registry/evaluations.py) -------------------------------------------


class MetricsRequest(BaseModel):
    metrics: dict[str, float] = Field(description='{"accuracy": 0.93, "f1": 0.91}')
    dataset: dict[str, Any] = Field(default_factory=dict,
                                    description='what was measured on: {"name", "sha256", "rows", "label"}')


@router.post("/{name}/versions/{version}/metrics", status_code=201)
def record_metrics(name: str, version: int, body: MetricsRequest, hub: Hub = Depends(get_hub),
                   who: Principal = Depends(require("operator"))) -> dict[str, Any]:
    """Record an evaluation of a model version (its metrics on a data set)."""
    return hub.evaluations.record(name, version, body.metrics, body.dataset, who.name)


@router.get("/{name}/versions/{version}/metrics", dependencies=[Depends(require("viewer"))])
def list_metrics(name: str, version: int, dataset_sha256: str | None = None,
                 hub: Hub = Depends(get_hub)) -> list[dict[str, Any]]:
    """Recorded evaluations, newest first (only those on one data set with ``dataset_sha256``)."""
    return hub.evaluations.list(name, version, dataset_sha256)
