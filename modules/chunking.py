"""Content-defined chunking of bundle files (the hub's side only: devices never cut, they fetch listed spans).

FastCDC 2020 (Xia et al., "The Design of Fast Content-Defined Chunking for Data Deduplication Based
Storage Systems", 2020) with a 64-bit gear hash, as ported from fastcdc-rs ``v2020`` by ``pyfastcdc``
(Cython; ~1.3 GB/s here). A boundary depends only on the bytes just before it, so inserting or deleting
bytes moves only the spans around the change. Parameters: min 32 KiB, average 128 KiB, max 512 KiB,
normalized chunking level 2 (sizes cluster near the average, so one edit costs about one average span),
gear seed 0 (the table of the paper's reference code). Changing any of them changes every span: a device
then fetches each file once more in full, so ``CHUNKER`` names them and the release records it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from pyfastcdc import FastCDC

from protocol.manifest import Manifest, Span, Spans, fixed_chunks

MIN_SIZE, AVG_SIZE, MAX_SIZE, NORMALIZATION = 32 * 1024, 128 * 1024, 512 * 1024, 2
CHUNKER = "fastcdc2020/min32k-avg128k-max512k/nc2/seed0"


def _chunker() -> FastCDC:
    """A fresh chunker (an instance must not be shared between threads)."""
    return FastCDC(AVG_SIZE, min_size=MIN_SIZE, max_size=MAX_SIZE, normalized_chunking=NORMALIZATION)


if type(_chunker()).__module__.split(".")[1:2] != ["cy"]:  # the pure-Python fallback is ~200x slower: say so
    raise ImportError(f"pyfastcdc is running without its compiled extension ({type(_chunker()).__module__}); "
                      "reinstall it from a wheel for this platform")


def cut(data: bytes | bytearray | memoryview) -> list[tuple[int, int]]:
    """The (offset, length) of every span of ``data``: deterministic, each MIN_SIZE..MAX_SIZE but the last."""
    return [(c.offset, c.length) for c in _chunker().cut_buf(data)]


def file_spans(path: Path) -> list[Span]:
    """The spans of a file on disk, each hashed as it is cut. Streamed through a 1 MiB buffer (not mmap, whose
    pages would count in the hub's memory for a model of gigabytes); an empty file has none."""
    with path.open("rb", buffering=0) as f:
        return [Span(sha256=hashlib.sha256(c.data).hexdigest(), size=c.length) for c in _chunker().cut_stream(f)]


def cut_files(files: dict[str, Path]) -> dict[str, list[Span]]:
    """The spans of each file (bundle path -> file on disk)."""
    return {path: file_spans(p) for path, p in files.items()}


def bundle_spans(manifest: Manifest, spans: dict[str, list[Span]]) -> Spans | None:
    """The release's spans: each file's from ``spans`` (see :func:`cut_files`) where they differ from its fixed
    chunks (a file under MIN_SIZE is one chunk either way); None when no file has any."""
    out = {e.path: spans[e.path] for e in manifest.files
           if [(s.sha256, s.size) for s in spans[e.path]] != fixed_chunks(e)}
    return Spans(chunker=CHUNKER, files=out) if out else None
