"""Inputs given as http(s) URLs: streamed once into the job's directory, size-capped, then scored as a file.

The copy is written beside its final name and renamed when complete, so a resumed job finds the
same file (same size and time: the job record matches) and does not fetch it again; a half-fetched
copy is fetched afresh.
"""

from __future__ import annotations

import os
import urllib.parse
from pathlib import Path

from modules.batch.columns import BatchError

INPUT_DIR = "_edgefleet_input"
CHUNK = 1 << 20
DEFAULT_MAX_BYTES = 20 * 1024**3


def is_url(text: str) -> bool:
    return text.startswith(("http://", "https://"))


def file_name(url: str) -> str:
    """The copy's name: the URL path's last segment (``input.parquet`` when it has none usable)."""
    name = Path(urllib.parse.unquote(urllib.parse.urlsplit(url).path)).name
    return name if name and name not in (".", "..") else "input.parquet"


def fetch_input(url: str, work: Path, max_bytes: int = DEFAULT_MAX_BYTES, timeout: float = 60.0) -> Path:
    """The local copy of ``url`` under ``work`` (fetched now unless a complete copy is there already)."""
    import httpx

    dest = work / INPUT_DIR / file_name(url)
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    got = 0
    try:
        with httpx.stream("GET", url, timeout=timeout, follow_redirects=True) as resp:
            if resp.status_code != 200:
                raise BatchError(f"input {url}: HTTP {resp.status_code}")
            declared = resp.headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > max_bytes:
                raise BatchError(f"input {url} is {int(declared)} bytes, over the limit of {max_bytes} "
                                 "(--max-input-bytes)")
            with tmp.open("wb") as f:
                for chunk in resp.iter_bytes(CHUNK):
                    got += len(chunk)
                    if got > max_bytes:
                        raise BatchError(f"input {url} is over the limit of {max_bytes} bytes (--max-input-bytes)")
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, dest)
    except httpx.HTTPError as exc:
        raise BatchError(f"cannot fetch input {url}: {exc}") from None
    finally:
        tmp.unlink(missing_ok=True)
        if not dest.exists():  # nothing fetched: leave no trace that would make a retry refuse the output
            try:
                dest.parent.rmdir()
            except OSError:
                pass
    return dest
