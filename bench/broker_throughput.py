"""Broker throughput: one paho publisher -> one paho subscriber, QoS 0 and 1, per broker kind.

The baseline every MQTT figure in edgefleet is read against. Runs each broker
kind that is available, several rounds, and prints medians and the ratio to
mosquitto.  Usage: ``python bench/broker_throughput.py [--messages 20000] [--rounds 3]``
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import paho.mqtt.client as mqtt  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402

from edgefleet.broker import LocalBroker, find_mosquitto  # noqa: E402


def one_round(port: int, n: int, qos: int, size: int = 200) -> float:
    done = threading.Event()
    count = 0

    def on_message(c, u, m):
        nonlocal count
        count += 1
        if count >= n:
            done.set()

    sub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-sub-{qos}", protocol=mqtt.MQTTv5)
    sub.on_message = on_message
    sub.connect("127.0.0.1", port)
    sub.loop_start()
    subscribed = threading.Event()
    sub.on_subscribe = lambda *a: subscribed.set()
    sub.subscribe("bench/#", qos=qos)
    subscribed.wait(5)
    pub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-pub-{qos}", protocol=mqtt.MQTTv5)
    pub.max_inflight_messages_set(1000)
    pub.connect("127.0.0.1", port)
    pub.loop_start()
    payload = b"x" * size
    start = time.perf_counter()
    for _ in range(n):
        pub.publish("bench/t", payload, qos=qos)
    done.wait(120)
    elapsed = time.perf_counter() - start
    for c in (pub, sub):
        c.loop_stop()
        c.disconnect()
    return count / elapsed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    kinds = (["mosquitto"] if find_mosquitto() else []) + ["iotcore"]
    results: dict[tuple[str, int], float] = {}
    for kind in kinds:
        with LocalBroker(kind=kind) as broker:
            for qos in (0, 1):
                rates = [one_round(broker.port, args.messages, qos) for _ in range(args.rounds)]
                results[(kind, qos)] = statistics.median(rates)
    base = "mosquitto" if "mosquitto" in kinds else kinds[0]
    print(f"{'broker':<10} {'qos':>3} {'median msgs/s':>14} {'vs ' + base:>14}")
    for (kind, qos), rate in results.items():
        print(f"{kind:<10} {qos:>3} {rate:>14.0f} {rate / results[(base, qos)]:>13.2f}x")


if __name__ == "__main__":
    main()
