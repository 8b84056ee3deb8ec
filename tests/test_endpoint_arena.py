"""The web gateway's body arena (hub/endpoints/arena.py): slots, alignment, freeing, and read-only to workers.

A worker runs operator code, so the arena's guarantee is tested the way a hostile module would try it, in
a process of its own holding only the descriptor a worker gets: map it writable, reopen it read-write
through /proc and write or shrink it. Every attempt fails; reading works.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

from hub.endpoints.arena import ALIGN, MIN_BODY, Arena


def test_a_large_body_gets_a_slot_whose_tensor_is_aligned_and_freed_after_its_answers():
    arena = Arena(8 * 2**20)
    try:
        body = arena.alloc(2**20, {"inference-header-content-length": "167"})
        assert isinstance(body, memoryview) and len(body) == 2**20
        at, size = arena.ref(body)
        assert size == 2**20 and (at + 167) % ALIGN == 0  # the tensor after the JSON header starts on a cache line
        body[:5] = b"hello"
        arena.hold(body, 2)  # the version's answer and a mirror's
        arena.release(body)
        assert arena.status()["slots"] == 1  # one answer still owed: the slot stays
        arena.release(body)
        assert arena.status()["slots"] == 0 and arena.status()["in_use"] == 0
        whole = arena.alloc(8 * 2**20 - 2 * ALIGN, {})  # the free list merged back into one piece
        assert isinstance(whole, memoryview)
    finally:
        arena.close()


def test_small_bodies_and_bodies_that_do_not_fit_go_inline_and_are_counted():
    arena = Arena(4 * 2**20)
    try:
        assert isinstance(arena.alloc(MIN_BODY - 1, {}), bytearray)
        first = arena.alloc(3 * 2**20, {})
        assert isinstance(first, memoryview)
        assert isinstance(arena.alloc(3 * 2**20, {}), bytearray)  # the arena is busy: inline, not refused
        assert arena.status()["inline_large_bodies"] == 1
        arena.discard(first)  # a body no worker will read (a 401, a 404): freed at once
        assert arena.status()["slots"] == 0
        held = arena.alloc(3 * 2**20, {})
        arena.hold(held, 1)
        arena.discard(held)  # held for an answer: discard leaves it
        assert arena.status()["slots"] == 1
        assert arena.ref(bytearray(3)) is None and arena.ref(b"x") is None
    finally:
        arena.close()


def test_a_worker_holding_the_arena_can_read_bodies_but_never_change_or_shrink_them():
    arena = Arena(2**20)
    try:
        body = arena.alloc(2 * MIN_BODY, {})
        body[:6] = b"secret"
        at, _ = arena.ref(body)
        fd = arena.read_only_fd
        script = textwrap.dedent(f"""
            import mmap, os
            fd = {fd}
            tried = []
            ro = mmap.mmap(fd, 0, mmap.MAP_SHARED, mmap.PROT_READ)
            print("read", ro[{at}:{at} + 6].decode())
            for what, attempt in [
                ("map writable", lambda: mmap.mmap(fd, 0, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)),
                ("reopen and map", lambda: mmap.mmap(os.open(f"/proc/self/fd/{{fd}}", os.O_RDWR), 0)),
                ("reopen and write", lambda: os.pwrite(os.open(f"/proc/self/fd/{{fd}}", os.O_RDWR), b"x", {at})),
                ("reopen and shrink", lambda: os.ftruncate(os.open(f"/proc/self/fd/{{fd}}", os.O_RDWR), 0)),
            ]:
                try:
                    attempt()
                    print("ALLOWED", what)
                except OSError as exc:
                    print("refused", what, exc.errno)
        """)
        out = subprocess.run([sys.executable, "-c", script], pass_fds=(fd,), capture_output=True, text=True,
                             timeout=60, check=True).stdout
        assert "read secret" in out
        assert "ALLOWED" not in out and out.count("refused") == 4, out
        assert bytes(body[:6]) == b"secret"
    finally:
        arena.close()
