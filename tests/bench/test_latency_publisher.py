"""bench._latency.RawMqtt: the load generator's client, against the real MQTT broker."""

from __future__ import annotations

import threading

from bench._latency import RawMqtt, _count_pingresp, publish_packet
from connectors.mqtt import connect_client
from infra.stack import StackInfo


def test_pingresp_counting_skips_other_packets_and_waits_for_whole_ones() -> None:
    puback, pingresp = b"\x40\x02\x00\x01", b"\xd0\x00"
    assert _count_pingresp(bytearray(pingresp + puback + pingresp)) == (2, 8)
    assert _count_pingresp(bytearray(puback[:3])) == (0, 0)  # a packet cut short waits
    assert _count_pingresp(bytearray(pingresp + b"\xd0")) == (1, 2)


def test_close_returns_once_the_broker_read_everything_and_nothing_is_lost(
    stack: StackInfo, names
) -> None:
    """A burst written just before close reaches a subscriber whole: close waits for the
    broker's PINGRESP, which it sends only after reading every earlier packet."""
    topic = f"{names.mqtt_base}/devices/d1/telemetry"
    got: list[bytes] = []
    done, subscribed = threading.Event(), threading.Event()
    want = 20_000

    def on_publishes(batch: list) -> None:
        got.extend(p[1] for p in batch)
        if len(got) >= want:
            done.set()

    sub = connect_client(
        stack.mqtt_url,
        on_connect=lambda c: c.subscribe(topic, qos=0),
        on_subscribe=lambda *_a: subscribed.set(),
        on_publishes=on_publishes,
    )
    try:
        assert subscribed.wait(10)
        client = RawMqtt(stack.mqtt_url, f"{names.mqtt_base}-load")
        client.send(b"".join(publish_packet(topic.encode(), b"%d" % i) for i in range(want)))
        assert client.close() is True
        assert done.wait(30)
        assert got == [b"%d" % i for i in range(want)]
    finally:
        sub.disconnect()
        sub.loop_stop()
