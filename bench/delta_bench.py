"""Delta transfer with content-defined chunks against fixed 256 KiB chunks, measured in the same run.

    python bench/delta_bench.py [--size-mb 50] [--rounds 5] [--no-agents]

(a) Bytes an update moves when 1 KB is inserted at the start of a file (and, for contrast, 1 KB
    overwritten in the middle and 5 KB deleted from the middle): the chunks of version 2 missing from
    a store holding version 1's, with fixed chunks (the baseline) and with FastCDC spans.
(b) End to end: two real agents over a real mosquitto (tests/hubside.py's hub), one served releases
    without spans (as before), one with; each installs version 1, then version 2 (1 KB inserted at the
    start); the bytes each agent's chunk store took for version 2.
(c) Throughput, medians over rounds, the file in the page cache: plain sha256 of the file (the
    baseline), the fixed-chunk description a build always makes (whole-file sha256 + each chunk's), the
    FastCDC cut alone, and cut + sha256 of each span (what a build adds).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from modules.bundle import build_manifest, describe_path, sign_release  # noqa: E402
from modules.chunking import _chunker, bundle_spans, cut, cut_files, file_spans  # noqa: E402
from protocol.encoding import canonical_json  # noqa: E402
from protocol.manifest import CHUNK_SIZE, Manifest, Spans  # noqa: E402

MB = 1024 * 1024


def fixed(data: bytes) -> dict[str, int]:
    return {hashlib.sha256(data[i:i + CHUNK_SIZE]).hexdigest(): len(data[i:i + CHUNK_SIZE])
            for i in range(0, len(data), CHUNK_SIZE)}


def spans(data: bytes) -> dict[str, int]:
    return {hashlib.sha256(data[o:o + n]).hexdigest(): n for o, n in cut(data)}


def moved(split: Callable[[bytes], dict[str, int]], old: bytes, new: bytes) -> int:
    have = split(old)
    return sum(n for d, n in split(new).items() if d not in have)


def bench_edits(size: int) -> None:
    v1 = np.random.default_rng(1).bytes(size)
    insert = np.random.default_rng(2).bytes(1024)
    edits = {
        "1 KB inserted at the start": insert + v1,
        "1 KB overwritten in the middle": v1[:size // 2] + insert + v1[size // 2 + 1024:],
        "5 KB deleted from the middle": v1[:size // 2] + v1[size // 2 + 5120:],
    }
    print(f"(a) bytes moved by an update of a {size / MB:.0f} MB file (store holds version 1's chunks)")
    for what, v2 in edits.items():
        base, cdc = moved(fixed, v1, v2), moved(spans, v1, v2)
        print(f"    {what:32s} fixed 256 KiB: {base:>11,} B = {100 * base / len(v2):6.2f}%   "
              f"FastCDC: {cdc:>9,} B = {100 * cdc / len(v2):5.2f}%   ratio {cdc / base:.4f}")


def bench_agents(size: int, work: Path) -> None:
    from edgefleet.broker import LocalBroker
    from tests.hubside import HubSide, new_device, running_agent, until

    v1 = np.random.default_rng(1).bytes(size)
    v2 = np.random.default_rng(2).bytes(1024) + v1
    with LocalBroker() as broker:
        hub = HubSide(broker.url, work / "hub")
        try:
            results = {}
            for label, with_spans in (("without spans (baseline)", False), ("with spans", True)):
                name = "fixed" if not with_spans else "cdc"
                b1 = hub.build(name, 1, model_seed=1, extra={"weights.bin": v1}, spans=with_spans)
                b2 = hub.build(name, 2, model_seed=1, extra={"weights.bin": v2}, spans=with_spans)
                device = new_device()

                async def run(b1=b1, b2=b2, device=device, name=name) -> tuple[int, int, float, float]:
                    async with running_agent(hub, device, work / name, blob_retry=2.0) as agent:
                        t = time.perf_counter()
                        hub.publish_desired(device, 1, [b1.desired()])
                        await until(lambda: hub.module_state(device, name) == "running", 300, "v1 running")
                        first, t1 = agent.chunks.stored_bytes, time.perf_counter() - t
                        hub.publish_desired(device, 2, [b2.desired()])
                        await until(lambda: hub.reported(device).revision == 2
                                    and hub.module_state(device, name) == "running", 300, "v2 running")
                        return first, agent.chunks.stored_bytes - first, t1, time.perf_counter() - t - t1

                first, second, t1, t2 = asyncio.run(run())
                envelope = len(canonical_json(b2.envelope))
                results[label] = second
                print(f"    {label:25s} v1 fetched {first:>11,} B ({t1:.1f} s); v2 fetched {second:>11,} B = "
                      f"{100 * second / len(v2):6.2f}% of the file ({t2:.1f} s; release envelope {envelope:,} B)",
                      flush=True)
            base, cdc = results["without spans (baseline)"], results["with spans"]
            print(f"    ratio with/without spans: {cdc / base:.4f} (goal: < 1% of the file moved)")
        finally:
            hub.close()


def median_rate(fn: Callable[[], object], size: int, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return size / MB / statistics.median(times)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(MB):
            h.update(block)
    return h.hexdigest()


def cut_streamed(path: Path) -> list[tuple[int, int]]:
    with path.open("rb", buffering=0) as f:
        return [(c.offset, c.length) for c in _chunker().cut_stream(f)]


def build_release(files: dict[str, Path]) -> tuple[Manifest, Spans | None]:
    """What the hub's module build does: describe the files (fixed chunks) while cutting them in a second thread."""
    with ThreadPoolExecutor(1) as pool:
        cutting = pool.submit(cut_files, files)
        manifest = build_manifest("m", 1, "onnx", files, model="weights.bin")
        return manifest, bundle_spans(manifest, cutting.result())


def bench_throughput(size: int, work: Path, rounds: int) -> None:
    path = work / "weights.bin"
    path.write_bytes(np.random.default_rng(3).bytes(size))
    sha256_file(path)  # warm the page cache
    base = median_rate(lambda: sha256_file(path), size, rounds)
    rates = {
        "fixed chunks (describe_path)": median_rate(lambda: describe_path("w", path), size, rounds),
        "FastCDC cut only": median_rate(lambda: cut_streamed(path), size, rounds),
        "FastCDC cut + span sha256": median_rate(lambda: file_spans(path), size, rounds),
    }
    print(f"(c) throughput on {size / MB:.0f} MB, median of {rounds} rounds: plain sha256 {base:.0f} MB/s (baseline)")
    for what, rate in rates.items():
        print(f"    {what:30s} {rate:7.0f} MB/s = {100 * rate / base:4.0f}% of sha256")
    files = {"weights.bin": path}
    build = median_rate(lambda: build_release(files), size, rounds)
    print(f"    {'module build (both, as the hub)':30s} {build:7.0f} MB/s = {100 * build / base:4.0f}% of sha256")
    manifest, spans = build_release(files)
    plain = len(canonical_json(sign_release(manifest, [], 0)))
    with_spans = len(canonical_json(sign_release(manifest, [], 0, spans)))
    print(f"    release document: {plain:,} B fixed chunks only, {with_spans:,} B with spans "
          f"({100 * with_spans / size:.3f}% of the file)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-agents", action="store_true", help="skip (b), which needs mosquitto")
    args = parser.parse_args()
    size = args.size_mb * MB
    bench_edits(size)
    with tempfile.TemporaryDirectory() as tmp:
        if not args.no_agents:
            print(f"(b) real agents over mosquitto, 1 KB inserted at the start of a {args.size_mb} MB file", flush=True)
            bench_agents(size, Path(tmp))
        bench_throughput(size, Path(tmp), args.rounds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
