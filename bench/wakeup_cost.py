"""What one process hop costs on this machine: the floor under every multi-process serving path.

    python bench/wakeup_cost.py [--requests 2000] [--idle-ms 0 2 10]

A parent sends one byte over a Unix socketpair to a child that echoes it, and times the round trip.
Before each round trip the parent works (spins) for ``--idle-ms`` while the child sleeps in ``recv``:
as between two requests to a model, the child's CPU has gone idle. Each round trip wakes the child once
and the parent once. The same is measured with the child polling (non-blocking ``recv`` in a loop, its
CPU never idle) as the baseline: the difference is what waking a sleeping process costs. The device's
direct socket puts two such wake-ups on each request (client -> worker -> client), the web endpoint
four (client -> gateway -> worker -> gateway -> client), the device's TCP API four.

On a virtual machine an idle vCPU halts and waking it is a VM exit, which is why this can be tens to
hundreds of microseconds there and a few on bare metal.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time


def echo(sock: socket.socket, poll: bool) -> None:
    if poll:
        sock.setblocking(False)
    while True:
        if poll:
            while True:
                try:
                    data = sock.recv(1)
                    break
                except BlockingIOError:
                    pass
        else:
            data = sock.recv(1)
        if not data:
            os._exit(0)
        sock.send(data)


def round_trips(requests: int, idle_ms: float, poll: bool) -> list[float]:
    parent, child = socket.socketpair()
    pid = os.fork()
    if pid == 0:
        parent.close()
        echo(child, poll)
    child.close()
    times = []
    try:
        for _ in range(requests):
            until = time.perf_counter() + idle_ms / 1000
            while time.perf_counter() < until:  # the parent's "model": the child sleeps meanwhile
                pass
            t0 = time.perf_counter()
            parent.send(b"x")
            parent.recv(1)
            times.append(time.perf_counter() - t0)
    finally:
        parent.close()
        os.waitpid(pid, 0)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--idle-ms", type=float, nargs="+", default=[0.0, 2.0, 10.0])
    args = parser.parse_args()
    print("round trip over a Unix socketpair, microseconds; the child blocking in recv vs polling")
    print(f"{'idle before':>12} {'blocking p50':>13} {'p90':>7} {'polling p50':>12} {'p90':>7} {'extra p50':>10}")
    for idle in args.idle_ms:
        n = args.requests if idle < 5 else max(200, args.requests // 5)
        blocking, polling = round_trips(n, idle, False), round_trips(n, idle, True)
        b50, p50 = statistics.median(blocking) * 1e6, statistics.median(polling) * 1e6
        b90, p90 = (sorted(x)[int(len(x) * 0.9)] * 1e6 for x in (blocking, polling))
        print(f"{idle:>10.1f}ms {b50:>13.0f} {b90:>7.0f} {p50:>12.0f} {p90:>7.0f} {b50 - p50:>10.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
