"""``edgefleet score`` with an http(s) URL as input: fetched once into the job (streamed, size-capped),
scored like the same file on disk, and the copy gone when the job ends. A real HTTP server on loopback."""

from __future__ import annotations

import http.server
import json
import threading
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from modules.examples import N_FEATURES
from tests.batch_support import onnx_bundle, score_cli, write_table


@pytest.fixture
def served(tmp_path):
    """A directory served over HTTP on loopback; yields (base URL, list of requested paths)."""
    root = tmp_path / "www"
    root.mkdir()
    seen: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(root), **kwargs)

        def do_GET(self):  # noqa: N802 - the stdlib's name
            seen.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()


def test_a_url_input_is_fetched_once_scored_as_the_file_and_capped(tmp_path, served):
    bundle = onnx_bundle(tmp_path / "bundle")
    root, base, seen = served
    x = np.random.default_rng(5).normal(size=(1500, N_FEATURES))
    write_table(root / "rows.parquet", x, ids=False, row_group_size=500)

    def run(src: str, out: Path, *extra: str):
        return score_cli("--bundle", str(bundle), "-i", src, "-o", str(out), "--part-rows", "500", "--json", *extra)

    local = run(str(root / "rows.parquet"), tmp_path / "local")
    assert local.returncode == 0, local.stderr
    remote = run(f"{base}/rows.parquet", tmp_path / "remote")
    assert remote.returncode == 0, remote.stderr
    summary = json.loads(remote.stdout)
    assert (summary["rows"], summary["parts"], summary["input"]) == (1500, 3, f"{base}/rows.parquet")
    assert seen == ["/rows.parquet"]  # fetched once
    assert pq.read_table(tmp_path / "remote").equals(pq.read_table(tmp_path / "local"))
    assert not (tmp_path / "remote" / "_edgefleet_input").exists()  # the copy goes with the job

    size = (root / "rows.parquet").stat().st_size
    capped = run(f"{base}/rows.parquet", tmp_path / "capped", "--max-input-bytes", str(size - 1))
    assert capped.returncode == 1
    assert f"over the limit of {size - 1}" in " ".join(capped.stderr.split())
    again = run(f"{base}/rows.parquet", tmp_path / "capped", "--max-input-bytes", str(size))  # a retry is not refused
    assert again.returncode == 0, again.stderr
    missing = run(f"{base}/nope.parquet", tmp_path / "missing")
    assert missing.returncode == 1 and "HTTP 404" in " ".join(missing.stderr.split())
