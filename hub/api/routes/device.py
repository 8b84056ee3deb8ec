"""Routes for devices themselves (not operators): bundle download over HTTP(S), authenticated as the device."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import StreamingResponse

from hub.api.deps import current_device, get_hub
from hub.context import Hub
from hub.fleet.device_http import RangeNotSatisfiable, parse_range

router = APIRouter(prefix="/device", tags=["device"])

@router.get("/bundles/{digest}/release", dependencies=[Depends(current_device)])
def device_release(digest: str, hub: Hub = Depends(get_hub)) -> Response:
    """The signed release envelope, byte for byte what the MQTT path publishes; the device verifies it."""
    return Response(hub.downloads.release(digest), media_type="application/json")


@router.get("/chunks/{digest}", dependencies=[Depends(current_device)])
def device_chunk(digest: str, request: Request, hub: Hub = Depends(get_hub)) -> Response:
    """One chunk's bytes from the content store, streamed; a single ``Range`` resumes a partial chunk.

    The bytes are not hashed here: the device checks every chunk against its digest before storing it.
    """
    downloads = hub.downloads
    span = downloads.chunk(digest)
    header = request.headers.get("range")
    try:
        part = parse_range(header, span.length)
    except RangeNotSatisfiable:
        raise downloads.range_refused(span, header or "") from None
    f = downloads.open(span)
    start, end = part or (0, span.length)
    headers = {"Content-Length": str(end - start), "Accept-Ranges": "bytes", "ETag": f'"{digest}"'}
    if part is not None:
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{span.length}"
    return StreamingResponse(downloads.stream(f, span.offset + start, end - start), status_code=206 if part else 200,
                             headers=headers, media_type="application/octet-stream")
