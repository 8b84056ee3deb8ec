"""Bodies received in place and frames written in parts: the readers cut the same requests and frames from any
chunking of the stream, a large body lands in a buffer of its own, and a passed descriptor comes with its frame."""

from __future__ import annotations

import array
import os
import random
import socket
import threading

import numpy as np

from hub.endpoints import wire
from modules.framebuf import FrameReader, write_all
from modules.httpwire import RequestReader
from modules.workerwire import pack, pack_parts


def chunks(data: bytes, rng: random.Random) -> list[bytes]:
    out, i = [], 0
    while i < len(data):
        n = rng.choice([1, 7, 4096, 65536, 300_000])
        out.append(data[i:i + n])
        i += n
    return out


def pour(reader, data: bytes, rng: random.Random) -> list:
    """Feed ``data`` as a socket would: each piece written into the reader's buffer, at most what it offers."""
    got = []
    for piece in chunks(data, rng):
        while piece:
            buf = reader.get_buffer()
            n = min(len(buf), len(piece))
            buf[:n] = piece[:n]
            piece = piece[n:]
            result = reader.buffer_updated(n)
            if isinstance(result, list):  # wire.FrameReader hands its messages back
                got.extend(result)
            elif hasattr(reader, "take"):
                while (item := reader.take()) is not None:
                    got.append(item)
    return got


def test_pipelined_requests_with_large_bodies_arrive_whole_and_in_order():
    big = os.urandom(3 * 2**20)
    small = b'{"inputs": {"x": [1]}}'
    stream = b"".join(b"POST /v2/models/m/infer HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s" % (len(b), b)
                      for b in (big, small, big[:100_000], b""))
    for seed in range(3):
        reader = RequestReader()
        got = pour(reader, stream, random.Random(seed))
        assert [bytes(r[3]) for r in got] == [big, small, big[:100_000], b""]
        assert not reader.pending()


def test_worker_frames_in_any_chunking_and_a_descriptor_passed_with_its_frame(tmp_path):
    image = np.random.default_rng(0).random((1, 512, 512, 3), dtype=np.float32)
    frames = [pack({"op": "infer"}, None, image.tobytes()), pack({"op": "predict"}, {"x": image[:, ::2]}),
              pack({"op": "health"})]
    for seed in range(3):
        got = pour(FrameReader(), b"".join(frames), random.Random(seed))
        assert [h["op"] for h, _, _ in got] == ["infer", "predict", "health"]
        assert bytes(got[0][2]) == image.tobytes()
        assert np.array_equal(got[1][1]["x"], image[:, ::2])  # a strided array crossed in C order

    left, right = socket.socketpair()
    (tmp_path / "region").write_bytes(b"r" * 10)
    fd = os.open(tmp_path / "region", os.O_RDONLY)
    try:
        left.sendmsg([pack({"op": "shm_attach"})], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
        parts = pack_parts({"op": "infer"}, None, image.tobytes())
        writer = threading.Thread(target=write_all, args=(left.fileno(), parts))  # 3 MB: more than one writev
        writer.start()
        reader = FrameReader()
        got = []
        while len(got) < 2:
            assert reader.fill(right.fileno()) > 0
            while (frame := reader.take()) is not None:
                got.append(frame)
        writer.join()
        assert [h["op"] for h, _, _ in got] == ["shm_attach", "infer"] and bytes(got[1][2]) == image.tobytes()
        passed = reader.fds.popleft()
        assert os.read(passed, 10) == b"r" * 10
        os.close(passed)
    finally:
        os.close(fd)
        left.close()
        right.close()


def test_gateway_frames_received_in_place_decode_as_sent():
    body = os.urandom(2 * 2**20)
    # the second large frame is received into the buffer the first one was: the first answer must not change
    sent = [wire.Results(1, [(200, body, "application/octet-stream", 10)]), wire.Fail("no"),
            wire.Results(2, [(422, b"{}", "application/json", -1)]),
            wire.Results(3, [(200, os.urandom(3 * 2**19), "application/octet-stream", 10)])]
    for seed in range(3):
        got = pour(wire.FrameReader(wire.FromWorker), b"".join(bytes(wire.encode(m)) for m in sent), random.Random(seed))
        assert got == sent
    run = wire.Run(3, [("id", "application/octet-stream", body, "", False, "v2", 10, -1, 0)])
    view = wire.msgspec.msgpack.Decoder(wire.RunView).decode(wire.encode(run)[wire.HEADER.size:])
    assert isinstance(view.items[0][2], memoryview) and view.items[0][2] == body
